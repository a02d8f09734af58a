"""End-to-end benchmarks against a real local Kafka broker: throughput, latency, scale.

One command runs the suite and prints a Markdown report (also written with
``--out FILE``)::

    .venv/bin/python benchmarks/e2e.py                      # everything, default sizes
    .venv/bin/python benchmarks/e2e.py --only throughput --samples 200000

* **throughput**: a stream of ``--sensors`` x ``--samples`` is produced first;
  then, on the same topic, (1) the *ceiling*: a plain confluent-kafka consumer
  that reads and JSON-decodes every message and does nothing else; (2) the
  *daemon*: ``streamer run`` as a subprocess, timed from its start until every
  expected score is published (and, separately, first to last score); (3) the
  *floor*: a naive pipeline in the style of the original write-up (one message at
  a time, ``json.loads``, a Python list per sensor, one model call per window, one
  produce per score), run for ``--floor-seconds`` and reported as a rate.
* **latency**: samples stamped with the wall clock are produced at half the
  daemon's measured rate; latency = publish time of the score (broker
  CreateTime set by the daemon's producer) minus the window's last sample time.
* **scale**: peak RSS (VmHWM) and throughput at several sensor counts and window
  sizes.
* **restart** (only with ``--only restart``): ``--restart-sensors`` sensors are
  scored, the daemon is stopped with SIGTERM (its shutdown round writes every
  sensor's state), then started again on the same group: the time from SIGTERM to
  exit, and from the new process's start until it is ready (its state restored),
  with the restore's own seconds (the partitions' state is read together; the
  longest ``state_restored`` line counts from the start of that read).
* **tls** (only with ``--only tls``): the throughput run's daemon on a plaintext broker
  and on a second, SASL_SSL broker (SCRAM-SHA-512, ACLs enforced), in turns on the same
  stream, ``--pairs`` times each: the cost of TLS and SASL as ratios.

Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.config import TrainConfig
from streamer.dev.broker import BrokerSecurity, LocalBroker
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.train import train_model

REPO = Path(__file__).resolve().parents[1]
T0 = 1_764_201_600.0

# The security settings (SASL_SSL, SCRAM) of each secured broker this run started, by
# bootstrap address: every client of this script, and the daemon's kafka.client, use them.
SECURED: dict[str, dict[str, str]] = {}


def client(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a client of the broker at ``bootstrap`` (secured or not)."""
    return {"bootstrap.servers": bootstrap, **SECURED.get(bootstrap, {}), **extra}


# ----------------------------------------------------------------------------- setup


def stream_rows(
    rows: range, sensors: int, channels: int, rng: np.random.Generator, phase: float = 0.1
) -> Any:
    """The benchmark's normal signal, one ``(sensors, channels)`` array per row.

    Each sensor is a phase-shifted sine per channel plus Gaussian noise; the model is
    trained on the same kind of data, so the stream is normal to it (as a plant's is).
    """
    sensor_phase = np.arange(sensors)[:, None] * phase + np.arange(channels)[None, :]
    for r in rows:
        yield np.sin(r / 20 + sensor_phase) + rng.normal(0, 0.05, (sensors, channels))


def train(out: Path, window: int, stride: int, channels: int) -> Path:
    """A small conv1d model on the benchmark's normal signal (16 sensors, phases 0..2 pi)."""
    rows = max(600, 4 * window)
    data = np.stack(list(stream_rows(range(rows), 16, channels, np.random.default_rng(1), 0.4)))
    names = [f"c{i}" for i in range(channels)]
    cfg = TrainConfig(preset="conv1d", epochs=5, hidden=32, latent=16, train_stride=4)
    res = train_model(list(data.transpose(1, 0, 2)), names, window, cfg, progress=False)
    save_checkpoint(out, res.module, res.scaler, names, stride, {"bench": True}, res.calibration)
    return out


def make_topics(bootstrap: str, partitions: int) -> dict[str, str]:
    """Fresh topics for one run."""
    stamp = time.time_ns()
    names = {k: f"bench-{k}-{stamp}" for k in ("input", "scores", "alerts", "dlq", "state")}
    admin = AdminClient(client(bootstrap))
    specs = []
    for k, name in names.items():
        n = partitions if k in ("input", "state", "scores") else 1
        conf = {"cleanup.policy": "compact"} if k == "state" else {}
        specs.append(NewTopic(name, num_partitions=n, replication_factor=1, config=conf))
    for fut in admin.create_topics(specs).values():
        fut.result(60)
    return names


