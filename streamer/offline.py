"""Offline use of the engine: a CSV file scored as the daemon would score its samples.

Files are fed through the same ``Engine`` the daemon uses (ring buffers, the
inference worker, per-sensor thresholds and alerts), one row at a time in
order, so every decision uses only the data up to that row. The benchmark protocols
built on it are in :mod:`streamer.protocols`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.config import Config
from streamer.data import Table, check_increasing, read_csv
from streamer.engine import Engine, ScoredBatch
from streamer.model.checkpoint import LoadedModel, fit_to_stream, load_checkpoint
from streamer.model.train import resolve_device

__all__ = ["RowResults", "file_engine", "run_rows", "score_file"]

log = structlog.get_logger("streamer.offline")


@dataclass(frozen=True, slots=True)
class RowResults:
    """Per-row decisions of one file (NaN / False where no window ends at the row)."""

    score: NDArray[np.float64]
    threshold: NDArray[np.float64]
    likelihood: NDArray[np.float64]
    anomalous: NDArray[np.bool_]
    alert_open: NDArray[np.bool_]
    scored: NDArray[np.bool_]


def file_engine(
    cfg: Config, model: LoadedModel, device: str, stride: int, max_gap_s: float = float("inf")
) -> Engine:
    """The engine as the offline tools use it: the config's thresholds, alerts, inference
    and novelty over ``model``; ``max_gap_s`` infinite unless given (files have no gaps)."""
    return Engine(
        model,
        max_gap_s=max_gap_s,
        threshold=cfg.threshold,
        alerts=cfg.alerts,
        inference=cfg.inference,
        device=device,
        stride=stride,
        novelty=cfg.novelty,
    )


def run_rows(
    engine: Engine,
    sensor: str,
    ts: NDArray[np.float64],
    values: NDArray[np.float64],
    first_scored_row: int = 0,
    chunk: int = 4096,
    on_batch: Callable[[ScoredBatch], None] | None = None,
) -> RowResults:
    """Stream a file's rows through the engine; a window's result goes to its last row.

    Windows ending before ``first_scored_row`` only fill the buffers (the rows
    before it are the model's training data).
    """
    n = values.shape[0]
    out = RowResults(
        np.full(n, np.nan),
        np.full(n, np.nan),
        np.zeros(n),
        np.zeros(n, dtype=bool),
        np.zeros(n, dtype=bool),
        np.zeros(n, dtype=bool),
    )
    # Timestamps only order the samples here; the row index keeps them strictly
    # increasing even where a file repeats a timestamp.
    order_ts = np.arange(n, dtype=np.float64)
    keys = np.full(n, sensor, dtype=object)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        pending = engine.submit(
            keys[lo:hi],
            order_ts[lo:hi],
            values[lo:hi],
            np.arange(lo, hi, dtype=np.int64),
            keep=lambda w: w.end_pos >= first_scored_row,
        )
        batch = engine.complete(pending)
        rows = batch.windows.end_pos
        out.score[rows] = batch.scores
        out.threshold[rows] = batch.thresholds
        out.likelihood[rows] = batch.likelihood
        out.anomalous[rows] = batch.anomalous
        out.alert_open[rows] = batch.alert_open
        out.scored[rows] = True
        if on_batch is not None:
            on_batch(batch)
    return out


def _score_stream(cfg: Config, model: LoadedModel) -> tuple[int, tuple[str, ...]]:
    """The stride and channels ``score`` uses: the config's where it names them, else the model's.

    A window or channels the config names that differ from the model's are refused,
    and another stride is warned about, as ``streamer run`` does; keys the config does
    not name (built-in defaults) follow the model silently.
    """
    named = cfg.stream.model_fields_set
    window = cfg.stream.window if "window" in named else model.window
    channels = tuple(cfg.stream.channels) if "channels" in named else model.channels
    stride = cfg.stream.stride if "stride" in named else model.stride
    note = fit_to_stream(model, window, channels, stride)
    if note is not None:
        log.warning("stride_differs_from_model", model_stride=model.stride, why=note)
    return stride, channels


def score_file(
    cfg: Config, model_dir: Path, data: Path, out: Path, sensor: str | None = None
) -> int:
    """``streamer score``: one CSV row per window: score, threshold, decisions, channel errors.

    Rows are fed in file order; ``csv.missing`` decides what a gap does (with ``skip``
    the dropped row ends the window, which restarts after it, as a gap does in the
    daemon). ``position`` is the row's index among the file's data rows.
    """
    device = resolve_device(cfg.model.device)
    model = load_checkpoint(model_dir, device)
    stride, channels = _score_stream(cfg, model)
    c = cfg.csv
    table = read_csv(data, c.separator, c.timestamp_column, list(channels), missing=c.missing)
    check_increasing(table)
    name = sensor or data.stem
    # The file's row numbers as the clock: consecutive rows are 1 apart, so a row that
    # csv.missing dropped is a gap over 1.5 and resets the window (the real timestamps
    # only order the rows, checked above).
    with file_engine(cfg, model, device, stride, max_gap_s=1.5) as engine:
        pending = engine.submit(
            np.full(len(table), name, dtype=object),
            table.rows.astype(np.float64),
            table.values,
            np.arange(len(table), dtype=np.int64),
        )
        batch = engine.complete(pending)
    _write_scores(out, table, batch, model.channels)
    return len(batch)


def _write_scores(out: Path, table: Table, batch: ScoredBatch, channels: Sequence[str]) -> None:
    """The scores CSV of ``score_file``, one row per window in file order."""
    rows: list[list[Any]] = []
    for i in range(len(batch)):
        end = int(batch.windows.end_pos[i])
        rows.append(
            [
                int(table.rows[end]),
                table.raw_timestamps[end],
                table.raw_timestamps[int(batch.windows.start_pos[i])],
                f"{batch.scores[i]:.6g}",
                f"{batch.thresholds[i]:.6g}",
                int(batch.anomalous[i]),
                f"{batch.likelihood[i]:.6g}",
                int(batch.alert_open[i]),
                *(f"{e:.6g}" for e in batch.channel_errors[i]),
            ]
        )
    rows.sort(key=lambda r: int(r[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(
            [
                "position",
                "timestamp",
                "window_start",
                "score",
                "threshold",
                "anomalous",
                "likelihood",
                "alert_open",
                *(f"error_{c}" for c in channels),
            ]
        )
        writer.writerows(rows)
