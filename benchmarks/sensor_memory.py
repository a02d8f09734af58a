"""Per-sensor memory of the threshold state, measured with ``tracemalloc``.

A ``ThresholdBank`` starts every sensor from a copy of the calibrated prototype, so at
100,000 sensors its per-sensor bytes are a large part of the daemon's memory. This
calibrates a prototype on ``--calibration`` exponential scores (the size of
``train.calibration_samples``), steps ``--sensors`` sensors ``--windows`` windows each
in batches of ``--batch`` scores across sensors, as the daemon does, and prints the
bytes per sensor held by the bank and the scores/s of the steps (``tracemalloc`` slows
them; the rate is for comparing builds, not an absolute figure).

Usage::

    .venv/bin/python benchmarks/sensor_memory.py [--sensors 100000] [--windows 5]
        [--method dspot] [--calibration 5000] [--batch 2000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from streamer.config import ThresholdConfig
from streamer.scoring.thresholds import ThresholdBank, make_threshold


def main() -> None:
    """Measure and print the threshold bank's bytes per sensor."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=100_000)
    ap.add_argument("--windows", type=int, default=5, help="windows stepped per sensor")
    ap.add_argument("--method", default="dspot", choices=["spot", "dspot", "quantile"])
    ap.add_argument("--calibration", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=2000)
    args = ap.parse_args()

    cfg = ThresholdConfig(method=args.method, risk=1e-3)
    rng = np.random.default_rng(0)
    proto = make_threshold(cfg.method, **cfg.params())
    proto.calibrate(rng.exponential(size=args.calibration))
    names = [f"s{i:06d}" for i in range(args.sensors)]
    scores = rng.exponential(size=(args.windows, args.sensors))

    tracemalloc.start()
    bank = ThresholdBank(proto)
    started = time.perf_counter()
    for w in range(args.windows):
        for lo in range(0, args.sensors, args.batch):
            bank.step(names[lo : lo + args.batch], scores[w, lo : lo + args.batch])
    seconds = time.perf_counter() - started
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"{args.method}: {args.sensors:,} sensors x {args.windows} windows: "
        f"{held / args.sensors:,.0f} bytes per sensor ({held / 2**20:,.1f} MiB), "
        f"{args.sensors * args.windows / seconds:,.0f} scores/s under tracemalloc"
    )


if __name__ == "__main__":
    main()
