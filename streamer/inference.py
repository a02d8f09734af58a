"""Inference worker: one thread owns the model; bounded queue in, micro-batches through.

The caller submits window batches and gets a ``Future`` per batch. The worker
gathers queued batches into one forward pass of up to ``max_batch`` windows,
waiting at most ``max_wait_ms`` for more to fill its last chunk, so a trickle is
scored promptly and a flood is scored in large, efficient batches.

Failure never hangs the caller: an exception in the worker is set on every
pending future, latched, and re-raised by ``submit`` and ``raise_if_failed``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.config import InferenceConfig
from streamer.errors import InferenceError
from streamer.model.artifact import LoadedModel
from streamer.model.backend import make_runner

__all__ = ["InferenceResult", "InferenceWorker"]

log = structlog.get_logger(__name__)


class InferenceResult(NamedTuple):
    """Scores of one submitted batch."""

    scores: NDArray[np.float64]  # (n,)
    channel_errors: NDArray[np.float64]  # (n, channels)
    model_version: str


class _Item(NamedTuple):
    windows: NDArray[np.float32]
    # One future per piece of ``windows``, in order, with the piece's size.
    pieces: list[tuple[int, Future[InferenceResult]]]


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
        # The backend's runner (torch or ONNX Runtime): this module never imports torch.
        self._runner = make_runner(model.backend, cfg, device)
        self._model = model
        self._pending_model: LoadedModel | None = None
        self._model_lock = threading.Lock()
        self._queue: queue.Queue[_Item | object] = queue.Queue(maxsize=cfg.queue_size)
        # Windows put in the queue (counted by the submitting thread) and taken out of it
        # (by the worker): one writer each, so their difference needs no lock.
        self._windows_in = 0
        self._windows_out = 0
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.batches = 0
        self.windows = 0
        self.last_batch_size = 0
        self.last_batch_s = 0.0
        self._runner.prepare(model)

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
    def queued_windows(self) -> int:
        """Windows waiting for the worker."""
        return self._windows_in - self._windows_out

    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``queue_size`` batches or ``max_queued_windows`` windows.

        The daemon pauses consumption then: the next submit would block, or the windows
        queued are as many as memory and latency allow.
        """
        return self._queue.full() or self.queued_windows >= self._cfg.max_queued_windows

    @property
    def is_half_empty(self) -> bool:
        """Whether the queue holds under half of both bounds (the daemon resumes then)."""
        cfg = self._cfg
        return (
            self._queue.qsize() < cfg.queue_size / 2
            and self.queued_windows < cfg.max_queued_windows / 2
        )

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
        return self.submit_pieces(windows, 0, timeout_s)[0]

    def submit_pieces(
        self, windows: NDArray[np.floating], piece: int, timeout_s: float | None = None
    ) -> list[Future[InferenceResult]]:
        """As :meth:`submit`, with one future per ``piece`` windows (0: one for all).

        The batch is one queue entry (backpressure counts it once), but each piece's
        future is resolved as soon as its windows are scored, so the first windows of a
        burst can be published while the rest are computed.
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
        n = arr.shape[0]
        if n == 0:
            fut: Future[InferenceResult] = Future()
            fut.set_result(
                InferenceResult(np.empty(0), np.empty((0, expected[1])), self.model_version)
            )
            return [fut]
        step = piece if piece > 0 else n
        pieces = [(min(step, n - lo), Future[InferenceResult]()) for lo in range(0, n, step)]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Counted before the put: the worker may take the item (and count it out) at once.
        self._windows_in += n
        try:
            while True:
                try:
                    self._queue.put(_Item(arr, pieces), timeout=0.1)
                    if self._failure is not None:
                        # The worker died between our check and the put: it will never
                        # drain this item, so fail it here rather than leave it pending.
                        self._fail_queued(
                            InferenceError(f"inference worker failed: {self._failure!r}")
                        )
                    return [f for _, f in pieces]
                except queue.Full:
                    self.raise_if_failed()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    if self._thread.ident is not None and not self._thread.is_alive():
                        raise InferenceError("inference worker is not running") from None
        except BaseException:
            self._windows_in -= n  # not queued
            raise

    def swap_model(self, model: LoadedModel) -> None:
        """Use ``model`` from the next micro-batch on (hot reload between batches)."""
        expected = (self._model.window, self._model.channels)
        if (model.window, model.channels) != expected:
            raise InferenceError(
                f"new model has window {model.window} and channels {list(model.channels)}; "
                f"the running one has {expected[0]} and {list(expected[1])}"
            )
        if model.backend != self._runner.backend:
            raise InferenceError(
                f"new model runs on {model.backend}; this worker scores with {self._runner.backend}"
            )
        self._runner.prepare(model)
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
            if isinstance(item, _Item):
                self._windows_out += item.windows.shape[0]
                for _, fut in item.pieces:
                    if not fut.done():
                        fut.set_exception(exc)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """``first`` and what else is queued, up to ``max_batch`` windows.

        Waits (up to ``max_wait_ms``) only while the last chunk is partly filled: every
        pass runs on whole zero-padded chunks, so a window that completes a chunk costs
        nothing, and once the chunks are full more waiting would only delay the windows
        already taken.
        """
        items = [first]
        total = first.windows.shape[0]
        chunk = self._cfg.chunk
        deadline = time.monotonic() + self._cfg.max_wait_ms / 1000.0
        stop = False
        while total < self._cfg.max_batch:
            remaining = deadline - time.monotonic() if total % chunk else 0.0
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
            self._windows_out += nxt.windows.shape[0]
        return items, stop

    @property
    def backend(self) -> str:
        """The backend that scores: ``torch`` or ``onnxruntime``."""
        return self._runner.backend

    @property
    def traced(self) -> bool:
        """Whether the model in use runs compiled (a checked trace, or an ONNX graph)."""
        return self._runner.traced(self._model)

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                assert isinstance(first, _Item)
                self._windows_out += first.windows.shape[0]
                items, stop = self._gather(first)
                with self._model_lock:
                    if self._pending_model is not None:
                        self._model, self._pending_model = self._pending_model, None
                model = self._model
                windows = (
                    items[0].windows
                    if len(items) == 1
                    else np.concatenate([it.windows for it in items])
                )
                started = time.perf_counter()
                pieces = deque(p for it in items for p in it.pieces)
                scores: list[NDArray[np.float64]] = []
                errors: list[NDArray[np.float64]] = []
                done = 0  # windows scored so far
                lo = 0  # first window of the oldest piece not handed back yet
                try:
                    for seg_scores, seg_errors in self._runner.segments(model, windows):
                        scores.append(seg_scores)
                        errors.append(seg_errors)
                        done += seg_scores.shape[0]
                        # Hand back every piece whose windows are all scored.
                        while pieces and lo + pieces[0][0] <= done:
                            size, fut = pieces.popleft()
                            all_s, all_e = np.concatenate(scores), np.concatenate(errors)
                            base = done - all_s.shape[0]  # all_s holds windows [base, done)
                            a, b = lo - base, lo - base + size
                            fut.set_result(InferenceResult(all_s[a:b], all_e[a:b], model.version))
                            # Keep only what later pieces still need.
                            scores, errors = [all_s[b:]], [all_e[b:]]
                            lo += size
                except BaseException as exc:
                    for _, fut in pieces:
                        fut.set_exception(exc)
                    raise
                self.last_batch_s = time.perf_counter() - started
                self.batches += 1
                self.windows += windows.shape[0]
                self.last_batch_size = windows.shape[0]
                if self._on_batch is not None:
                    self._on_batch(self.last_batch_size, self.last_batch_s)
                if stop:
                    return
        except BaseException as exc:
            self._failure = exc
            log.error("inference_failed", error=repr(exc))
            self._fail_queued(InferenceError(f"inference worker failed: {exc!r}"))
