"""The torch backend of the inference worker: a checked trace on the CPU, CUDA as is.

The worker (``streamer.inference``) hands each batch of raw windows to a runner and
takes back scores and channel errors a segment at a time; this one runs the model's
torch module. ``streamer.model.onnx_model.OnnxRunner`` is the other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from streamer.config import InferenceConfig
from streamer.model.artifact import LoadedModel
from streamer.model.backend import Segments, pad_to_chunks
from streamer.model.networks import ScoringModel

__all__ = ["TorchRunner"]

log = structlog.get_logger("streamer.inference")


def _host(t: torch.Tensor) -> NDArray[np.float64]:
    return t.float().cpu().numpy().astype(np.float64)


def _module(model: LoadedModel) -> ScoringModel:
    module = model.module
    assert isinstance(module, torch.nn.Module), "a torch runner needs a torch model"
    return module


class TorchRunner:
    """Scores windows with a model's torch module on one device."""

    backend = "torch"

    def __init__(self, cfg: InferenceConfig, device: str, cpus: int) -> None:
        self._cfg = cfg
        self._device = torch.device(device)
        # The traced forward pass of the model in use (CPU only): built on the worker thread.
        self._traced: tuple[LoadedModel, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] | None
        self._traced = None
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        elif self._device.type == "cpu":
            # The consumer thread needs a core of its own: intra-op threads that share it
            # with a busy Python thread spin at their barriers and slow each other down.
            torch.set_num_threads(max(1, cpus - 1))

    def prepare(self, model: LoadedModel) -> None:
        """Move the model to this runner's device (before it scores anything)."""
        _module(model).to(self._device)

    def _runner(self, model: LoadedModel) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The callable that scores one chunk: a TorchScript trace on CPU, else the module.

        An eager forward pass takes and releases the GIL around each of its ~20 operators;
        while the consumer thread runs Python, each re-acquisition waits up to the
        interpreter's switch interval (5 ms), which cut the worker's CPU throughput by an
        order of magnitude in the daemon. A traced module runs the whole pass in C++
        without the GIL. The trace is checked against the eager module, bit for bit, on a
        sample chunk, and the eager module is used if they differ.
        """
        module = _module(model)
        if self._device.type != "cpu" or not self._cfg.trace:
            return module
        if self._traced is not None and self._traced[0] is model:
            return self._traced[1]
        runner: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = module
        gen = torch.Generator().manual_seed(0)
        shape = (self._cfg.chunk, model.window, len(model.channels))
        # Raw-unit windows around the scaler's offset; the check uses a second sample, so a
        # network whose Python control flow depends on its input is caught.
        example, check = (
            torch.randn(shape, generator=gen) * module.scale + module.offset for _ in range(2)
        )
        try:
            with warnings.catch_warnings():
                # Deprecation and "tensor to bool" notices: the window length is fixed per
                # model and every call has the same chunk shape, so the trace is exact.
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                    module, example, check_trace=False
                )
            want, got = module(check), traced(check)
            if all(torch.equal(a, b) for a, b in zip(want, got, strict=True)):
                runner = traced
                log.info("model_traced", model=model.version, chunk=self._cfg.chunk)
            else:
                log.warning("model_trace_differs", model=model.version, using="eager")
        except Exception as exc:
            log.warning("model_trace_failed", model=model.version, error=repr(exc), using="eager")
        self._traced = (model, runner)
        return runner

    def traced(self, model: LoadedModel) -> bool:
        """Whether ``model`` runs as a checked TorchScript trace."""
        cached = self._traced
        return cached is not None and cached[0] is model and cached[1] is not model.module

    def segments(self, model: LoadedModel, windows: NDArray[np.float32]) -> Segments:
        """Scores and channel errors of ``windows``, in order, a segment at a time.

        On CPU each segment is one chunk, so the first windows of a large batch are
        handed back (and published) while the rest are still computed. On CUDA the whole
        batch is one segment: the copies back to the host would otherwise serialise it.
        """
        cuda = self._device.type == "cuda"
        n = windows.shape[0]
        chunk = self._cfg.chunk
        windows = pad_to_chunks(windows, chunk)
        padded = windows.shape[0]
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
        with torch.inference_mode(), autocast:
            run = self._runner(model)
            x_all = torch.from_numpy(windows)
            if cuda:
                # Pinned host memory lets the host-to-device copy run asynchronously.
                x_all = x_all.pin_memory().to(self._device, non_blocking=True)
                outs = [run(x_all[i : i + chunk]) for i in range(0, padded, chunk)]
                score_t = torch.cat([s.float() for s, _ in outs])[:n]
                error_t = torch.cat([e.float() for _, e in outs])[:n]
                yield _host(score_t), _host(error_t)
                return
            for i in range(0, padded, chunk):
                s, e = run(x_all[i : i + chunk])
                k = min(chunk, n - i)
                yield _host(s[:k]), _host(e[:k])