def produce_stream(
    bootstrap: str,
    topic: str,
    sensors: int,
    rows: int,
    channels: int,
    *,
    rate_hz: float | None = None,
    wall_clock: bool = False,
    first_row: list[int] | None = None,
) -> int:
    """Produce rows x sensors samples (sensor-interleaved); returns the count.

    ``first_row[s]``: sensor s comes online at that row (default: every sensor at row 0).
    """
    producer = Producer(
        client(
            bootstrap,
            # Idempotence keeps each partition in order across retries (a fresh topic's
            # first requests are often retried); reordered samples would be dead-lettered.
            **{
                "enable.idempotence": True,
                # Paced runs (latency) send each row at once: the producer's own batching
                # delay would otherwise count as the daemon's latency.
                "linger.ms": 20 if rate_hz is None else 1,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 2_000_000,
                "compression.type": "lz4",
            },
        )
    )
    # This process imported torch to train the model: without freezing, a full garbage
    # collection (~100 ms) now and then would hold samples stamped before it.
    gc.collect()
    gc.freeze()
    try:
        n = _send_rows(producer, topic, sensors, rows, channels, rate_hz, wall_clock, first_row)
    finally:
        gc.unfreeze()  # frozen objects are not freed at exit, and extensions report leaks
    producer.flush(120)
    return n


def _send_rows(
    producer: Producer,
    topic: str,
    sensors: int,
    rows: int,
    channels: int,
    rate_hz: float | None,
    wall_clock: bool,
    first_row: list[int] | None,
) -> int:
    keys = [f"s{i:06d}".encode() for i in range(sensors)]
    started = time.monotonic()
    n = 0
    rng = np.random.default_rng(0)
    for r, vals in enumerate(stream_rows(range(rows), sensors, channels, rng)):
        row_ts = T0 + r
        for s in range(sensors):
            if first_row is not None and r < first_row[s]:
                continue
            # Wall-clock samples are stamped as they are sent, as a sensor gateway would:
            # a row of 1,000 messages takes ~10 ms to encode, which is not the daemon's.
            ts = time.time() if wall_clock else row_ts
            doc = orjson.dumps(
                {"sensor": keys[s].decode(), "ts": ts, "values": vals[s].tolist()},
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            while True:
                try:
                    producer.produce(topic, doc, key=keys[s])
                    break
                except BufferError:
                    producer.poll(0.01)
            n += 1
        producer.poll(0)
        if rate_hz is not None:
            ahead = (r + 1) / rate_hz - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return n


def write_config(
    path: Path,
    bootstrap: str,
    topics: dict[str, str],
    model: Path,
    window: int,
    stride: int,
    channels: int,
    **extra: Any,
) -> Path:
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{time.time_ns()}",
            "commit_interval_s": 5.0,
            **({"client": SECURED[bootstrap]} if bootstrap in SECURED else {}),
        },
        "topics": topics,
        "stream": {
            "channels": [f"c{i}" for i in range(channels)],
            "window": window,
            "stride": stride,
            "max_gap_s": 1e9,
        },
        "model": {"path": str(model), "device": "auto"},
        "threshold": {"method": "dspot", "risk": 1e-3, "level": 0.98},
        "metrics": {"enabled": False, "stats_interval_s": 5.0},
    }
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(data))
    return path


DAEMON_LOG_DIR: Path | None = None  # --daemon-logs: keep each daemon's log here


