"""Which backend scores, on which device, and the runner that does it; no torch here.

``model.backend``: ``torch`` runs the checkpoint's torch module (CPU or CUDA);
``onnxruntime`` runs its ONNX graph on the CPU; ``auto`` (the default) takes ONNX
Runtime on the CPU when the checkpoint has a graph and torch otherwise. The choice is
made from the sidecar and a look at ``/dev``, before either library is imported, so a
CPU daemon never pays for ``import torch`` (seconds) at start-up.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from streamer.config import InferenceConfig
from streamer.errors import ConfigError
from streamer.model.artifact import LoadedModel, has_onnx, read_sidecar

__all__ = [
    "BACKENDS",
    "Runner",
    "Segments",
    "choose_backend",
    "cuda_visible",
    "load_model",
    "make_runner",
    "pad_to_chunks",
    "resolve_device",
    "usable_cpus",
]

BACKENDS = ("auto", "torch", "onnxruntime")

Segments = Iterator[tuple[NDArray[np.float64], NDArray[np.float64]]]


class Runner(Protocol):
    """Scores raw windows with a loaded model, for the inference worker's thread."""

    backend: str

    def prepare(self, model: LoadedModel) -> None:
        """Make ``model`` ready to score here (e.g. move it to the device)."""

    def traced(self, model: LoadedModel) -> bool:
        """Whether ``model`` runs compiled (a checked trace) rather than eagerly."""

    def segments(self, model: LoadedModel, windows: NDArray[np.float32]) -> Segments:
        """Scores and channel errors of ``windows``, in order, a segment at a time."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as systemd's CPUAffinity sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(cfg: InferenceConfig) -> int:
    """ONNX Runtime's intra-op threads: ``inference.threads``, else every usable CPU.

    Its threads sleep between forward passes (no spinning), so they share the consumer
    thread's core only while a chunk runs: on 2 cores, 2 threads took 5-12 ms off the
    aligned-burst p99 against 1, at the same throughput. Torch's runner keeps a core
    for the consumer thread (its OpenMP threads spin).
    """
    return cfg.threads if cfg.threads > 0 else usable_cpus()


def pad_to_chunks(windows: NDArray[np.float32], chunk: int) -> NDArray[np.float32]:
    """``windows`` zero-padded to a whole number of ``chunk``-sized chunks.

    Kernels pick algorithms by batch size; a fixed size keeps each window's result
    independent of its batch (replays reproduce byte-identical records).
    """
    n = windows.shape[0]
    padded = -(-n // chunk) * chunk
    if padded == n:
        return windows
    buf = np.zeros((padded, *windows.shape[1:]), dtype=np.float32)
    buf[:n] = windows
    return buf


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU may be usable, judged without loading CUDA or torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error.

    torch is imported only when a GPU may be there: on a machine without one, ``auto``
    is ``cpu`` at once.
    """
    if device == "cpu" or (device == "auto" and not cuda_visible()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    return device


def _onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def choose_backend(backend: str, device: str, sidecar: dict[str, Any]) -> tuple[str, str]:
    """The backend that scores on ``device`` (already resolved), and why it was chosen."""
    has_graph = has_onnx(sidecar)
    if backend == "torch":
        return "torch", "model.backend: torch"
    if backend == "onnxruntime":
        if device != "cpu":
            raise ConfigError(
                f"model.backend: onnxruntime runs on the CPU, and model.device resolves to "
                f"{device!r}; set model.device: cpu, or model.backend: auto or torch"
            )
        if not _onnxruntime_installed():
            raise ConfigError("model.backend: onnxruntime, but onnxruntime is not installed")
        return "onnxruntime", "model.backend: onnxruntime"
    if device != "cpu":
        return "torch", f"model.device resolves to {device}: torch runs CUDA"
    if not has_graph:
        why = sidecar.get("onnx_unavailable") or "written without one (retrain to add it)"
        return "torch", f"the checkpoint has no ONNX graph: {why}"
    if not _onnxruntime_installed():
        return "torch", "onnxruntime is not installed"
    return "onnxruntime", "the CPU, and the checkpoint has an ONNX graph"


def load_model(
    path: Path | str, backend: str, device: str, threads: int
) -> tuple[LoadedModel, str]:
    """The checkpoint loaded for ``backend`` on ``device`` (resolved), and why that backend.

    ``threads``: the ONNX session's intra-op threads (torch's are set by its runner).
    """
    _, sidecar = read_sidecar(path)
    chosen, why = choose_backend(backend, device, sidecar)
    if chosen == "onnxruntime":
        from streamer.model.onnx_model import load_onnx

        return load_onnx(path, threads), why
    from streamer.model.checkpoint import load_checkpoint

    return load_checkpoint(path, device), why


def make_runner(backend: str, cfg: InferenceConfig, device: str) -> Runner:
    """The runner for a model of ``backend`` on ``device``."""
    if backend == "onnxruntime":
        from streamer.model.onnx_model import OnnxRunner

        return OnnxRunner(cfg)
    from streamer.model.torch_runner import TorchRunner

    return TorchRunner(cfg, device, usable_cpus())
