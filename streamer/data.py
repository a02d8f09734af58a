"""Reading sensor CSV files (training, offline scoring, producing, evaluation).

Gaps in a file (a cell that is empty, ``NaN``, ``NA``, ``N/A``, ``null`` or ``None``)
follow ``csv.missing``:

- ``refuse`` stops with the file, line and column of the first gap;
- ``skip`` drops every row with a gap; the file then falls into stretches of
  consecutive rows (``Table.segments``), and a window never spans a dropped row;
- ``fill`` carries each channel's last value forward; rows before a channel's first
  value are dropped (there is nothing to carry).

Anything else that is not a finite number (``abc``, ``inf``) is refused whatever the
policy: it is a malformed file, not a gap. Timestamps are never filled or skipped: a
bad one is refused.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from streamer.errors import CsvError

if TYPE_CHECKING:
    from streamer.config import MissingPolicy

__all__ = [
    "Stretches",
    "Table",
    "check_increasing",
    "data_hash",
    "gap_note",
    "parse_timestamps",
    "read_csv",
    "read_stretches",
]

# Spellings of "no value" that spreadsheets, pandas and loggers write (compared in lower
# case). NaN is one as well: float() reads it, and it is a gap, not a measurement.
_MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})


@dataclass(frozen=True, slots=True)
class Table:
    """Columns of one CSV file as arrays, with the rows ``csv.missing`` kept.

    ``rows`` and ``lines`` say where each kept row came from: its index among the file's
    data rows (blank lines not counted) and its line in the file (the header is line 1).
    """

    path: Path
    timestamps: NDArray[np.float64]  # epoch seconds (row index when the file has no time column)
    values: NDArray[np.float64]  # (rows, channels)
    channels: tuple[str, ...]
    raw_timestamps: list[str]
    rows: NDArray[np.int64]
    lines: NDArray[np.int64]
    extra: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    skipped: int = 0  # data rows dropped for a gap (csv.missing skip, or leading under fill)
    filled: int = 0  # cells given the previous row's value (csv.missing fill)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def segments(self) -> list[NDArray[np.float64]]:
        """The values in stretches of consecutive file rows.

        A row dropped for a gap ends a stretch, so a window cut from one never spans it.
        """
        if not self.rows.size:
            return []
        cuts = np.flatnonzero(np.diff(self.rows) != 1) + 1
        return list(np.split(self.values, cuts))


def parse_timestamps(
    raw: Sequence[str], where: str, lines: Sequence[int] | None = None
) -> NDArray[np.float64]:
    """Epoch seconds from epoch numbers or ISO-8601 strings; CsvError names the bad row.

    ``lines``: each value's line in its file, named in the error (else its row number).
    """

    def bad(i: int) -> CsvError:
        at = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
        return CsvError(f"{where}: {at}: bad timestamp {raw[i]!r}")

    try:
        epoch = np.asarray([float(x) for x in raw], dtype=np.float64)
    except ValueError:
        pass
    else:
        wrong = np.flatnonzero(~np.isfinite(epoch))
        if wrong.size:
            raise bad(int(wrong[0]))
        return epoch
    out = np.empty(len(raw), dtype=np.float64)
    for i, text in enumerate(raw):
        try:
            stamp = np.datetime64(text.strip().replace("Z", ""), "ns")
        except ValueError:
            raise bad(i) from None
        if np.isnat(stamp):  # numpy reads an empty string (and "NaT") as no time at all
            raise bad(i)
        out[i] = stamp.astype(np.int64) / 1e9
    return out


def _records(
    path: Path, separator: str, first_rows: int | None
) -> tuple[list[str], list[list[str]], list[int]]:
    """The header, the non-blank data records (the first ``first_rows``) and their lines."""
    body: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter=separator)
            first = next(reader, None)
            if first is None:
                raise CsvError(f"{path}: empty file")
            for record in reader:
                if first_rows is not None and len(body) >= first_rows:
                    break
                if not record:
                    continue
                if len(record) != len(first):
                    raise CsvError(
                        f"{path}: line {reader.line_num}: {len(record)} fields, the header "
                        f"has {len(first)} (separator {separator!r})"
                    )
                body.append(record)
                lines.append(reader.line_num)
    except OSError as exc:
        raise CsvError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CsvError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except csv.Error as exc:
        raise CsvError(f"{path}: line {reader.line_num}: {exc}") from exc
    return [h.strip() for h in first], body, lines


def _column(
    path: Path, name: str, j: int, body: list[list[str]], lines: list[int], gaps: bool
) -> NDArray[np.float64]:
    """Column ``j`` as floats; a gap is NaN when ``gaps``, else an error; junk always one."""
    out = np.empty(len(body), dtype=np.float64)
    for i, row in enumerate(body):
        text = row[j]
        try:
            value = float(text)
        except ValueError:
            if gaps and text.strip().lower() in _MISSING_TOKENS:
                out[i] = np.nan
                continue
            raise CsvError(
                f"{path}: line {lines[i]}, column {name!r}: not a number: {text!r}"
            ) from None
        if np.isinf(value) or (np.isnan(value) and not gaps):
            raise CsvError(f"{path}: line {lines[i]}, column {name!r}: non-finite value {text!r}")
        out[i] = value
    return out


def _kept_rows(
    path: Path,
    values: NDArray[np.float64],
    wanted: list[str],
    body: list[list[str]],
    header: list[str],
    lines: list[int],
    missing: MissingPolicy,
) -> tuple[NDArray[np.int64], NDArray[np.float64], int]:
    """The indices of the rows ``missing`` keeps, their values, and the cells filled."""
    gap = np.isnan(values)
    gap_rows = gap.any(axis=1)
    if not gap_rows.any():
        return np.arange(values.shape[0], dtype=np.int64), values, 0
    if missing == "refuse":
        i = int(np.argmax(gap_rows))
        name = wanted[int(np.argmax(gap[i]))]
        raise CsvError(
            f"{path}: line {lines[i]}, column {name!r}: missing value "
            f"{body[i][header.index(name)]!r} ({int(gap_rows.sum())} rows with gaps; "
            "csv.missing: skip drops such rows, fill carries the last value forward)"
        )
    if missing == "skip":
        kept = np.flatnonzero(~gap_rows)
        return kept, values[kept], 0
    # fill: each cell takes the value of the newest row at or before it with one.
    index = np.where(gap, -1, np.arange(values.shape[0])[:, None])
    source = np.maximum.accumulate(index, axis=0)
    kept = np.flatnonzero((source >= 0).all(axis=1))
    filled = values[source[kept], np.arange(values.shape[1])]
    return kept, filled, int(gap[kept].sum())


def read_csv(
    path: Path | str,
    separator: str = ",",
    timestamp_column: str | None = "timestamp",
    columns: Sequence[str] | None = None,
    extra_columns: Sequence[str] = (),
    missing: MissingPolicy = "refuse",
    first_rows: int | None = None,
) -> Table:
    """Read ``columns`` (default: every column but the timestamp and extras) as float channels.

    Gaps in those columns follow ``missing`` (see the module docstring); the extra
    columns and the timestamps admit none. ``first_rows``: read only the file's first so
    many data rows. CsvError names the file, line and value.
    """
    path = Path(path)
    header, body, lines = _records(path, separator, first_rows)
    if len(header) == 1 and separator not in header[0] and (";" in header[0] or "," in header[0]):
        guess = ";" if ";" in header[0] else ","
        raise CsvError(f"{path}: only one column with separator {separator!r}; is it {guess!r}?")
    if timestamp_column is not None and timestamp_column not in header:
        raise CsvError(f"{path}: no timestamp column {timestamp_column!r} (columns: {header})")
    skip = {timestamp_column, *extra_columns}
    wanted = list(columns) if columns is not None else [h for h in header if h not in skip]
    absent = [c for c in wanted if c not in header]
    if absent:
        raise CsvError(f"{path}: missing channel columns {absent} (columns: {header})")
    if not wanted:
        raise CsvError(f"{path}: no channel columns")

    parsed = [_column(path, c, header.index(c), body, lines, True) for c in wanted]
    values = np.stack(parsed, axis=1) if body else np.empty((0, len(wanted)))
    kept, values, filled = _kept_rows(path, values, wanted, body, header, lines, missing)
    extra = {
        c: _column(path, c, header.index(c), body, lines, False)[kept]
        for c in extra_columns
        if c in header
    }
    kept_lines = [lines[i] for i in kept.tolist()]
    if timestamp_column is None:
        raw = [str(i) for i in kept.tolist()]
        ts = kept.astype(np.float64)
    else:
        j = header.index(timestamp_column)
        raw = [body[i][j] for i in kept.tolist()]
        ts = parse_timestamps(raw, str(path), kept_lines)
    return Table(
        path,
        ts,
        values,
        tuple(wanted),
        raw,
        kept,
        np.asarray(kept_lines, dtype=np.int64),
        extra,
        skipped=len(body) - kept.size,
        filled=filled,
    )


@dataclass(frozen=True, slots=True)
class Stretches:
    """A training file as stretches of consecutive rows, and what was left out of it."""

    path: Path
    segments: list[NDArray[np.float64]]
    skipped: int  # data rows dropped for a gap
    filled: int  # cells given the previous row's value
    short: int  # rows kept, but in a stretch too short for one window

    def note(self) -> str | None:
        """One line saying what ``csv.missing`` changed in the file, or None if nothing."""
        return gap_note(self.path, self.skipped, self.filled, self.short)


def gap_note(path: Path, skipped: int, filled: int, short: int = 0) -> str | None:
    """One line saying what ``csv.missing`` did to a file, or None if it did nothing.

    ``short``: rows kept but left out, in stretches too short for one window.
    """
    said = []
    if skipped:
        said.append(f"skipped {skipped} rows with gaps")
    if filled:
        said.append(f"filled {filled} missing values from the row before")
    if short:
        said.append(f"left out {short} rows in stretches shorter than a window")
    return f"{path}: {'; '.join(said)}" if said else None


def read_stretches(
    path: Path | str,
    separator: str,
    timestamp_column: str | None,
    columns: Sequence[str],
    missing: MissingPolicy,
    min_rows: int,
    first_rows: int | None = None,
) -> Stretches:
    """Read a training file and cut it where ``missing`` dropped rows (``Table.segments``).

    Stretches shorter than ``min_rows`` (the window) are left out: no window fits them.
    ``first_rows``: only the file's first so many data rows are read.
    """
    table = read_csv(
        path, separator, timestamp_column, columns, missing=missing, first_rows=first_rows
    )
    segments = table.segments()
    kept = [s for s in segments if s.shape[0] >= min_rows]
    short = sum(s.shape[0] for s in segments) - sum(s.shape[0] for s in kept)
    return Stretches(table.path, kept, table.skipped, table.filled, short)


def check_increasing(table: Table) -> None:
    """CsvError naming the first row whose timestamp is not after every earlier row's.

    The daemon and the offline engine take a sensor's samples in time order only: such a
    row would be dead-lettered as ``out_of_order``, or refused by ``score``.
    """
    ts = table.timestamps
    if ts.size < 2:
        return
    bad = np.flatnonzero(ts[1:] <= np.maximum.accumulate(ts)[:-1]) + 1
    if bad.size:
        i = int(bad[0])
        raise CsvError(
            f"{table.path}: line {int(table.lines[i])}: timestamp {table.raw_timestamps[i]!r} "
            f"is not after the previous rows' ({bad.size} such rows)"
        )


def data_hash(arrays: Sequence[NDArray[np.floating]], channels: Sequence[str]) -> str:
    """SHA-256 over channel names and values: identifies the exact training data."""
    h = hashlib.sha256()
    h.update("\x00".join(channels).encode())
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()
