"""Inference worker alone: windows/s at several batch sizes, on CUDA when present.

On a machine without CUDA it runs the same on the CPU and says so. It also
checks, on the device it runs on, that a window's score does not depend on how
it was batched, and (on CUDA) how far mixed-precision scores are from the CPU's.

Usage::

    .venv/bin/python benchmarks/gpu_inference.py [--preset conv1d] [--window 64] [--channels 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from streamer.config import InferenceConfig
from streamer.inference import InferenceWorker
from streamer.model.checkpoint import LoadedModel, torch_module
from streamer.model.networks import Architecture, ScoringModel
from streamer.model.train import score_windows


def make_model(preset: str, window: int, channels: int) -> LoadedModel:
    """An untrained model of the given shape (speed does not depend on the weights)."""
    torch.manual_seed(0)
    arch = Architecture(preset, window, channels, 32, 16, False)
    module = ScoringModel(arch, torch.zeros(channels), torch.ones(channels)).eval()
    names = tuple(f"c{i}" for i in range(channels))
    return LoadedModel(module, f"{preset}-bench", names, window, 1, np.ones(16), {}, Path("."))


def main() -> None:
    """Print windows/s per batch size and the determinism and precision checks."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--preset", default="conv1d")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--windows", type=int, default=200_000, help="windows per measurement")
    ap.add_argument("--batches", default="64,256,1024,4096,16384")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device: measuring the CPU)"
    print(
        f"device: {name}; torch {torch.__version__}; preset {args.preset}, "
        f"window {args.window}, channels {args.channels}"
    )
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4096, args.window, args.channels)).astype(np.float32)

    for batch in (int(b) for b in args.batches.split(",")):
        model = make_model(args.preset, args.window, args.channels)
        worker = InferenceWorker(
            model,
            InferenceConfig(max_batch=batch, chunk=min(batch, 1024), max_wait_ms=1, queue_size=8),
            device,
        ).start()
        total = args.windows if cuda else min(args.windows, 20_000)
        reps = max(1, total // batch)
        block = np.resize(data, (batch, args.window, args.channels))
        worker.submit(block).result()  # warm-up: kernels, allocator, cuDNN plans
        started = time.perf_counter()
        futures = [worker.submit(block) for _ in range(reps)]
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - started
        worker.close()
        print(f"batch {batch:6d}: {reps * batch / elapsed:12,.0f} windows/s")

    model = make_model(args.preset, args.window, args.channels)
    worker = InferenceWorker(
        model, InferenceConfig(max_batch=512, chunk=64, max_wait_ms=0), device
    ).start()
    x = data[:1000]
    whole = worker.submit(x).result().scores
    parts = [worker.submit(x[i : i + 37]) for i in range(0, 1000, 37)]
    pieces = np.concatenate([p.result().scores for p in parts])
    worker.close()
    print(f"bit-identical across batchings on {device}: {bool(np.array_equal(whole, pieces))}")
    if cuda:
        cpu_model = make_model(args.preset, args.window, args.channels)
        ref, _ = score_windows(torch_module(cpu_model), x)
        rel = np.abs(whole - ref) / np.maximum(np.abs(ref), 1e-12)
        print(
            f"mixed precision vs CPU float32: median relative difference {np.median(rel):.2e}, "
            f"max {rel.max():.2e}"
        )


if __name__ == "__main__":
    main()