def start_daemon(cfg: Path, log: Path | None = None, repo: Path = REPO) -> subprocess.Popen[bytes]:
    """``streamer run`` on ``cfg``, logging to ``log`` (else ``DAEMON_LOG_DIR/<config>.log``).

    ``repo``: the checkout whose ``streamer`` runs (another build, for a side-by-side run).
    """
    out: Any = subprocess.DEVNULL
    if log is None and DAEMON_LOG_DIR is not None:
        DAEMON_LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = DAEMON_LOG_DIR / f"{cfg.stem}.log"
    if log is not None:
        out = log.open("wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if repo != REPO:
        env["PYTHONPATH"] = str(repo)  # ahead of this checkout's editable install
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
            cwd=repo,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float = 600) -> float:
    """SIGTERM, then wait for the exit; the seconds it took."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - started


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process in MiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def consumer_from_start(bootstrap: str, topic: str, purpose: str) -> Consumer:
    """A consumer (own throwaway group) assigned to every partition of ``topic`` from offset 0."""
    consumer = Consumer(
        client(
            bootstrap,
            **{
                "group.id": f"{purpose}-{time.time_ns()}",
                "enable.auto.commit": False,
                "fetch.max.bytes": 52_428_800,
            },
        )
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


def count_scores(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    latencies: list[float] | None = None,
) -> tuple[int, float, float, float]:
    """Read the scores topic until ``expected`` distinct ids; returns (n, first, last, peak_rss)."""
    consumer = consumer_from_start(bootstrap, topic, "count")
    seen: set[bytes] = set()
    first = last = 0.0
    rss = 0.0
    deadline = time.monotonic() + timeout_s
    while len(seen) < expected and time.monotonic() < deadline:
        for m in consumer.consume(10_000, 0.5):
            if m.error() is not None:
                continue
            value = m.value() or b""
            # The id is the first field (sorted keys would put "anomalous" first; scan instead).
            rec_id = value[value.find(b'"id":"') + 6 : value.find(b'"id":"') + 38]
            if rec_id not in seen:
                seen.add(rec_id)
                stamp = m.timestamp()[1] / 1000.0
                first = stamp if not first else min(first, stamp)
                last = max(last, stamp)
                if latencies is not None:
                    rec = orjson.loads(value)
                    latencies.append(stamp - rec["window_end"])
        if proc is not None:
            rss = max(rss, peak_rss_mb(proc.pid))
            if proc.poll() is not None:
                break
    consumer.close()
    return len(seen), first, last, rss


def steady_samples(sensors: int, rows: int, window: int) -> int:
    """Samples consumed between the first and the last score: from each sensor's first window on."""
    return sensors * max(rows - window + 1, 0)


