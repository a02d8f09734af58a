"""The model, loaded on a thread of its own while the daemon checks the cluster and joins.

Loading takes from a tenth of a second (ONNX Runtime) to seconds (torch's import on a
machine with the CUDA build); the Kafka side of the start-up (topic checks, grants, the
group join) needs no model, so the two overlap. A failure is raised on the main thread
as it was raised on the loader's, so a bad model still stops start-up with its own
error (exit code 2) and nothing is committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from streamer.config import Config
from streamer.model.artifact import (
    LoadedModel,
    checked_fields,
    fit_to_stream,
    read_sidecar,
    require_fit,
)
from streamer.model.backend import load_model, resolve_device, worker_threads

__all__ = ["Loaded", "ModelLoad"]

log = structlog.get_logger("streamer.daemon")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A loaded model, the device it runs on, and the load's seconds."""

    model: LoadedModel
    device: str
    seconds: float


class ModelLoad:
    """Loads ``cfg.model`` on a thread started at once; ``wait`` hands over the result."""

    def __init__(self, cfg: Config, on_loaded: Callable[[], None] | None = None) -> None:
        """``on_loaded`` runs on the loader's thread once the model is loaded and checked.

        What the sidecar alone tells (a missing or foreign checkpoint, another window or
        other channels than the stream's) is checked here, at once, before any broker is
        contacted: those errors never wait behind a Kafka timeout.
        """
        path, sidecar = read_sidecar(cfg.model.path)
        channels, window, _ = checked_fields(path, sidecar)
        require_fit(path, window, channels, cfg.stream.window, cfg.stream.channels)
        self._cfg = cfg
        self._on_loaded = on_loaded
        self._result: Loaded | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="model-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cfg = self._cfg
        started = time.perf_counter()
        try:
            device = resolve_device(cfg.model.device)
            model, why = load_model(
                cfg.model.path, cfg.model.backend, device, worker_threads(cfg.inference)
            )
            seconds = time.perf_counter() - started
            log.info("model_backend", backend=model.backend, device=device, why=why)
            stream = cfg.stream
            note = fit_to_stream(model, stream.window, stream.channels, stream.stride)
            if note is not None:
                log.warning("stride_differs_from_model", model_stride=model.stride, why=note)
            self._result = Loaded(model, device, seconds)
            if self._on_loaded is not None:
                self._on_loaded()
        except BaseException as exc:  # re-raised on the main thread by wait()
            self._error = exc

    def raise_if_failed(self) -> None:
        """Re-raise the load's error now if it has failed already (no waiting)."""
        if not self._thread.is_alive() and self._error is not None:
            raise self._error

    def failure(self, wait_s: float) -> BaseException | None:
        """The load's error, waiting up to ``wait_s`` for the load to end; else None.

        A start-up step that failed asks first: a broken model is the error to report
        (exit code 2, the file named), not what the Kafka side ran into meanwhile.
        """
        self._thread.join(wait_s)
        return None if self._thread.is_alive() else self._error

    def wait(self) -> Loaded:
        """The loaded model, once loaded; the load's own exception if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
