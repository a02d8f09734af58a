"""Uptime, accelerated: a live stream, the daemon restarted every few minutes.

What a restart pays grows with what the state topic holds uncompacted: every commit
round writes each changed sensor's state, and a restore reads every version the broker
has not compacted yet. At thousands of sensors minutes of uptime write as many state
records as hours at a few hundred, so restarts a few minutes apart show what days do::

    .venv/bin/python benchmarks/soak.py --sensors 10000 --rate 20000 --interval 90 --restarts 4
    .venv/bin/python benchmarks/soak.py ... --state-topic broker-defaults   # the old topic

With ``--cycles N`` a second daemon then joins and leaves N times (``--cycle-s`` seconds
each way) while the first runs on: for each cycle the first daemon's resident memory once
it has its partitions back, and the p99 latency (score published minus the window's last
sample) of the partitions it kept throughout, during the join and during the takeover,
against the same partitions' steady p99 before the first join::

    .venv/bin/python benchmarks/soak.py --sensors 10000 --rate 20000 --restarts 0 --cycles 8

``--tail N`` ends the run with the tail a long uptime leaves: the daemon is stopped, the
state topic's records are written again until it holds N more, and the time the next
start takes to restore them (and how often it said how far it got) is reported. With
``--state-topic broker-defaults`` nothing of that tail is compacted away meanwhile::

    .venv/bin/python benchmarks/soak.py --state-topic broker-defaults --restarts 1 --tail 3000000

``--state-topic daemon`` lets the daemon create the state topic (its bounded-tail
settings); ``broker-defaults`` creates it beforehand with ``cleanup.policy=compact`` and
nothing else, as a topic made by hand often is. For each restart the report gives the
uptime before it, the state records the new process read back (all partitions), the
slowest partition's restore and the time from start until every partition is restored.

Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parent))

# e2e_parts is the e2e benchmark's package beside this script, importable once its folder
# is on the path (above).
from e2e_parts.daemons import log_events, start_daemon, stop_daemon, write_config
from e2e_parts.stream import (
    broker_and_tmp,
    client,
    make_topics,
    produce_stream,
    read_all,
    topic_records,
    train,
)


def main() -> None:
    """Run the soak and print a Markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--sensors", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=20_000, help="samples/s produced")
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--interval", type=float, default=90.0, help="seconds between restarts")
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument(
        "--last-interval", type=float, default=None, help="uptime before the last restart, s"
    )
    ap.add_argument("--state-topic", choices=["daemon", "broker-defaults"], default="daemon")
    ap.add_argument("--cycles", type=int, default=0, help="join and leave cycles of a second")
    ap.add_argument("--cycle-s", type=float, default=40.0, help="seconds it stays, and away")
    ap.add_argument("--tail", type=int, default=0, help="state records to write before a start")
    ap.add_argument(
        "--no-snapshot",
        action="store_true",
        help="no local state snapshot (kafka.state_snapshot_dir unset): every restore reads "
        "the state topic",
    )
    args = ap.parse_args()

    with broker_and_tmp(args.bootstrap, "streamer-soak-") as (bootstrap, tmp):
        report = run(bootstrap, tmp, args)
    print("\n".join(report))


