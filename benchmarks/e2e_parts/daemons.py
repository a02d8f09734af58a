"""The daemon under test: its config, its process, and the scores it publishes."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from e2e_parts.stream import SECURED, consumer_from_start

REPO = Path(__file__).resolve().parents[2]

# --daemon-logs (set by e2e.py's main): keep each daemon's log here.
DAEMON_LOG_DIR: Path | None = None


def write_config(
    path: Path,
    bootstrap: str,
    topics: dict[str, str],
    model_path: Path,
    window: int,
    stride: int,
    channels: int,
    /,
    **extra: Any,
) -> Path:
    """The daemon's config; ``extra`` sections are merged over the defaults section by
    section (``model={"backend": "torch"}`` keeps the model path)."""
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
        "model": {"path": str(model_path), "device": "auto"},
        "threshold": {"method": "dspot", "risk": 1e-3, "level": 0.98},
        "metrics": {"enabled": False, "stats_interval_s": 5.0},
    }
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(data))
    return path


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
