"""The latency suite: from a sample's wall-clock time to its window's score published."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import numpy as np

from e2e_parts.daemons import count_scores, merged, start_daemon, write_config
from e2e_parts.stream import expected_windows, make_topics, produce_stream, train


def latency(
    bootstrap: str,
    tmp: Path,
    args: argparse.Namespace,
    produce_rate: float,
    rate_note: str,
    report: list[str],
) -> None:
    """p50/p95/p99 from sample time to score published, producing ``produce_rate`` samples/s.

    Run twice: with every sensor online from the first row, every window of every sensor
    falls due on the same row (a burst of ``sensors`` windows every ``stride`` rows, the
    worst case); with sensors coming online on different rows (``s % stride``), as they
    do in a plant, the windows fall due evenly.
    """
    sensors, channels, window, stride = args.sensors, args.channels, args.window, args.stride
    model = train(tmp / "model-lat", window, stride, channels)
    rows = max(window * 3, int(args.latency_seconds * produce_rate / sensors))
    rate_hz = produce_rate / sensors  # rows per second
    report += [
        f"## Latency at {produce_rate:,.0f} samples/s",
        "",
        f"Produced at {produce_rate:,.0f} samples/s ({rate_note}) for {rows / rate_hz:.0f} s, "
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
            tmp / f"lat-{mode}-{produce_rate:.0f}.yaml",
            bootstrap,
            topics,
            model,
            window,
            stride,
            channels,
            **merged({"kafka": {"poll_timeout_ms": 20}}, args),
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
