"""The detection engine: windows -> inference -> thresholds -> alerts, as one unit.

The daemon feeds it from Kafka, ``streamer score`` and ``streamer eval`` feed it
from files: one engine, two sources. Work is split in two steps so a caller can
keep consuming while the worker scores: ``submit`` pushes samples into the ring
buffers and queues complete windows for inference, ``complete`` waits for a
batch's scores and runs thresholds and alerts on them, in submission order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamer.config import AlertsConfig, InferenceConfig, NoveltyConfig, ThresholdConfig
from streamer.errors import ConfigError
from streamer.inference import InferenceResult, InferenceWorker
from streamer.model.artifact import LoadedModel
from streamer.records import ScoredBatch
from streamer.scoring.alerts import AlertBank
from streamer.scoring.novelty import NoveltyBank, NoveltySettings
from streamer.scoring.thresholds import Threshold, ThresholdBank, make_threshold
from streamer.sensors import SensorStore
from streamer.windows import PushResult, RingWindows, SensorIndex, WindowBatch

__all__ = ["Engine", "PendingBatch", "ScoredBatch", "calibrated_threshold"]


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """Windows queued for inference, with what the push rejected."""

    windows: WindowBatch
    sensors: list[Hashable]
    future: Future[InferenceResult]
    push: PushResult


def _plain_label(positions: NDArray[np.int64]) -> list[str]:
    return [str(p) for p in positions.tolist()]


def _novelty_bank(cfg: NoveltyConfig | None, model: LoadedModel) -> NoveltyBank | None:
    """The history-novelty bank when enabled, scaling rows with the model's scaler."""
    if cfg is None or not cfg.enabled:
        return None
    fields = cfg.model_dump(exclude={"enabled"})
    settings = NoveltySettings(**{**fields, "scales": tuple(cfg.scales)})
    offset, scale = model.scaler()
    return NoveltyBank(settings, offset, scale)


def calibrated_threshold(cfg: ThresholdConfig, calibration: NDArray[np.float64]) -> Threshold:
    """A threshold prototype calibrated on the model's training residual scores."""
    proto = make_threshold(cfg.method, **cfg.params())
    if calibration.size == 0 and cfg.method != "fixed":
        raise ConfigError(
            f"threshold.method {cfg.method!r} needs calibration scores, and the model has none"
        )
    proto.calibrate(calibration)
    return proto


