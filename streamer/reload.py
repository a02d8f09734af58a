"""Model hot reload: notice a new checkpoint, load and validate it off the main loop.

Triggers: SIGHUP (``systemctl reload streamer``) and a change of the checkpoint
files under ``model.path`` (polled every ``model.watch_interval_s`` by the main
loop: two ``stat`` calls). A change counts only once the files have looked the
same at two polls in a row, so a checkpoint copied file by file is not read half
written; rotating by renaming a directory or swapping a symlink is atomic anyway.

``ModelReloader`` loads in a background thread, for the backend the worker runs
(safetensors weights or the ONNX graph, SHA-256 checked against the sidecar), the
same window and channels as the running model, and a threshold prototype calibrated
on the new model's residuals (for sensors seen for the first time after the swap).
The main loop takes the outcome with ``take()`` and swaps between batches; a failed
outcome leaves the running model in place.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from streamer.config import ThresholdConfig
from streamer.engine import calibrated_threshold
from streamer.model.artifact import (
    ONNX_FILE,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    stream_mismatch,
)
from streamer.model.backend import load_model
from streamer.scoring.thresholds import Threshold

__all__ = ["CheckpointWatcher", "ModelReloader", "ReloadOutcome"]

_Signature = tuple[tuple[int, int, int, int] | None, ...]


class CheckpointWatcher:
    """Tells when the checkpoint files under ``path`` changed and then settled."""

    def __init__(self, path: Path) -> None:
        self._files = (path / SIDECAR_FILE, path / WEIGHTS_FILE, path / ONNX_FILE)
        self._baseline = self._signature()
        self._last = self._baseline

    def _signature(self) -> _Signature:
        out: list[tuple[int, int, int, int] | None] = []
        for f in self._files:
            try:
                st = os.stat(f)  # follows a symlinked model directory
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def rebase(self) -> None:
        """Take the files as they are now as the loaded state (a reload was just requested)."""
        self._baseline = self._last = self._signature()

    def changed(self) -> bool:
        """True once per change, when the files differ from the baseline and have settled."""
        now = self._signature()
        settled = now == self._last
        self._last = now
        if settled and now != self._baseline:
            self._baseline = now
            return True
        return False


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload attempt produced: a validated model, or why there is none."""

    trigger: str
    seconds: float
    model: LoadedModel | None = None
    prototype: Threshold | None = None
    error: str | None = None


class ModelReloader:
    """Loads a checkpoint in a background thread, one load at a time.

    A request that arrives while a load runs is remembered and served after it,
    so the last request always sees the newest files.
    """

    def __init__(
        self,
        path: Path,
        device: str,
        window: int,
        channels: tuple[str, ...],
        threshold: ThresholdConfig,
        backend: str = "torch",
        threads: int = 0,
    ) -> None:
        """``backend``: the running worker's; a new model is loaded for it, or refused."""
        self.path = path
        self._device = device
        self._backend = backend
        self._threads = threads
        self._window = window
        self._channels = channels
        self._threshold = threshold
        self._results: queue.SimpleQueue[ReloadOutcome] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again: str | None = None

    @property
    def busy(self) -> bool:
        """Whether a load is running."""
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def request(self, trigger: str) -> None:
        """Start a load (or queue one behind the running load)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._again = trigger
                return
            self._thread = threading.Thread(
                target=self._run, args=(trigger,), name="model-reload", daemon=True
            )
            self._thread.start()

    def take(self) -> ReloadOutcome | None:
        """The next finished outcome, if any (never blocks)."""
        try:
            return self._results.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout_s: float) -> ReloadOutcome | None:
        """Wait up to ``timeout_s`` for the next outcome."""
        try:
            return self._results.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def _run(self, trigger: str) -> None:
        while True:
            self._results.put(self.load(trigger))
            with self._lock:
                again, self._again = self._again, None
                if again is None:
                    return
            trigger = again

    def load(self, trigger: str) -> ReloadOutcome:
        """Load and validate the checkpoint now, on the calling thread."""
        started = time.perf_counter()

        def failed(why: str) -> ReloadOutcome:
            return ReloadOutcome(trigger, time.perf_counter() - started, error=why)

        try:
            model, _ = load_model(self.path, self._backend, self._device, self._threads)
        except Exception as exc:  # any failure keeps the old model; the reason is logged
            return failed(f"{type(exc).__name__}: {exc}")
        mismatch = stream_mismatch(model, self._window, self._channels)
        if mismatch:
            return failed(f"incompatible model: {'; '.join(mismatch)}")
        try:
            prototype = calibrated_threshold(self._threshold, model.calibration)
        except Exception as exc:
            return failed(f"threshold calibration failed: {type(exc).__name__}: {exc}")
        return ReloadOutcome(
            trigger, time.perf_counter() - started, model=model, prototype=prototype
        )