def expected_windows(sensors: int, rows: int, window: int, stride: int) -> int:
    return sensors * ((rows - window) // stride + 1) if rows >= window else 0


# ----------------------------------------------------------------------------- the three runs


def ceiling(bootstrap: str, topic: str, total: int) -> float:
    """Samples/s of consume + JSON decode and nothing else."""
    consumer = consumer_from_start(bootstrap, topic, "ceiling")
    n = 0
    started = time.perf_counter()
    while n < total:
        batch = consumer.consume(2000, 1.0)
        docs = [orjson.loads(m.value() or b"{}") for m in batch if m.error() is None]
        n += len(docs)
    elapsed = time.perf_counter() - started
    consumer.close()
    return float(n / elapsed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_run(
    cfg: Path,
    bootstrap: str,
    scores_topic: str,
    expected: int,
    timeout_s: float = 1800,
    repo: Path = REPO,
) -> dict[str, float]:
    """Start the daemon, wait for every expected score; wall time from start, and first->last.

    Also the daemon's CPU seconds up to its last score: on a shared machine the wall-clock
    rates swing with whatever else runs, the CPU a build spends on the same input less so.
    """
    started = time.time()
    proc = start_daemon(cfg, repo=repo)
    try:
        n, first, last, rss = count_scores(bootstrap, scores_topic, expected, timeout_s, proc)
        done = time.time()
        cpu_s = cpu_seconds(proc.pid)
    finally:
        stop_daemon(proc, 60)
    return {
        "windows": n,
        "wall_s": done - started,
        "publish_s": max(last - first, 1e-3),
        "rss_mb": rss,
        "cpu_s": cpu_s,
    }


def floor(
    bootstrap: str, topic: str, out_topic: str, model_dir: Path, seconds: float, warmup: int
) -> float:
    """Samples/s of a naive per-message pipeline (one model call per window).

    The clock starts after ``warmup`` messages (every sensor's first window), so the
    rate is the steady state, where a window is due every ``stride`` samples, as in
    the daemon's first-to-last-score rate.
    """
    model = load_checkpoint(model_dir)
    module = model.module
    window, stride = model.window, model.stride
    consumer = consumer_from_start(bootstrap, topic, "floor")
    producer = Producer(client(bootstrap))
    buffers: dict[str, list[list[float]]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    n = 0
    timed = 0
    started = 0.0
    with torch.inference_mode():
        while not started or time.perf_counter() - started < seconds:
            msg = consumer.poll(1.0)
            if msg is None:
                break  # the stream is exhausted
            if msg.error() is not None:
                continue
            doc = json.loads(msg.value() or b"{}")
            sensor = doc["sensor"]
            buf = buffers[sensor]
            buf.append(doc["values"])
            if len(buf) > window:
                buf.pop(0)
            counts[sensor] += 1
            n += 1
            if counts[sensor] >= window and (counts[sensor] - window) % stride == 0:
                x = torch.tensor([buf], dtype=torch.float32)
                score, _ = module(x)
                producer.produce(
                    out_topic, json.dumps({"sensor": sensor, "score": float(score)}), key=sensor
                )
                producer.poll(0)
            if n == warmup:
                started = time.perf_counter()
            elif n > warmup:
                timed += 1
    elapsed = time.perf_counter() - started if started else float("nan")
    producer.flush(30)
    consumer.close()
    return timed / elapsed


# ----------------------------------------------------------------------------- suites


def merged(base: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """A suite's own config settings, with the command line's overrides on top."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in overrides(args).items():
        out.setdefault(section, {}).update(values)
    return out


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config sections set from the command line."""
    inference: dict[str, Any] = {}
    if args.queue_size is not None:
        inference["queue_size"] = args.queue_size
    if args.max_batch is not None:
        inference["max_batch"] = args.max_batch
    out: dict[str, dict[str, Any]] = {"inference": inference} if inference else {}
    if args.commit_interval is not None:
        out["kafka"] = {"commit_interval_s": args.commit_interval}
    for item in args.set:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out.setdefault(section, {})[name] = yaml.safe_load(raw)
    return out


def throughput(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> float:
    """The headline comparison; returns the daemon's steady rate (samples/s)."""
    sensors, channels, window, stride = args.sensors, args.channels, args.window, args.stride
    rows = args.samples // sensors
    total = rows * sensors
    model = train(tmp / "model", window, stride, channels)
    topics = make_topics(bootstrap, args.partitions)
    t0 = time.perf_counter()
    produce_stream(bootstrap, topics["input"], sensors, rows, channels)
    print(f"produced {total:,} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ceil = ceiling(bootstrap, topics["input"], total)
    expected = expected_windows(sensors, rows, window, stride)
    if args.baseline is not None:
        side_by_side(bootstrap, tmp, args, topics["input"], model, expected, report)
    cfg = write_config(
        tmp / "tp.yaml", bootstrap, topics, model, window, stride, channels, **overrides(args)
    )
    d = daemon_run(cfg, bootstrap, topics["scores"], expected)
    flo = floor(
        bootstrap, topics["input"], topics["alerts"], model, args.floor_seconds, sensors * window
    )
    d_wall = total / d["wall_s"]
    d_steady = (
        steady_samples(sensors, rows, window) * (d["windows"] / max(expected, 1)) / d["publish_s"]
    )
    report += [
        "## Throughput",
        "",
        f"{sensors:,} sensors x {channels} channels, {total:,} samples, window {window}, stride "
        f"{stride}, {args.partitions} input partitions; {expected:,} windows expected, "
        f"{d['windows']:,} published.",
        "",
        "| pipeline | samples/s |",
        "|---|---|",
        f"| ceiling: consume + JSON decode only | {ceil:,.0f} |",
        f"| daemon, from process start to last score | {d_wall:,.0f} |",
        f"| daemon, first to last score published | {d_steady:,.0f} |",
        f"| floor: naive per-message pipeline (steady state) | {flo:,.0f} |",
        "",
        f"Ratios (daemon from start): daemon/ceiling **{d_wall / ceil:.2f}**, "
        f"daemon/floor **{d_wall / flo:.1f}x**. Steady state: daemon/ceiling "
        f"{d_steady / ceil:.2f}, daemon/floor {d_steady / flo:.1f}x. Daemon peak RSS "
        f"{d['rss_mb']:.0f} MiB.",
        "",
    ]
    return float(d_steady)


def side_by_side(
    bootstrap: str,
    tmp: Path,
    args: argparse.Namespace,
    input_topic: str,
    model: Path,
    expected: int,
    report: list[str],
) -> None:
    """This build and ``--baseline`` in turns on one produced stream, ``--pairs`` times each.

    Each run has its own group and output topics. The order alternates (this build first,
    then the baseline first), so a drift of the machine's load favours neither.
    """
    sensors, window, stride, channels = args.sensors, args.window, args.stride, args.channels
    rows = args.samples // sensors
    builds = {"this build": REPO, "baseline": args.baseline.resolve()}

    def run_one(i: int, name: str) -> dict[str, float]:
        topics = {**make_topics(bootstrap, args.partitions), "input": input_topic}
        cfg = write_config(
            tmp / f"ab-{i}-{name.replace(' ', '-')}.yaml",
            bootstrap,
            topics,
            model,
            window,
            stride,
            channels,
            **overrides(args),
        )
        return daemon_run(cfg, bootstrap, topics["scores"], expected, repo=builds[name])

    runs = alternate(list(builds), args.pairs, run_one, sensors, rows, window)
    report += [
        "## Side by side",
        "",
        f"This build and `{args.baseline}` in turns, {args.pairs} runs each, on one produced "
        f"stream ({sensors:,} sensors, {sensors * rows:,} samples). Samples/s first to last "
        "score and from process start; CPU: the daemon's user + system seconds up to its last "
        "score (start-up included).",
        "",
        *paired_table(runs, "this build", "baseline"),
    ]


def alternate(
    names: list[str],
    pairs: int,
    run_one: Callable[[int, str], dict[str, float]],
    sensors: int,
    rows: int,
    window: int,
) -> dict[str, list[dict[str, float]]]:
    """``run_one(i, name)`` for each name, ``pairs`` times, the order flipped every pair.

    Alternating which goes first keeps a drift of the machine's load from favouring one.
    Each run's figures get its steady and from-start rates added.
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else list(reversed(names)):
            d = run_one(i, name)
            d["steady"] = steady_samples(sensors, rows, window) / d["publish_s"]
            d["from_start"] = sensors * rows / d["wall_s"]
            runs[name].append(d)
            print(f"pair {i + 1} {name}: {d}", file=sys.stderr)
    return runs


def paired_table(runs: dict[str, list[dict[str, float]]], first: str, second: str) -> list[str]:
    """Markdown rows of each pair's figures and the medians, ``first`` / ``second``."""
    lines = [
        f"| run | {first}: steady / from start / CPU s | {second}: steady / from start / CPU s |",
        "|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(runs[first], runs[second], strict=True)):
        lines.append(
            f"| {i + 1} | {a['steady']:,.0f} / {a['from_start']:,.0f} / {a['cpu_s']:.1f} "
            f"| {b['steady']:,.0f} / {b['from_start']:,.0f} / {b['cpu_s']:.1f} |"
        )

    def ratio(key: str) -> float:
        return float(
            np.median([r[key] for r in runs[first]]) / np.median([r[key] for r in runs[second]])
        )

    return [
        *lines,
        "",
        f"Medians, {first} / {second}: steady {ratio('steady'):.3f}, from start "
        f"{ratio('from_start'):.3f}, CPU seconds {ratio('cpu_s'):.3f}.",
        "",
    ]


def tls(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """The cost of SASL_SSL: one stream on a plaintext and on a secured broker, in turns.

    A second broker is started with a SASL_SSL listener (SCRAM-SHA-512, TLS 1.2+,
    ACLs enforced; the benchmark's user is a super user, since ACL checks are not
    what is measured). The same stream is produced to both; the daemon then runs
    ``--pairs`` times on each, alternating which goes first, as in the side-by-side run.
    """
    sensors, channels, window, stride = args.sensors, args.channels, args.window, args.stride
    rows = args.samples // sensors
    model = train(tmp / "model-tls", window, stride, channels)
    secured = LocalBroker(
        security=BrokerSecurity(users={"bench": "bench-secret"}, super_users=["bench"])
    )
    secured.start(timeout_s=180)
    try:
        conf = secured.client_config("bench")
        SECURED[secured.bootstrap] = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
        brokers = {"PLAINTEXT": bootstrap, "SASL_SSL": secured.bootstrap}
        inputs = {}
        for name, address in brokers.items():
            inputs[name] = make_topics(address, args.partitions)["input"]
            produce_stream(address, inputs[name], sensors, rows, channels)
        expected = expected_windows(sensors, rows, window, stride)

        def run_one(i: int, name: str) -> dict[str, float]:
            address = brokers[name]
            topics = {**make_topics(address, args.partitions), "input": inputs[name]}
            cfg = write_config(
                tmp / f"tls-{i}-{name}.yaml",
                address,
                topics,
                model,
                window,
                stride,
                channels,
                **overrides(args),
            )
            return daemon_run(cfg, address, topics["scores"], expected)

        runs = alternate(list(brokers), args.pairs, run_one, sensors, rows, window)
    finally:
        secured.stop()
    report += [
        "## SASL_SSL",
        "",
        f"One stream ({sensors:,} sensors, {sensors * rows:,} samples) on a plaintext broker "
        "and on a SASL_SSL one (SCRAM-SHA-512, ACLs enforced), the daemon on each in turns, "
        f"{args.pairs} runs each. Samples/s first to last score and from process start; CPU: "
        "the daemon's user + system seconds up to its last score.",
        "",
        *paired_table(runs, "SASL_SSL", "PLAINTEXT"),
    ]


def latency(
    bootstrap: str, tmp: Path, args: argparse.Namespace, rate: float, report: list[str]
) -> None:
    """p50/p95/p99 from sample time to score published, at half the measured rate.

    Run twice: with every sensor online from the first row, every window of every sensor
    falls due on the same row (a burst of ``sensors`` windows every ``stride`` rows, the
    worst case); with sensors coming online on different rows (``s % stride``), as they
    do in a plant, the windows fall due evenly.
    """
    sensors, channels, window, stride = args.sensors, args.channels, args.window, args.stride
    model = train(tmp / "model-lat", window, stride, channels)
    rows = max(window * 3, int(args.latency_seconds * rate / 2 / sensors))
    rate_hz = rate / 2 / sensors  # rows per second so samples/s = rate / 2
    rate_note = (
        "set by --latency-rate"
        if args.latency_rate is not None
        else "half the daemon's steady rate"
    )
    report += [
        "## Latency",
        "",
        f"Produced at {rate / 2:,.0f} samples/s ({rate_note}) for {rows / rate_hz:.0f} s, "
        f"{sensors:,} sensors, one row of all sensors at a time; latency = the score's "
        "produce time in the daemon minus the window's last sample time.",
        "",
        "| sensors come online | windows | p50 | p95 | p99 |",
        "|---|---|---|---|---|",
    ]
    for mode in args.latency_modes.split(","):
        first_row = None if mode == "aligned" else [s % stride for s in range(sensors)]
        topics = make_topics(bootstrap, args.partitions)
        cfg = write_config(
            tmp / f"lat-{mode}.yaml",
            bootstrap,
            topics,
            model,
            window,
            stride,
            channels,
            **merged({"inference": {"max_wait_ms": 2.0}, "kafka": {"poll_timeout_ms": 20}}, args),
        )
        proc = start_daemon(cfg)
        try:
            time.sleep(12)  # let it start and take its partitions before the clock matters
            produce_stream(
                bootstrap,
                topics["input"],
                sensors,
                rows,
                channels,
                rate_hz=rate_hz,
                wall_clock=True,
                first_row=first_row,
            )
            lat: list[float] = []
            starts = first_row or [0] * sensors
            expected = sum(expected_windows(1, rows - f, window, stride) for f in starts)
            count_scores(bootstrap, topics["scores"], expected, 300, proc, lat)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        # Skip the first window per sensor: it includes start-up.
        arr = np.asarray(lat[sensors:]) * 1000
        p50, p95, p99 = np.percentile(arr, [50, 95, 99]) if arr.size else (np.nan,) * 3
        label = "all on row 0" if first_row is None else f"on rows 0..{stride - 1} (s % stride)"
        report.append(f"| {label} | {arr.size:,} | {p50:.1f} ms | {p95:.1f} ms | {p99:.1f} ms |")
        print(report[-1], file=sys.stderr)
    report.append("")


def fleet_stream(
    bootstrap: str,
    cfg_path: Path,
    args: argparse.Namespace,
    model: Path,
    sensors: int,
    rows: int,
    window: int,
    channels: int,
) -> tuple[dict[str, str], Path]:
    """Fresh topics holding ``rows`` samples of each of ``sensors`` sensors; a config for them."""
    topics = make_topics(bootstrap, args.partitions)
    produce_stream(bootstrap, topics["input"], sensors, rows, channels)
    # A window spans `window` samples of every sensor of its partition: the replay
    # bound must be above that, or every sensor is evicted before its window fills.
    replay = max(1_000_000, 2 * window * sensors // args.partitions)
    cfg = write_config(
        cfg_path,
        bootstrap,
        topics,
        model,
        window,
        max(1, window // 8),
        channels,
        **merged({"stream": {"max_replay_messages": replay}}, args),
    )
    return topics, cfg


def scale(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """Peak RSS and throughput across sensor counts and window sizes."""
    rows_out = [
        "| sensors | window | channels | samples | samples/s (first to last score) "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    cases = [
        (int(s), args.scale_window, args.scale_channels) for s in args.scale_sensors.split(",")
    ]
    cases += [(args.sensors, int(w), args.channels) for w in args.scale_windows.split(",") if w]
    for sensors, window, channels in cases:
        stride = max(1, window // 8)
        rows = max(window + stride * 4, args.scale_samples // sensors)
        model = train(tmp / f"m-{window}-{channels}", window, stride, channels)
        topics, cfg = fleet_stream(
            bootstrap,
            tmp / f"s-{sensors}-{window}.yaml",
            args,
            model,
            sensors,
            rows,
            window,
            channels,
        )
        expected = expected_windows(sensors, rows, window, stride)
        d = daemon_run(cfg, bootstrap, topics["scores"], expected)
        total = sensors * rows
        rate = steady_samples(sensors, rows, window) * (d["windows"] / max(expected, 1))
        rate /= d["publish_s"]
        rows_out.append(
            f"| {sensors:,} | {window} | {channels} | {total:,} | {rate:,.0f} | {d['rss_mb']:.0f} |"
        )
        print(rows_out[-1], file=sys.stderr)
    report += ["## Scale", "", *rows_out, ""]


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The daemon log's JSON lines for one event."""
    out = []
    for line in path.read_bytes().splitlines():
        if event.encode() in line:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("event") == event:
                out.append(rec)
    return out


def topic_records(bootstrap: str, topic: str) -> int:
    """Records in a topic: the sum of its partitions' high watermarks."""
    consumer = consumer_from_start(bootstrap, topic, "count")
    try:
        return sum(
            consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()
        )
    finally:
        consumer.close()


def restart(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """Shutdown and restart times with every sensor's state to write and restore."""
    rows_out = [
        "| sensors | state records | stop s (SIGTERM to exit) | start to ready s "
        "| restore s | sensors restored | peak RSS MiB at ready |",
        "|---|---|---|---|---|---|---|",
    ]
    window, channels = args.scale_window, args.scale_channels
    stride = max(1, window // 8)
    rows = window + stride  # two windows per sensor: every sensor has a threshold
    model = train(tmp / f"m-{window}-{channels}", window, stride, channels)
    for sensors in (int(s) for s in args.restart_sensors.split(",")):
        topics, cfg = fleet_stream(
            bootstrap, tmp / f"r-{sensors}.yaml", args, model, sensors, rows, window, channels
        )
        logs = DAEMON_LOG_DIR or tmp
        logs.mkdir(parents=True, exist_ok=True)
        first_log, second_log = logs / f"r-{sensors}-first.log", logs / f"r-{sensors}-second.log"
        proc = start_daemon(cfg, first_log)
        expected = expected_windows(sensors, rows, window, stride)
        n, _, _, _ = count_scores(bootstrap, topics["scores"], expected, 1800, proc)
        stop_s = stop_daemon(proc)
        written = topic_records(bootstrap, topics["state"])
        started = time.monotonic()
        proc = start_daemon(cfg, second_log)
        ready_s = float("nan")
        rss = 0.0
        while proc.poll() is None and time.monotonic() - started < 600:
            rss = max(rss, peak_rss_mb(proc.pid))
            if log_events(second_log, "daemon_ready"):
                ready_s = time.monotonic() - started
                break
            time.sleep(0.05)
        restored = log_events(second_log, "state_restored")
        stop_daemon(proc)
        rows_out.append(
            f"| {sensors:,} | {written:,} | {stop_s:.1f} | {ready_s:.1f} "
            f"| {max((e['seconds'] for e in restored), default=float('nan')):.1f} "
            f"| {sum(e['sensors'] for e in restored):,} | {rss:.0f} |"
        )
        if n < expected:
            rows_out[-1] += f" (first run scored {n:,} of {expected:,} windows)"
        print(rows_out[-1], file=sys.stderr)
    report += ["## Restart", "", *rows_out, ""]


@contextlib.contextmanager
def broker_and_tmp(bootstrap: str | None, prefix: str) -> Iterator[tuple[str, Path]]:
    """A temporary folder, and the broker at ``bootstrap`` or a local one started for the run."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmpdir:
        if bootstrap is not None:
            yield bootstrap, Path(tmpdir)
            return
        broker = LocalBroker()
        try:
            yield broker.start(), Path(tmpdir)
        finally:
            broker.stop()


def main() -> None:
    """Run the chosen suites and print (and optionally write) the Markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--only", choices=["throughput", "latency", "scale", "restart", "tls"], action="append"
    )
    ap.add_argument("--bootstrap", default=os.environ.get("STREAMER_BENCH_BOOTSTRAP"))
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--floor-seconds", type=float, default=30.0)
    ap.add_argument("--latency-seconds", type=float, default=60.0)
    ap.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="samples/s for the latency run (default: half the measured throughput)",
    )
    ap.add_argument(
        "--latency-modes",
        default="aligned,staggered",
        help="aligned: every sensor from row 0; staggered: sensor s from row s %% stride",
    )
    ap.add_argument("--scale-sensors", default="100,10000,100000")
    ap.add_argument("--scale-window", type=int, default=64)
    ap.add_argument("--scale-channels", type=int, default=8)
    ap.add_argument("--scale-windows", default="32,128,512")
    ap.add_argument("--scale-samples", type=int, default=1_000_000)
    ap.add_argument("--restart-sensors", default="100000", help="sensor counts, comma-separated")
    ap.add_argument("--queue-size", type=int, default=None, help="inference.queue_size override")
    ap.add_argument("--max-batch", type=int, default=None, help="inference.max_batch override")
    ap.add_argument(
        "--commit-interval", type=float, default=None, help="kafka.commit_interval_s override"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any daemon config override, e.g. inference.threads=1 (repeatable)",
    )
    ap.add_argument(
        "--daemon-logs", type=Path, default=None, help="keep each daemon's log in this folder"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="throughput: also run the daemon of this other checkout, in turns with this one",
    )
    ap.add_argument("--pairs", type=int, default=3, help="runs of each build with --baseline")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    global DAEMON_LOG_DIR
    DAEMON_LOG_DIR = args.daemon_logs
    suites = args.only or ["throughput", "latency", "scale"]

    report = [
        f"# streamer benchmarks ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} "
        f"({'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}).",
        "",
        "Command: `" + " ".join(["python", "benchmarks/e2e.py", *sys.argv[1:]]) + "`",
        "",
    ]
    with broker_and_tmp(args.bootstrap, "streamer-bench-") as (bootstrap, tmp):
        rate = None
        if "throughput" in suites:
            rate = throughput(bootstrap, tmp, args, report)
        if "latency" in suites:
            if args.latency_rate is not None:
                rate = 2 * args.latency_rate
            elif rate is None:
                rate = throughput(bootstrap, tmp, args, [])
            latency(bootstrap, tmp, args, rate, report)
        if "scale" in suites:
            scale(bootstrap, tmp, args, report)
        if "restart" in suites:
            restart(bootstrap, tmp, args, report)
        if "tls" in suites:
            tls(bootstrap, tmp, args, report)
    text = "\n".join(report)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
