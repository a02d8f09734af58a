"""Aligned bursts without Kafka: the daemon's own work when every sensor closes a window at once.

A plant's SCADA scan samples every sensor on one clock, so each stride a whole row of
windows falls due together. This drives the daemon's ingest, engine and publisher (as
``streamer run`` wires them, with a producer that only counts) with rows of one sample
per sensor, and times each row that completes a window for every sensor: from the
row's batch handed to ingest until its last score record is produced, split into the
main thread's work before inference, the wait for the scores, and thresholds, alerts,
encoding and produce. ``--profile`` adds a cProfile of the main thread's bursts.

Usage::

    .venv/bin/python benchmarks/burst.py [--sensors 1000] [--bursts 40] [--backend auto]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from e2e_parts.daemons import write_config  # benchmarks/ is the script's directory
from e2e_parts.stream import stream_rows, train

from streamer.config import load_config
from streamer.daemon import Daemon
from streamer.kafka.source import Consumed
from streamer.runtime.ingest import Ingest
from streamer.runtime.partitions import Partition
from streamer.runtime.publisher import Publisher

_PARTITIONS = 4


class _CountingSink:
    """Stands in for the producer: counts records and calls each delivery hook at once."""

    def __init__(self) -> None:
        self.records = 0

    def produce(self, *_args: Any, on_delivered: Any = None, **_kwargs: Any) -> None:
        """Count one record and report it delivered."""
        self.records += 1
        if on_delivered is not None:
            on_delivered()

    def produce_many(
        self,
        topic: str,
        values: Sequence[bytes],
        keys: Sequence[str],
        on_last_delivered: Callable[[], None] | None = None,
    ) -> None:
        """``produce`` of each record, the last one with ``on_last_delivered``."""
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            last = i == len(values) - 1
            self.produce(topic, value, key=key, on_delivered=on_last_delivered if last else None)


def _rows(sensors: int, channels: int, rows: int) -> list[Consumed]:
    """One consumed batch per row: a sample of every sensor, key = sensor id."""
    names = [f"sensor-{i:06d}" for i in range(sensors)]
    keys = [n.encode() for n in names]
    parts = np.arange(sensors, dtype=np.int64) % _PARTITIONS
    out = []
    rng = np.random.default_rng(0)
    for r, values in enumerate(stream_rows(range(rows), sensors, channels, rng)):
        docs = [
            orjson.dumps({"sensor": n, "ts": 1.7e9 + r, "values": v})
            for n, v in zip(names, values.round(5).tolist(), strict=True)
        ]
        offsets = np.arange(sensors, dtype=np.int64) // _PARTITIONS + r * (sensors // _PARTITIONS)
        out.append(Consumed(parts, offsets, list(docs), list(keys)))
    return out


def main() -> None:
    """Time aligned bursts and print the per-burst figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--chunk", type=int, default=None, help="inference.chunk override")
    ap.add_argument("--threads", type=int, default=0, help="inference.threads (0: the default)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    window, stride, channels = args.window, args.stride, args.channels
    rows = window + stride * args.bursts
    with tempfile.TemporaryDirectory() as tmp:
        model = train(Path(tmp) / "model", window, stride, channels)
        topics = {k: f"unused-{k}" for k in ("input", "scores", "alerts", "dlq", "state")}
        cfg_path = write_config(
            Path(tmp) / "c.yaml",
            "127.0.0.1:9",
            topics,
            model,
            window,
            stride,
            channels,
            model={"backend": args.backend},
            inference={
                "threads": args.threads,
                **({"chunk": args.chunk} if args.chunk else {}),
            },
        )
        cfg = load_config(cfg_path)
        daemon = Daemon(cfg)
        daemon.build()
    engine, table = daemon.engine, daemon.table
    table.parts.update({p: Partition(partition=p) for p in range(_PARTITIONS)})
    sink = _CountingSink()
    publisher = Publisher(
        sink,
        cfg.topics,
        daemon.channels,
        daemon.metrics,
        daemon.stats,
        complete=engine.complete,
        on_published=lambda: None,
        on_scored=table.changed,
        dead_letter_value_bytes=100_000,
    )
    ingest = Ingest(cfg, daemon.decoder, table, engine, publisher, daemon.metrics, daemon.stats)
    batches = _rows(args.sensors, channels, rows)
    before, wait, after, total = [], [], [], []
    profile = cProfile.Profile() if args.profile else None
    for r, batch in enumerate(batches):
        due = r >= window - 1 and (r - window + 1) % stride == 0
        if profile is not None and due and r > window:
            profile.enable()
        t0 = time.perf_counter()
        ingest.process(batch)
        t1 = time.perf_counter()
        waited = 0.0
        while publisher.pending:
            w0 = time.perf_counter()
            publisher.pending[0].future.result()
            waited += time.perf_counter() - w0
            publisher.publish_done(0.0)
        t2 = time.perf_counter()
        if profile is not None:
            profile.disable()
        # As the daemon's loop does once nothing is in flight, before the next row.
        engine.thresholds.settle(1.0)
        if due and r > window:  # the first burst also traces and warms the model
            before.append(t1 - t0)
            wait.append(waited)
            after.append(t2 - t1 - waited)
            total.append(t2 - t0)
    engine.close()

    def ms(xs: list[float], q: float) -> str:
        return f"{float(np.quantile(np.asarray(xs) * 1000, q)):.1f}"

    print(
        f"{args.sensors:,} sensors, window {window}, stride {stride}, "
        f"backend {engine.worker.backend}: {len(total)} bursts of {args.sensors:,} windows"
    )
    print("| part | median ms | p90 ms | max ms |")
    print("|---|---|---|---|")
    for name, xs in (
        ("decode, rings, submit", before),
        ("waiting for scores", wait),
        ("thresholds, alerts, encode, produce", after),
        ("burst total", total),
    ):
        print(f"| {name} | {statistics.median(xs) * 1000:.1f} | {ms(xs, 0.9)} | {ms(xs, 1.0)} |")
    print(f"records produced: {sink.records:,}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
