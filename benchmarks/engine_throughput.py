"""Engine micro-benchmark: windows/s of windows + inference + thresholds + alerts on CPU.

Runs, in one process and on the same data and model:

* **engine**: streamer's engine, fed in batches of samples from many sensors
  (vectorised ring buffers, the inference worker's micro-batches, per-sensor
  thresholds and alerts);
* **naive**: a per-sample loop in the style of the original write-up: a Python
  list per sensor, and one model call per complete window, then a comparison
  with a fixed threshold.

Prints windows/s for both and their ratio. Usage::

    .venv/bin/python benchmarks/engine_throughput.py [--sensors 200] [--rows 600] [--window 64]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from streamer.config import AlertsConfig, InferenceConfig, ThresholdConfig, TrainConfig
from streamer.dev.simulate import CHANNELS, simulate
from streamer.engine import Engine
from streamer.model.checkpoint import LoadedModel, torch_module
from streamer.model.train import train_model


def engine_run(model: LoadedModel, values: np.ndarray, batch_rows: int) -> tuple[int, float]:
    """Feed rows of all sensors at once (row-major: every sensor's sample t, then t+1)."""
    sensors, rows, channels = values.shape
    keys = np.array([f"s{i}" for i in range(sensors)], dtype=object)
    windows = 0
    started = time.perf_counter()
    with Engine(
        model,
        max_gap_s=float("inf"),
        threshold=ThresholdConfig(method="spot"),
        alerts=AlertsConfig(),
        inference=InferenceConfig(max_batch=1024, chunk=64, max_wait_ms=1),
    ) as engine:
        pending = []
        for lo in range(0, rows, batch_rows):
            hi = min(rows, lo + batch_rows)
            block = values[:, lo:hi].transpose(1, 0, 2).reshape(-1, channels)
            ts = np.repeat(np.arange(lo, hi, dtype=np.float64), sensors)
            pos = np.arange(lo * sensors, hi * sensors, dtype=np.int64)
            pending.append(engine.submit(np.tile(keys, hi - lo), ts, block, pos))
            # Keep a couple of batches in flight, as the daemon does.
            while len(pending) > 2:
                windows += len(engine.complete(pending.pop(0)))
        for p in pending:
            windows += len(engine.complete(p))
    return windows, time.perf_counter() - started


def naive_run(
    model: LoadedModel, values: np.ndarray, threshold: float, limit_s: float
) -> tuple[int, float]:
    """One sample at a time, one model call per window (stops after ``limit_s``)."""
    sensors, rows, _ = values.shape
    window, stride = model.window, model.stride
    buffers: dict[int, list[np.ndarray]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    module = torch_module(model)
    windows = 0
    alarms = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for t in range(rows):
            for s in range(sensors):
                buf = buffers[s]
                buf.append(values[s, t])
                if len(buf) > window:
                    buf.pop(0)
                counts[s] += 1
                if counts[s] >= window and (counts[s] - window) % stride == 0:
                    x = torch.tensor(np.array(buf, dtype=np.float32)).unsqueeze(0)
                    score, _ = module(x)
                    alarms += int(float(score) > threshold)
                    windows += 1
            if time.perf_counter() - started > limit_s:
                break
    return windows, time.perf_counter() - started


def main() -> None:
    """Run both pipelines and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=200)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--preset", default="conv1d")
    ap.add_argument(
        "--batch-rows", type=int, default=20, help="rows of all sensors per engine batch"
    )
    ap.add_argument("--naive-seconds", type=float, default=20.0)
    args = ap.parse_args()

    plant = simulate(args.sensors, args.rows, seed=1)
    train = simulate(4, 2000, seed=2).values.reshape(-1, len(CHANNELS))
    cfg = TrainConfig(preset=args.preset, epochs=3, hidden=32, latent=16)
    res = train_model([train], list(CHANNELS), args.window, cfg, progress=False)
    model = LoadedModel(
        res.module, "bench", CHANNELS, args.window, args.stride, res.calibration, {}, Path(".")
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}, "
        f"{args.sensors} sensors x {args.rows} rows x {len(CHANNELS)} channels, "
        f"window {args.window}, stride {args.stride}"
    )
    e_windows, e_s = engine_run(model, plant.values, args.batch_rows)
    n_windows, n_s = naive_run(
        model, plant.values, float(np.quantile(res.calibration, 0.99)), args.naive_seconds
    )
    e_rate, n_rate = e_windows / e_s, n_windows / n_s
    print(f"engine: {e_windows} windows in {e_s:.2f} s = {e_rate:,.0f} windows/s")
    print(f"naive:  {n_windows} windows in {n_s:.2f} s = {n_rate:,.0f} windows/s")
    print(f"ratio engine/naive: {e_rate / n_rate:.1f}x")


if __name__ == "__main__":
    main()
