"""Many sensors: peak memory and throughput by fleet and window size, and restart times."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from e2e_parts import daemons
from e2e_parts.daemons import (
    count_scores,
    daemon_run,
    log_events,
    merged,
    peak_rss_mb,
    start_daemon,
    stop_daemon,
    write_config,
)
from e2e_parts.stream import (
    expected_windows,
    make_topics,
    produce_stream,
    steady_samples,
    topic_records,
    train,
)


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


def restart(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """Shutdown and restart times with every sensor's state to write and restore."""
    rows_out = [
        "| sensors | state records | stop s (SIGTERM to exit) | start to restored s "
        "| restore s | sensors restored | peak RSS MiB at restored |",
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
        logs = daemons.DAEMON_LOG_DIR or tmp
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
            # Ready to score every partition: the restore goes on beside the loop, after
            # daemon_ready, until each partition is restored.
            done = log_events(second_log, "partitions_restored")
            if sum(len(e["partitions"]) for e in done) >= args.partitions:
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
