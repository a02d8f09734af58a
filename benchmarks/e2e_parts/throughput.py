"""The throughput suite: the daemon between a ceiling (consume and decode only) and a floor."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import torch
from confluent_kafka import Producer

from e2e_parts.daemons import daemon_run, overrides, write_config
from e2e_parts.paired import side_by_side
from e2e_parts.stream import (
    client,
    consumer_from_start,
    expected_windows,
    make_topics,
    produce_stream,
    steady_samples,
    train,
)
from streamer.model.checkpoint import load_checkpoint, torch_module


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


def floor(
    bootstrap: str, topic: str, out_topic: str, model_dir: Path, seconds: float, warmup: int
) -> float:
    """Samples/s of a naive per-message pipeline (one model call per window).

    The clock starts after ``warmup`` messages (every sensor's first window), so the
    rate is the steady state, where a window is due every ``stride`` samples, as in
    the daemon's first-to-last-score rate.
    """
    model = load_checkpoint(model_dir)
    module = torch_module(model)
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