class Engine:
    """Ring buffers, the inference worker, per-sensor thresholds and alerts."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_gap_s: float,
        threshold: ThresholdConfig,
        alerts: AlertsConfig,
        inference: InferenceConfig,
        device: str = "cpu",
        stride: int | None = None,
        position_label: Callable[[NDArray[np.int64]], list[str]] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        novelty: NoveltyConfig | None = None,
    ) -> None:
        """``on_batch(windows, seconds)`` is called by the worker after each forward pass.

        ``novelty`` (when enabled) replaces each window's score by its history novelty.
        """
        self.model = model
        # How a window's last position is written into alert ids: the daemon packs
        # partition and offset into one int64 and labels it "partition:offset".
        self.position_label = position_label or _plain_label
        self.channels = list(model.channels)
        self.index = SensorIndex()
        self.windows = RingWindows(
            channels=len(self.channels),
            window=model.window,
            stride=stride if stride is not None else model.stride,
            max_gap_s=max_gap_s,
        )
        self.thresholds = ThresholdBank(calibrated_threshold(threshold, model.calibration))
        self.alerts = AlertBank(
            self.channels,
            open_after=alerts.open_after,
            open_within=alerts.open_within,
            close_after=alerts.close_after,
            top_k=alerts.top_channels,
        )
        self.novelty = _novelty_bank(novelty, model)
        # The per-sensor stores as one: what the daemon keeps, restores and forgets.
        self.sensors = SensorStore(
            self.index, self.windows, self.thresholds, self.alerts, novelty=self.novelty
        )
        self.worker = InferenceWorker(model, inference, device, on_batch=on_batch).start()

    def swap_model(self, model: LoadedModel, prototype: Threshold | None = None) -> None:
        """Score with ``model`` from the worker's next micro-batch on (hot reload).

        Per-sensor thresholds and alert state are kept. ``prototype``, when given,
        is what sensors seen for the first time from now on start from (calibrated on
        the new model's residuals). Raises InferenceError if window or channels differ.
        """
        self.worker.swap_model(model)
        self.model = model
        if prototype is not None:
            self.thresholds.set_prototype(prototype)

    def close(self) -> None:
        """Stop the inference worker after it scores what is queued."""
        self.worker.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(
        self,
        keys: Sequence[Hashable] | NDArray[np.object_],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
    ) -> tuple[PushResult, list[Hashable]]:
        """Add samples to the ring buffers; returns the windows they completed and their sensors."""
        slots = self.index.slots(keys)
        res = self.windows.push(slots, ts, values, positions)
        return res, self.index.keys_of(res.windows.slots)

    def _kept(
        self,
        keys: Sequence[Hashable] | NDArray[np.object_],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
        keep: Callable[[WindowBatch], NDArray[np.bool_]] | None,
    ) -> tuple[PushResult, WindowBatch, list[Hashable]]:
        """Push samples; the completed windows ``keep`` retains, and their sensors."""
        res, sensors = self.push(keys, ts, values, positions)
        wins = res.windows
        if keep is not None:
            idx = np.flatnonzero(keep(wins))
            wins = wins.take(idx)
            sensors = [sensors[i] for i in idx]
        return res, wins, sensors

    def submit(
        self,
        keys: Sequence[Hashable] | NDArray[np.object_],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
        keep: Callable[[WindowBatch], NDArray[np.bool_]] | None = None,
    ) -> PendingBatch:
        """Push samples and queue the completed windows (``keep`` filters them) for scoring."""
        res, wins, sensors = self._kept(keys, ts, values, positions, keep)
        fut = self.worker.submit(wins.data)
        return PendingBatch(wins, sensors, fut, res)

    def submit_pieces(
        self,
        keys: Sequence[Hashable] | NDArray[np.object_],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
        piece: int,
        keep: Callable[[WindowBatch], NDArray[np.bool_]] | None = None,
    ) -> tuple[PushResult, list[PendingBatch]]:
        """As :meth:`submit`, queued in pieces of at most ``piece`` windows.

        Each piece has its own future, so the first windows of a burst can be decided
        and published while the worker still scores the rest (latency under bursts).
        """
        res, wins, sensors = self._kept(keys, ts, values, positions, keep)
        if len(wins) == 0:
            return res, []
        futures = self.worker.submit_pieces(wins.data, piece)
        out = []
        for i, fut in enumerate(futures):
            lo = i * piece
            part = wins if len(futures) == 1 else wins.take(slice(lo, lo + piece))
            out.append(PendingBatch(part, sensors[lo : lo + piece], fut, res))
        return res, out

    def complete(self, pending: PendingBatch, timeout_s: float | None = None) -> ScoredBatch:
        """Wait for a batch's scores, then run thresholds and alerts (call in submit order)."""
        result = pending.future.result(timeout=timeout_s)
        return self.decide(pending.windows, pending.sensors, result)

    def decide(
        self, wins: WindowBatch, sensors: list[Hashable], result: InferenceResult
    ) -> ScoredBatch:
        """Thresholds and alerts for scored windows."""
        names = [str(s) for s in sensors]
        scores = result.scores
        if self.novelty is not None and len(wins):
            stride = min(self.windows.stride, wins.data.shape[1])
            scores = self.novelty.score_windows(sensors, wins.data, stride)
        th = self.thresholds.step(names, scores)
        positions = self.position_label(wins.end_pos)
        events, is_open = self.alerts.update(
            names,
            positions,
            wins.end_ts,
            scores,
            th.threshold,
            th.anomalous,
            result.channel_errors,
        )
        return ScoredBatch(
            windows=wins,
            sensors=sensors,
            scores=scores,
            channel_errors=result.channel_errors,
            thresholds=th.threshold,
            anomalous=th.anomalous,
            likelihood=th.likelihood,
            alert_open=is_open,
            events=events,
            model_version=result.model_version,
        )
