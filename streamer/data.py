"""Reading sensor CSV files (training, offline scoring, evaluation)."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from streamer.errors import CsvError, DataError

__all__ = ["Table", "data_hash", "parse_timestamps", "read_csv"]


@dataclass(frozen=True, slots=True)
class Table:
    """Columns of one CSV file as arrays."""

    path: Path
    timestamps: NDArray[np.float64]  # epoch seconds (row index when the file has no time column)
    values: NDArray[np.float64]  # (rows, channels)
    channels: tuple[str, ...]
    raw_timestamps: list[str]
    extra: dict[str, NDArray[np.float64]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])


def parse_timestamps(raw: Sequence[str], where: str) -> NDArray[np.float64]:
    """Epoch seconds from epoch numbers or ISO-8601 strings; DataError names the bad row."""
    try:
        return np.asarray([float(x) for x in raw], dtype=np.float64)
    except ValueError:
        pass
    out = np.empty(len(raw), dtype=np.float64)
    for i, text in enumerate(raw):
        try:
            stamp = np.datetime64(text.strip().replace("Z", ""), "ns")
        except ValueError:
            raise DataError(f"{where}: row {i + 1}: bad timestamp {text!r}") from None
        out[i] = stamp.astype(np.int64) / 1e9
    return out


def read_csv(
    path: Path | str,
    separator: str = ",",
    timestamp_column: str | None = "timestamp",
    columns: Sequence[str] | None = None,
    extra_columns: Sequence[str] = (),
) -> Table:
    """Read ``columns`` (default: every column but the timestamp and extras) as float channels."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter=separator))
    except OSError as exc:
        raise CsvError(f"{path}: cannot read: {exc.strerror}") from exc
    if not rows:
        raise CsvError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    for i, row in enumerate(rows[1:], 2):
        if row and len(row) != len(header):
            raise CsvError(
                f"{path}: line {i}: {len(row)} fields, the header has {len(header)} "
                f"(separator {separator!r})"
            )
    if (
        len(header) == 1
        and separator not in rows[0][0]
        and (";" in rows[0][0] or "," in rows[0][0])
    ):
        guess = ";" if ";" in rows[0][0] else ","
        raise CsvError(f"{path}: only one column with separator {separator!r}; is it {guess!r}?")
    if timestamp_column is not None and timestamp_column not in header:
        raise CsvError(f"{path}: no timestamp column {timestamp_column!r} (columns: {header})")
    skip = {timestamp_column, *extra_columns}
    wanted = list(columns) if columns is not None else [h for h in header if h not in skip]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise CsvError(f"{path}: missing channel columns {missing} (columns: {header})")
    if not wanted:
        raise CsvError(f"{path}: no channel columns")

    def column(name: str) -> NDArray[np.float64]:
        j = header.index(name)
        out = np.empty(len(body), dtype=np.float64)
        for i, row in enumerate(body):
            try:
                out[i] = float(row[j])
            except ValueError:
                # Every row has the header's field count (checked above).
                raise CsvError(
                    f"{path}: line {i + 2}, column {name!r}: not a number: {row[j]!r}"
                ) from None
            if not np.isfinite(out[i]):
                raise CsvError(
                    f"{path}: line {i + 2}, column {name!r}: non-finite value {row[j]!r}"
                )
        return out

    values = np.stack([column(c) for c in wanted], axis=1) if body else np.empty((0, len(wanted)))
    if timestamp_column is None:
        raw = [str(i) for i in range(len(body))]
        ts = np.arange(len(body), dtype=np.float64)
    else:
        j = header.index(timestamp_column)
        raw = [row[j] for row in body]
        ts = parse_timestamps(raw, str(path))
    extra = {c: column(c) for c in extra_columns if c in header}
    return Table(path, ts, values, tuple(wanted), raw, extra)


def data_hash(arrays: Sequence[NDArray[np.floating]], channels: Sequence[str]) -> str:
    """SHA-256 over channel names and values: identifies the exact training data."""
    h = hashlib.sha256()
    h.update("\x00".join(channels).encode())
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()
