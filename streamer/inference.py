"""Inference worker: one thread owns the model; bounded queue in, micro-batches through.

The caller submits window batches and gets a ``Future`` per batch. The worker
gathers queued batches into one forward pass of up to ``max_batch`` windows,
waiting at most ``max_wait_ms`` for more to arrive, so a trickle is scored
promptly and a flood is scored in large, efficient batches.

Failure never hangs the caller: an exception in the worker is set on every
pending future, latched, and re-raised by ``submit`` and ``raise_if_failed``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from streamer.config import InferenceConfig
from streamer.errors import InferenceError
from streamer.model.checkpoint import LoadedModel

__all__ = ["InferenceResult", "InferenceWorker"]

log = structlog.get_logger(__name__)


class InferenceResult(NamedTuple):
    """Scores of one submitted batch."""

    scores: NDArray[np.float64]  # (n,)
    channel_errors: NDArray[np.float64]  # (n, channels)
    model_version: str


class _Item(NamedTuple):
    windows: NDArray[np.float32]
    future: Future[InferenceResult]


_STOP = object()


class InferenceWorker:
    """Owns a model on one device and scores window batches in a background thread."""

    def __init__(
        self,
        model: LoadedModel,
        cfg: InferenceConfig,
        device: str = "cpu",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """``on_batch(windows, seconds)`` runs on the worker thread after each forward pass."""
        self._cfg = cfg
        self._on_batch = on_batch
        self._device = torch.device(device)
        self._model = model
        self._pending_model: LoadedModel | None = None
        self._model_lock = threading.Lock()
        self._queue: queue.Queue[_Item | object] = queue.Queue(maxsize=cfg.queue_size)
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.windows = 0
        self.last_batch_size = 0
        self.last_batch_s = 0.0
        model.module.to(self._device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)

    # -- caller side -------------------------------------------------------------------

    def start(self) -> InferenceWorker:
        """Start the worker thread (returns self for chaining)."""
        self._thread.start()
        return self

    @property
    def model_version(self) -> str:
        """Version of the model that scores the next batch."""
        pending = self._pending_model
        return pending.version if pending is not None else self._model.version

    @property
    def queue_depth(self) -> int:
        """Batches waiting for the worker."""
        return self._queue.qsize()

    @property
    def is_full(self) -> bool:
        """Whether the next submit would block (the daemon pauses consumption then)."""
        return self._queue.full()

    def raise_if_failed(self) -> None:
        """Re-raise a worker failure on the calling thread."""
        if self._failure is not None:
            raise InferenceError(f"inference worker failed: {self._failure!r}") from self._failure

    def submit(
        self, windows: NDArray[np.floating], timeout_s: float | None = None
    ) -> Future[InferenceResult]:
        """Queue windows ``(n, window, channels)``; blocks while the queue is full.

        Raises InferenceError if the worker has failed or is closed, and ``queue.Full``
        if ``timeout_s`` passes with the queue still full.
        """
        self.raise_if_failed()
        if self._closed:
            raise InferenceError("inference worker is closed")
        arr = np.ascontiguousarray(windows, dtype=np.float32)
        expected = (self._model.window, len(self._model.channels))
        if arr.ndim != 3 or arr.shape[1:] != expected:
            raise InferenceError(
                f"windows must have shape (n, {expected[0]}, {expected[1]}), got {arr.shape}"
            )
        fut: Future[InferenceResult] = Future()
        if arr.shape[0] == 0:
            fut.set_result(
                InferenceResult(np.empty(0), np.empty((0, expected[1])), self.model_version)
            )
            return fut
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                self._queue.put(_Item(arr, fut), timeout=0.1)
                if self._failure is not None:
                    # The worker died between our check and the put: it will never
                    # drain this item, so fail it here rather than leave it pending.
                    self._fail_queued(InferenceError(f"inference worker failed: {self._failure!r}"))
                return fut
            except queue.Full:
                self.raise_if_failed()
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self._thread.ident is not None and not self._thread.is_alive():
                    raise InferenceError("inference worker is not running") from None

    def swap_model(self, model: LoadedModel) -> None:
        """Use ``model`` from the next micro-batch on (hot reload between batches)."""
        expected = (self._model.window, self._model.channels)
        if (model.window, model.channels) != expected:
            raise InferenceError(
                f"new model has window {model.window} and channels {list(model.channels)}; "
                f"the running one has {expected[0]} and {list(expected[1])}"
            )
        model.module.to(self._device)
        with self._model_lock:
            self._pending_model = model

    def close(self, timeout_s: float = 30.0) -> None:
        """Score what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._fail_queued(InferenceError("inference worker closed before scoring this batch"))

    # -- worker side ---------------------------------------------------------------------

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item) and not item.future.done():
                item.future.set_exception(exc)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        items = [first]
        total = first.windows.shape[0]
        deadline = time.monotonic() + self._cfg.max_wait_ms / 1000.0
        stop = False
        while total < self._cfg.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            assert isinstance(nxt, _Item)
            items.append(nxt)
            total += nxt.windows.shape[0]
        return items, stop

    def _forward(
        self, model: LoadedModel, windows: NDArray[np.float32]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        cuda = self._device.type == "cuda"
        n = windows.shape[0]
        chunk = self._cfg.chunk
        # Pad to a whole number of fixed-size chunks: kernels pick algorithms by batch
        # size, and a fixed size keeps each window's result independent of its batch.
        padded = -(-n // chunk) * chunk
        if padded != n:
            buf = np.zeros((padded, *windows.shape[1:]), dtype=np.float32)
            buf[:n] = windows
            windows = buf
        scores, errors = [], []
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
        with torch.inference_mode(), autocast:
            x_all = torch.from_numpy(windows)
            if cuda:
                # Pinned host memory lets the host-to-device copy run asynchronously.
                x_all = x_all.pin_memory().to(self._device, non_blocking=True)
            for i in range(0, padded, chunk):
                s, e = model.module(x_all[i : i + chunk])
                scores.append(s.float())
                errors.append(e.float())
            score_t = torch.cat(scores)[:n].cpu().numpy().astype(np.float64)
            error_t = torch.cat(errors)[:n].cpu().numpy().astype(np.float64)
        return score_t, error_t

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                assert isinstance(first, _Item)
                items, stop = self._gather(first)
                with self._model_lock:
                    if self._pending_model is not None:
                        self._model, self._pending_model = self._pending_model, None
                model = self._model
                try:
                    windows = (
                        items[0].windows
                        if len(items) == 1
                        else np.concatenate([it.windows for it in items])
                    )
                    started = time.perf_counter()
                    scores, errors = self._forward(model, windows)
                    self.last_batch_s = time.perf_counter() - started
                except BaseException as exc:
                    for it in items:
                        it.future.set_exception(exc)
                    raise
                self.batches += 1
                self.windows += windows.shape[0]
                self.last_batch_size = windows.shape[0]
                if self._on_batch is not None:
                    self._on_batch(self.last_batch_size, self.last_batch_s)
                lo = 0
                for it in items:
                    hi = lo + it.windows.shape[0]
                    it.future.set_result(
                        InferenceResult(scores[lo:hi], errors[lo:hi], model.version)
                    )
                    lo = hi
                if stop:
                    return
        except BaseException as exc:
            self._failure = exc
            log.error("inference_failed", error=repr(exc))
            self._fail_queued(InferenceError(f"inference worker failed: {exc!r}"))