def run(bootstrap: str, tmp: Path, args: argparse.Namespace) -> list[str]:
    """The soak itself; returns the report's lines."""
    model = train(tmp / "model", args.window, args.stride, args.channels)
    topics = make_topics(bootstrap, args.partitions)
    topics["state"] = f"soak-state-{time.time_ns()}"
    if args.state_topic == "broker-defaults":
        admin = AdminClient(client(bootstrap))
        spec = NewTopic(
            topics["state"], num_partitions=args.partitions, config={"cleanup.policy": "compact"}
        )
        admin.create_topics([spec])[topics["state"]].result(60)
    cfg = write_config(
        tmp / "soak.yaml",
        bootstrap,
        topics,
        model,
        args.window,
        args.stride,
        args.channels,
        kafka={
            "create_topics": True,
            **({} if args.no_snapshot else {"state_snapshot_dir": str(tmp / "snapshots")}),
        },
    )
    total_s = args.interval * (args.restarts + 1) + 120 + args.cycles * (2 * args.cycle_s + 60)
    total_s += max((args.last_interval or 0) - args.interval, 0)
    rows_per_s = args.rate / args.sensors
    producer = threading.Thread(
        target=produce_stream,
        args=(bootstrap, topics["input"], args.sensors, int(total_s * rows_per_s), args.channels),
        kwargs={"rate_hz": rows_per_s, "wall_clock": True},
        daemon=True,
    )
    producer.start()
    lines = [
        f"# Soak: {args.sensors:,} sensors, {args.rate:,.0f} samples/s, {args.partitions} "
        f"partitions, a restart every {args.interval:.0f} s, state topic: {args.state_topic}, "
        f"local snapshots: {'no' if args.no_snapshot else 'yes'}",
        "",
        "| restart | uptime before s | state records written | restore records "
        "(topic / snapshot) | slowest restore s | start to restored s |",
        "|---|---|---|---|---|---|",
    ]
    log = tmp / "run-0.log"
    proc = start_daemon(cfg, log)
    wait_restored(log, args.partitions)
    for i in range(1, args.restarts + 1):
        up = time.monotonic()
        last = i == args.restarts and args.last_interval is not None
        time.sleep(args.last_interval if last else args.interval)
        uptime = time.monotonic() - up
        stop_daemon(proc)
        held = topic_records(bootstrap, topics["state"])
        log = tmp / f"run-{i}.log"
        proc = start_daemon(cfg, log)
        ready_s = wait_restored(log, args.partitions)
        restored = log_events(log, "state_restored")
        records = sum(int(e.get("records", 0)) for e in restored)
        known = sum(int(e.get("from_snapshot", 0)) for e in restored)
        slowest = max((float(e["seconds"]) for e in restored), default=float("nan"))
        lines.append(
            f"| {i} | {uptime:.0f} | {held:,} | {records:,} / {known:,} | {slowest:.1f} "
            f"| {ready_s:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    if args.cycles:
        lines += cycles(bootstrap, tmp, cfg, topics["scores"], proc, log, args)
    if args.tail:
        stop_daemon(proc)
        written = rewrite_state(bootstrap, topics["state"], args.tail)
        log = tmp / "run-tail.log"
        proc = start_daemon(cfg, log)
        restored_s = wait_restored(log, args.partitions, timeout_s=1800)
        read = sum(int(e.get("records", 0)) for e in log_events(log, "state_restored"))
        told = len(log_events(log, "state_restore_progress"))
        failed = log_events(log, "daemon_failed")
        lines += [
            "",
            f"After {written:,} state records more (written again, as a long uptime leaves "
            f"them): {read:,} read, every partition restored {restored_s:.1f} s after the "
            f"start, {told} progress lines, "
            + (f"failed: {failed[0].get('error')}" if failed else "no failure"),
        ]
    stop_daemon(proc)
    return lines


def wait_restored(log: Path, partitions: int, timeout_s: float = 600) -> float:
    """Seconds until the daemon logging to ``log`` has restored ``partitions`` (NaN: never)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if log.exists():
            done = log_events(log, "partitions_restored")
            if sum(len(e["partitions"]) for e in done) >= partitions:
                return time.monotonic() - started
            if log_events(log, "daemon_failed"):
                break
        time.sleep(0.1)
    return float("nan")


def rewrite_state(bootstrap: str, topic: str, records: int) -> int:
    """Write the topic's records again, in turn, until ``records`` more are written."""
    held = [(m.partition() or 0, m.key(), m.value()) for m in read_all(bootstrap, topic, "tail")]
    producer = Producer(client(bootstrap, **{"linger.ms": 50, "compression.type": "lz4"}))
    written = 0
    while held and written < records:
        for p, key, value in held[: records - written]:
            while True:
                try:
                    producer.produce(topic, value, key, partition=p)
                    break
                except BufferError:
                    producer.poll(0.1)
        written += min(len(held), records - written)
    producer.flush(600)
    return written


def rss_mb(pid: int) -> float:
    """Resident memory of a process now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_events(log: Path, event: str, count: int, timeout_s: float = 600) -> float:
    """Wall-clock time once ``log`` holds ``count`` ``event`` lines (NaN if it never does)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if log.exists() and len(log_events(log, event)) >= count:
            return time.time()
        time.sleep(0.1)
    return float("nan")


def cycles(
    bootstrap: str,
    tmp: Path,
    cfg: Path,
    scores: str,
    first: subprocess.Popen[bytes],
    first_log: Path,
    args: argparse.Namespace,
) -> list[str]:
    """A second daemon joins and leaves ``args.cycles`` times; RSS and kept partitions' p99."""
    # The steady slice starts once every sensor has filled its first window.
    time.sleep(args.window * args.sensors / args.rate)
    time.sleep(args.cycle_s)
    slices: list[tuple[str, float, float]] = [("steady", time.time() - args.cycle_s, time.time())]
    rss = []
    kept: set[int] = set()
    restored = len(log_events(first_log, "partitions_restored"))
    for i in range(1, args.cycles + 1):
        log = tmp / f"second-{i}.log"
        joined = time.time()
        second = start_daemon(cfg, log)
        wait_events(log, "partitions_restored", 1)
        revoked = log_events(first_log, "partitions_revoked")
        kept = set(revoked[-1]["owned"]) if revoked else kept
        time.sleep(args.cycle_s)
        slices.append((f"{i}: join", joined, joined + args.cycle_s))
        left = time.time()
        stop_daemon(second)
        restored += 1
        back = wait_events(first_log, "partitions_restored", restored)
        time.sleep(args.cycle_s)
        slices.append((f"{i}: takeover ({back - left:.1f} s)", left, left + args.cycle_s))
        rss.append(rss_mb(first.pid))
        print(f"cycle {i}: RSS {rss[-1]:.0f} MiB, kept {sorted(kept)}", file=sys.stderr, flush=True)
    lat = score_latencies(bootstrap, scores, kept, slices[0][1])
    lines = [
        "",
        f"## {args.cycles} join and leave cycles of a second daemon ({args.cycle_s:.0f} s each "
        f"way); the first keeps partitions {sorted(kept)} throughout",
        "",
        "| slice | windows of kept partitions | p99 ms | p99 / steady | RSS after, MiB |",
        "|---|---|---|---|---|",
    ]
    steady = float("nan")
    for n, (name, lo, hi) in enumerate(slices):
        sel = lat[(lat[:, 0] >= lo) & (lat[:, 0] < hi), 1] * 1000
        p99 = float(np.percentile(sel, 99)) if sel.size else float("nan")
        steady = p99 if n == 0 else steady
        after = f"{rss[n // 2 - 1]:.0f}" if n and n % 2 == 0 else ""
        lines.append(f"| {name} | {sel.size:,} | {p99:.1f} | {p99 / steady:.2f} | {after} |")
    lines.append("")
    lines.append(
        f"RSS after the last cycle / after the first: {rss[-1] / rss[0]:.3f} "
        f"({rss[0]:.0f} -> {rss[-1]:.0f} MiB)"
    )
    return lines


def score_latencies(bootstrap: str, topic: str, partitions: set[int], since: float) -> Any:
    """(published, latency s) of every score of ``partitions`` published after ``since``."""
    out: list[tuple[float, float]] = []
    for m in read_all(bootstrap, topic, "soak-latency"):
        stamp = m.timestamp()[1] / 1000.0
        if stamp < since:
            continue
        rec = orjson.loads(m.value() or b"")
        if rec["partition"] in partitions:
            out.append((stamp, stamp - rec["window_end"]))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


if __name__ == "__main__":
    main()
