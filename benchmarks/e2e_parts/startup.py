"""Start-up: process start to the first score with the input already waiting, by backend,
and the takeover after a SIGKILL.

Each run starts ``streamer run`` on a fresh group (the input topic holds
``--sensors`` x ``--startup-rows`` samples already) and takes the first score's
broker timestamp (CreateTime, set by the daemon's producer) minus the wall clock just
before the process was started. The daemon's own ``startup`` line gives the phases.
The takeover runs ``benchmarks/takeover.py``'s ``unit`` variant ``--startup-runs``
times: two daemons on a live stream, one SIGKILLed and handled as the shipped unit
handles it; from the kill until each of its partitions has a window scored again.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e2e_parts import daemons
from e2e_parts.daemons import log_events, merged, start_daemon, stop_daemon, write_config
from e2e_parts.stream import consumer_from_start, make_topics, produce_stream, train

PHASES = (
    "imports",
    "model_load",
    "cluster_checks",
    "group_join",
    "state_restore",
    "first_fetch",
    "first_score",
)


def first_score_at(
    bootstrap: str, topic: str, timeout_s: float, proc: subprocess.Popen[bytes]
) -> float | None:
    """The broker timestamp (epoch seconds) of the first record on ``topic``, or None."""
    consumer = consumer_from_start(bootstrap, topic, "startup")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                return float(msg.timestamp()[1]) / 1000.0
    finally:
        consumer.close()
    return None


def _startup_line(log: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log_events(log, "startup")
        if lines:
            return lines[0]
        time.sleep(0.05)
    return {}


def one_start(
    bootstrap: str, cfg: Path, log: Path, scores: str
) -> tuple[float, dict[str, Any], float]:
    """Seconds from process start to first score, the ``startup`` line, and stop seconds."""
    started = time.time()
    proc = start_daemon(cfg, log)
    try:
        first = first_score_at(bootstrap, scores, 120.0, proc)
        line = _startup_line(log)
    finally:
        stop_s = stop_daemon(proc, 60)
    return (first - started if first is not None else float("nan")), line, stop_s


def startup(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """Process start to first score, median of ``--startup-runs``, per backend."""
    window, stride, channels = args.window, args.stride, args.channels
    model = train(tmp / "m-startup", window, stride, channels)
    base = make_topics(bootstrap, args.partitions)
    produce_stream(bootstrap, base["input"], args.sensors, args.startup_rows, channels)
    logs = daemons.DAEMON_LOG_DIR or tmp
    logs.mkdir(parents=True, exist_ok=True)
    rows_out = [
        "| backend | run | start to first score s | daemon's own total s | "
        + " | ".join(PHASES)
        + " |",
        "|---|---|---|---|" + "---|" * len(PHASES),
    ]
    medians: list[str] = []
    for backend in args.startup_backends.split(","):
        firsts = []
        for i in range(args.startup_runs):
            topics = {**make_topics(bootstrap, args.partitions), "input": base["input"]}
            cfg = write_config(
                tmp / f"startup-{backend}-{i}.yaml",
                bootstrap,
                topics,
                model,
                window,
                stride,
                channels,
                **merged({"model": {"backend": backend}}, args),
            )
            first, line, _ = one_start(
                bootstrap, cfg, logs / f"startup-{backend}-{i}.log", topics["scores"]
            )
            firsts.append(first)
            phases = line.get("phases", {})
            rows_out.append(
                f"| {backend} | {i + 1} | {first:.2f} | {line.get('seconds', float('nan')):.2f} | "
                + " | ".join(f"{phases.get(p, float('nan')):.2f}" for p in PHASES)
                + " |"
            )
            print(rows_out[-1], file=sys.stderr)
        medians.append(f"{backend}: median {statistics.median(firsts):.2f} s")
    report += [
        "## Start-up",
        "",
        f"{args.sensors:,} sensors x {args.startup_rows} samples waiting, "
        f"{args.partitions} partitions, a fresh group each run. " + "; ".join(medians) + ".",
        "",
        *rows_out,
        "",
        *takeover_after_kill(bootstrap, tmp, args.startup_runs),
    ]


def takeover_after_kill(bootstrap: str, tmp: Path, runs: int) -> list[str]:
    """The report's lines on ``runs`` takeovers after SIGKILL with the shipped unit."""
    # benchmarks/takeover.py, beside e2e.py: the script's folder is on the path.
    import takeover

    model = train(tmp / "m-takeover", takeover.WINDOW, takeover.STRIDE, takeover.CHANNELS)
    opts = argparse.Namespace(action="kill", restart_after=1.0, settle=8.0, timeout=120.0)
    seconds = []
    for _ in range(runs):
        seconds.append(takeover.one_run(bootstrap, tmp, model, "unit", opts)["takeover_s"])
        print(f"takeover after SIGKILL: {seconds[-1]:.2f} s", file=sys.stderr)
    shown = ", ".join(f"{s:.2f}" for s in seconds)
    return [
        "Takeover after SIGKILL (two daemons, 4 partitions, 40 sensors at 20 Hz; the killed "
        "one released and restarted after 1 s, as `deploy/streamer.service` does): "
        f"median **{statistics.median(seconds):.2f} s** ({shown}).",
        "",
    ]
