"""Takeover: how long a killed (or stopped) daemon's partitions go unscored.

Two daemons share a group on a live stream (wall-clock samples, every sensor completing
a window several times a second). One is SIGKILLed; its takeover is the time from the
kill until every partition it owned has a window scored again, by whichever daemon:
the survivor once the group gives it the partitions, or the killed daemon itself when
it is started again (as systemd does, ``--restart-after`` seconds later) and, as a
static member, takes its own place back. ``--action stop`` sends SIGTERM instead and
measures the handover: from the signal until the other daemon is assigned every
partition. ``--load`` runs both daemons flat out on a backlog instead and counts the
partitions lost or revoked meanwhile (a false takeover).

Each variant names the group protocol and session settings (``kafka.client``) and
``kafka.instance_id``; ``unit`` does what ``deploy/streamer.service`` does after a
crash (``streamer release`` at once, ``check-config`` and the restart after
``--restart-after`` seconds, its RestartSec). Run with ``--only NAME`` (repeatable).
Prints figures, asserts nothing::

    .venv/bin/python benchmarks/takeover.py --only classic-45s --only classic-6s --runs 3
    .venv/bin/python benchmarks/takeover.py --only unit --runs 3
    .venv/bin/python benchmarks/takeover.py --only static --restart-after 0.1 --runs 3
    .venv/bin/python benchmarks/takeover.py --action stop --only static --only classic-6s
    .venv/bin/python benchmarks/takeover.py --load 60 --only unit
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer

# The helpers live in e2e_parts, beside this script (its folder is on the path when run).
from e2e_parts.daemons import REPO, log_events, start_daemon, write_config
from e2e_parts.stream import (
    broker_and_tmp,
    client,
    consumer_from_start,
    make_topics,
    stream_rows,
    train,
)

WINDOW, STRIDE, CHANNELS = 16, 4, 4


@dataclass(frozen=True)
class Variant:
    """One way of being a group member: ``kafka.client`` settings and ``kafka.instance_id``."""

    client: dict[str, Any]
    instance_id: str | None
    restart: bool  # the killed daemon is started again (systemd's Restart=)
    note: str = ""
    # As deploy/streamer.service does it: `streamer release` at once (ExecStopPost), and
    # the restart after RestartSec runs `streamer check-config` first (ExecStartPre).
    unit: bool = False


VARIANTS = {
    "classic-45s": Variant(
        {"session.timeout.ms": 45000, "heartbeat.interval.ms": 3000}, None, False, "librdkafka"
    ),
    "classic-6s": Variant({}, None, False, "the daemon's default session, dynamic"),
    "consumer": Variant({"group.protocol": "consumer"}, None, False, "KIP-848, broker 45 s"),
    "static": Variant({}, "auto", True, "classic 6 s, static, restart"),
    "unit": Variant({}, "auto", True, "shipped unit: release, then restart", unit=True),
    "static-norestart": Variant({}, "auto", False, "static, never restarted"),
    "consumer-static": Variant({"group.protocol": "consumer"}, "auto", True, "KIP-848 static"),
}


@dataclass
class Scores:
    """Every score record's (sensor, producer timestamp), read as they arrive."""

    seen: list[tuple[str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def follow(self, bootstrap: str, topic: str) -> None:
        consumer = consumer_from_start(bootstrap, topic, "takeover")
        try:
            while not self.stop.is_set():
                for m in consumer.consume(5000, 0.2):
                    if m.error() is None:
                        sensor = orjson.loads(m.value() or b"{}").get("sensor", "")
                        self.seen.append((sensor, m.timestamp()[1] / 1000.0))
        finally:
            consumer.close()


def live_stream(
    bootstrap: str,
    topic: str,
    sensors: int,
    rate_hz: float,
    stop: threading.Event,
    where: dict[str, int] | None = None,
) -> None:
    """Rows of every sensor at ``rate_hz``, stamped with the wall clock, until ``stop``.

    ``where`` is filled with sensor -> input partition, from the delivery reports.
    """
    where = {} if where is None else where

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            where[(msg.key() or b"").decode()] = msg.partition()

    producer = Producer(client(bootstrap, **{"linger.ms": 5, "enable.idempotence": True}))
    keys = [f"s{i:04d}" for i in range(sensors)]
    rows = stream_rows(range(10**9), sensors, CHANNELS, np.random.default_rng(0))
    started = time.monotonic()
    for r, vals in enumerate(rows):
        if stop.is_set():
            break
        now = time.time()
        for s, key in enumerate(keys):
            doc = orjson.dumps(
                {"sensor": key, "ts": now, "values": vals[s].tolist()},
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            while True:
                try:
                    producer.produce(topic, doc, key=key.encode(), on_delivery=delivered)
                    break
                except BufferError:  # unpaced (--load): wait for the client's queue
                    producer.poll(0.05)
        producer.poll(0)
        ahead = (r + 1) / rate_hz - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)


_MOVES = ("partitions_assigned", "partitions_revoked", "partitions_lost")


def moves(log: Path) -> list[dict[str, Any]]:
    """A daemon log's assignment, revocation and loss lines, in order."""
    out = []
    for line in log.read_bytes().splitlines() if log.exists() else []:
        if b"partitions_" not in line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") in _MOVES:
            out.append(rec)
    return out


def owned(log: Path) -> set[int]:
    """The partitions a daemon owns, by its latest assignment, revocation or loss line."""
    evs = moves(log)
    return set(evs[-1]["owned"]) if evs else set()


def wait_until(check: Any, timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step_s)
    return False


def one_run(
    bootstrap: str, tmp: Path, model: Path, name: str, args: argparse.Namespace
) -> dict[str, float]:
    """Two daemons, one killed (or stopped); the figures of that one event."""
    variant = VARIANTS[name]
    partitions = 4
    topics = make_topics(bootstrap, partitions)
    group = f"takeover-{time.time_ns()}"
    kafka = {"group_id": group, "client": variant.client, "instance_id": variant.instance_id}
    cfgs = [
        write_config(
            tmp / f"{name}-{group}-{i}.yaml",
            bootstrap,
            topics,
            model,
            WINDOW,
            STRIDE,
            CHANNELS,
            kafka=kafka,
            stream={"max_gap_s": 60.0},
        )
        for i in range(2)
    ]
    logs = [tmp / f"{c.stem}.log" for c in cfgs]
    procs = [start_daemon(c, log) for c, log in zip(cfgs, logs, strict=True)]
    stop = threading.Event()
    where: dict[str, int] = {}
    producer = threading.Thread(
        target=live_stream, args=(bootstrap, topics["input"], 40, 20.0, stop, where)
    )
    scores = Scores()
    reader = threading.Thread(target=scores.follow, args=(bootstrap, topics["scores"]))
    producer.start()
    reader.start()
    out: dict[str, float] = {}
    try:
        balanced = wait_until(
            lambda: (
                all(owned(log) for log in logs)
                and owned(logs[0]) | owned(logs[1]) == set(range(partitions))
            ),
            120,
        )
        if not balanced:
            raise SystemExit(f"{name}: the group never balanced; see {logs}")
        time.sleep(args.settle)  # every partition restored and scoring
        lost = owned(logs[0])
        event_at = time.time()
        if args.action == "kill":
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            restarted = tmp / f"{cfgs[0].stem}-restarted.log"
            if variant.unit:
                streamer(cfgs[0], "release", tmp / f"{cfgs[0].stem}-release.log")
            if variant.restart:
                time.sleep(args.restart_after)
                if variant.unit:
                    streamer(cfgs[0], "check-config", None)
                procs[0] = start_daemon(cfgs[0], restarted)
            out["takeover_s"] = _takeover(scores, where, lost, event_at, args.timeout)
            if variant.restart:
                out.update(_restart_steps(restarted, event_at))
        else:
            procs[0].send_signal(signal.SIGTERM)
            handed = wait_until(lambda: lost <= owned(logs[1]), args.timeout)
            out["handover_s"] = time.time() - event_at if handed else float("nan")
            procs[0].wait(120)
            out["stop_s"] = time.time() - event_at
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(120)
        producer.join()
        scores.stop.set()
        reader.join()
    return out


def _takeover(
    scores: Scores, where: dict[str, int], lost: set[int], killed_at: float, timeout_s: float
) -> float:
    """Seconds from the kill until each lost partition had a window scored again (the last)."""
    first: dict[int, float] = {}

    def all_back() -> bool:
        for sensor, stamp in list(scores.seen):
            part = where.get(sensor)
            if part in lost and stamp > killed_at and part not in first:
                first[part] = stamp
        return lost <= first.keys()

    if not wait_until(all_back, timeout_s, 0.1):
        return float("nan")
    return max(first.values()) - killed_at


def streamer(cfg: Path, command: str, log: Path | None) -> None:
    """``streamer COMMAND --config CFG``, waited for (its output to ``log``)."""
    with open(log or os.devnull, "wb") as out:
        subprocess.run(
            [sys.executable, "-m", "streamer", command, "--config", str(cfg)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )


def _restart_steps(log: Path, killed_at: float) -> dict[str, float]:
    """Seconds from the kill to the restarted daemon's milestones (NaN: not reached)."""
    out = {}
    release = log.with_name(log.name.replace("-restarted", "-release"))
    for event in ("predecessor_released",):
        lines = log_events(log, event) + (log_events(release, event) if release.exists() else [])
        stamp = lines[0]["timestamp"] if lines else None
        out[f"{event}_s"] = (
            datetime.fromisoformat(stamp).timestamp() - killed_at if stamp else float("nan")
        )
    return out


def under_load(bootstrap: str, tmp: Path, model: Path, name: str, seconds: float) -> int:
    """Both daemons flat out on a backlog for ``seconds``; partitions lost or revoked meanwhile."""
    variant = VARIANTS[name]
    topics = make_topics(bootstrap, 4)
    group = f"load-{time.time_ns()}"
    kafka = {"group_id": group, "client": variant.client, "instance_id": variant.instance_id}
    cfgs = [
        write_config(
            tmp / f"load-{group}-{i}.yaml",
            bootstrap,
            topics,
            model,
            WINDOW,
            STRIDE,
            CHANNELS,
            kafka=kafka,
        )
        for i in range(2)
    ]
    logs = [tmp / f"{c.stem}.log" for c in cfgs]
    procs = [start_daemon(c, log) for c, log in zip(cfgs, logs, strict=True)]
    stop = threading.Event()
    # Unpaced: as fast as this process can produce, which keeps both daemons busy.
    producer = threading.Thread(
        target=live_stream, args=(bootstrap, topics["input"], 2000, 1e9, stop)
    )
    try:
        wait_until(lambda: all(owned(log) for log in logs), 120)
        marks = [len(moves(log)) for log in logs]
        producer.start()
        time.sleep(seconds)
        stop.set()
        producer.join()
        # Counted: revocations and losses (an assignment comes with each).
        return sum(
            sum(e["event"] != "partitions_assigned" for e in moves(log)[m:])
            for log, m in zip(logs, marks, strict=True)
        )
    finally:
        stop.set()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(120)


def main() -> int:
    """Run the chosen variants ``--runs`` times each; print each run and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=None, help="an existing broker (default: start one)")
    ap.add_argument("--only", action="append", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--action", choices=("kill", "stop"), default="kill")
    ap.add_argument("--restart-after", type=float, default=1.0, help="RestartSec (s)")
    ap.add_argument("--settle", type=float, default=8.0, help="steady seconds before the event")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--load", type=float, default=0.0, help="seconds under full load instead")
    args = ap.parse_args()
    names = args.only or list(VARIANTS)
    with broker_and_tmp(args.bootstrap, "takeover-") as (bootstrap, tmp):
        model = train(tmp / "model", WINDOW, STRIDE, CHANNELS)
        for name in names:
            if args.load:
                moved = under_load(bootstrap, tmp, model, name, args.load)
                print(f"{name}: {moved} partitions lost or revoked in {args.load:g} s of full load")
                continue
            runs = [one_run(bootstrap, tmp, model, name, args) for _ in range(args.runs)]
            for key in runs[0]:
                values = [r[key] for r in runs]
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(
                    f"{name} ({VARIANTS[name].note or 'dynamic'}), {args.action}: {key} "
                    f"median {statistics.median(values):.2f} s  [{shown}]",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
