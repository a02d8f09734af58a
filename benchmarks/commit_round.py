"""Loop time of a commit round's bookkeeping at many sensors, without Kafka.

Every ``kafka.commit_interval_s`` a round takes, for every sensor of every partition,
the position and count of the oldest sample its next window needs (``PartitionTable.snapshot``,
which also evicts silent sensors), and then writes the changed sensors' records
(``Checkpointer.checkpoint``). With 100,000 sensors and none changed (an idle fleet, or the first
``window`` samples of every sensor) that bookkeeping is all a round costs the loop.
This builds a daemon (no Kafka contact before ``run``) over a small trained model,
registers ``--sensors`` sensors on 4 partitions with a few samples each, and times
both steps of ``--rounds`` rounds in which no sensor changed. Run it in each build,
side by side.

Usage::

    .venv/bin/python benchmarks/commit_round.py [--sensors 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from e2e_parts.daemons import write_config  # benchmarks/ is the script's directory
from e2e_parts.stream import train

from streamer.codec import to_position
from streamer.config import load_config
from streamer.daemon import Daemon
from streamer.runtime.checkpoint import Checkpointer
from streamer.runtime.partitions import Partition

_PARTITIONS = 4


class _NoSink:
    """Stands in for the producer: a round with no changed sensor produces nothing."""

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("an idle round produced a record")

    def flush(self, timeout_s: float = 30.0) -> None:
        return None


def main() -> None:
    """Time idle commit rounds and print the per-step figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=6, help="samples per sensor before timing")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        window, stride, channels = 64, 8, 8
        model = train(Path(tmp) / "model", window, stride, channels)
        topics = {k: f"unused-{k}" for k in ("input", "scores", "alerts", "dlq", "state")}
        cfg_path = write_config(
            Path(tmp) / "c.yaml", "127.0.0.1:9", topics, model, window, stride, channels
        )
        daemon = Daemon(load_config(cfg_path))
        daemon.build()
    try:
        n = args.sensors
        names = np.array([f"sensor-{i:06d}" for i in range(n)], dtype=object)
        parts = np.arange(n, dtype=np.int64) % _PARTITIONS
        table = daemon.table
        table.parts.update({p: Partition(partition=p) for p in range(_PARTITIONS)})
        table.track(names, parts)
        engine = daemon.engine
        per_part = -(-n // _PARTITIONS)
        for row in range(args.samples):
            offsets = np.arange(n, dtype=np.int64) // _PARTITIONS + row * per_part
            engine.windows.push(
                engine.index.slots(names),
                np.full(n, float(row)),
                np.zeros((n, channels), dtype=np.float32),
                to_position(parts, offsets),
            )
        for part in table.parts.values():
            part.consumed = args.samples * per_part
            part.dirty.clear()  # as after the first round: nothing changed since
        # The anchors the first round wrote: each sensor's first sample.
        first = np.arange(n, dtype=np.int64) // _PARTITIONS
        table.anchor_offset.update(zip(names.tolist(), first.tolist(), strict=True))
        writer = Checkpointer(table, engine.sensors, _NoSink(), "unused-state", daemon.stats)
        gc.collect()
        gc.freeze()  # as the daemon does after start-up
        snap, check = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            checkpoints = [table.snapshot(p) for p in range(_PARTITIONS)]
            t1 = time.perf_counter()
            for c in checkpoints:
                assert c is not None
                writer.checkpoint(c)
            t2 = time.perf_counter()
            snap.append(t1 - t0)
            check.append(t2 - t1)
            for part in table.parts.values():
                part.consumed += 1  # something consumed, so the next round runs
        print(
            f"{n:,} sensors, {args.rounds} idle rounds: snapshot median "
            f"{statistics.median(snap) * 1e3:.1f} ms (min {min(snap) * 1e3:.1f}), checkpoint "
            f"median {statistics.median(check) * 1e3:.1f} ms (min {min(check) * 1e3:.1f})"
        )
    finally:
        daemon.engine.close()


if __name__ == "__main__":
    main()
