"""Uptime, accelerated: a live stream, the daemon restarted every few minutes.

What a restart pays grows with what the state topic holds uncompacted: every commit
round writes each changed sensor's state, and a restore reads every version the broker
has not compacted yet. At thousands of sensors minutes of uptime write as many state
records as hours at a few hundred, so restarts a few minutes apart show what days do::

    .venv/bin/python benchmarks/soak.py --sensors 10000 --rate 20000 --interval 90 --restarts 4
    .venv/bin/python benchmarks/soak.py ... --state-topic broker-defaults   # the old topic

``--state-topic daemon`` lets the daemon create the state topic (its bounded-tail
settings); ``broker-defaults`` creates it beforehand with ``cleanup.policy=compact`` and
nothing else, as a topic made by hand often is. For each restart the report gives the
uptime before it, the state records the new process read back (all partitions), the
slowest partition's restore and the time from start to ready.

Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

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
    topic_records,
    train,
)


def wait_ready(log: Path, timeout_s: float = 600) -> float:
    """Seconds until the daemon logging to ``log`` says it is ready (NaN if it never does)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if log.exists() and log_events(log, "daemon_ready"):
            return time.monotonic() - started
        time.sleep(0.1)
    return float("nan")


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
    ap.add_argument("--state-topic", choices=["daemon", "broker-defaults"], default="daemon")
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
        kafka={"create_topics": True},
    )
    total_s = args.interval * (args.restarts + 1) + 120
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
        f"partitions, a restart every {args.interval:.0f} s, state topic: {args.state_topic}",
        "",
        "| restart | uptime before s | state records written | restore records | "
        "slowest restore s | start to ready s |",
        "|---|---|---|---|---|---|",
    ]
    log = tmp / "run-0.log"
    proc = start_daemon(cfg, log)
    wait_ready(log)
    for i in range(1, args.restarts + 1):
        up = time.monotonic()
        time.sleep(args.interval)
        uptime = time.monotonic() - up
        stop_daemon(proc)
        held = topic_records(bootstrap, topics["state"])
        log = tmp / f"run-{i}.log"
        proc = start_daemon(cfg, log)
        ready_s = wait_ready(log)
        restored = log_events(log, "state_restored")
        records = sum(int(e.get("records", 0)) for e in restored)
        slowest = max((float(e["seconds"]) for e in restored), default=float("nan"))
        lines.append(
            f"| {i} | {uptime:.0f} | {held:,} | {records:,} | {slowest:.1f} | {ready_s:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    stop_daemon(proc)
    return lines


if __name__ == "__main__":
    main()
