"""NAB's files: a corpus in NAB's layout (data, labels, profiles), read and checked.

``data/<category>/<file>.csv`` hold ``timestamp,value`` rows;
``labels/combined_windows.json`` the anomaly windows by file, whose limits must each
match one timestamp of the file; ``profiles.json`` the cost profiles. Scoring is in
:mod:`streamer.evaluation.nab`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamer.errors import DataError

__all__ = [
    "PROBATION_PERCENT",
    "PROFILE_KEYS",
    "STANDARD_PROFILES",
    "CostProfile",
    "NabFile",
    "load_nab_corpus",
    "load_nab_profiles",
    "probation_length",
]

PROBATION_PERCENT = 0.15
"""NAB's probationary fraction of each file."""

# NAB caps probation at probationPercent * 5000 rows (750 for the default 15 %).
_PROBATION_CAP_ROWS = 5000


@dataclass(frozen=True, slots=True)
class CostProfile:
    """One NAB application profile: the weights of its cost matrix."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


STANDARD_PROFILES: Mapping[str, CostProfile] = {
    "standard": CostProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    "reward_low_FP_rate": CostProfile(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    "reward_low_FN_rate": CostProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
}
"""NAB's three profiles (``config/profiles.json``), used when no profiles file exists."""

PROFILE_KEYS: Mapping[str, str] = {
    "standard": "standard",
    "reward_low_FP_rate": "reward_low_FP",
    "reward_low_FN_rate": "reward_low_FN",
}
"""NAB profile name -> key in ``score_corpus`` output; other names are kept as they are."""


@dataclass(frozen=True, eq=False, slots=True)
class NabFile:
    """One data file of a NAB-layout corpus.

    ``windows`` holds inclusive row-index ranges ``(start, end)``, sorted and
    disjoint; ``probation`` is the number of leading rows NAB does not score.
    """

    name: str  # "category/file.csv", the key in combined_windows.json
    timestamps: NDArray[np.datetime64]  # datetime64[ns]
    values: NDArray[np.float64]
    windows: tuple[tuple[int, int], ...]
    probation: int

    def __len__(self) -> int:
        return int(self.values.shape[0])


def probation_length(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that NAB leaves unscored (``nab/util.py``)."""
    return int(min(math.floor(percent * n_rows), percent * _PROBATION_CAP_ROWS))


# --------------------------------------------------------------------------- loading


def _parse_timestamps(where: str, texts: Sequence[str]) -> NDArray[np.datetime64]:
    try:
        return np.array(texts, dtype="datetime64[ns]")
    except ValueError:
        # Find the offending entry for the message; this path is rare.
        for i, text in enumerate(texts):
            try:
                np.datetime64(text, "ns")
            except ValueError:
                raise DataError(f"{where}: unparseable timestamp {text!r} (row {i})") from None
        raise


def _read_csv(path: Path, name: str) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot read {path}: {exc}") from exc
    if not rows:
        raise DataError(f"{name}: empty file")
    header = [h.strip() for h in rows[0]]
    try:
        t_col, v_col = header.index("timestamp"), header.index("value")
    except ValueError:
        raise DataError(f"{name}: header must name 'timestamp' and 'value', got {header}") from None
    body = rows[1:]
    if not body:
        raise DataError(f"{name}: no data rows")
    width = max(t_col, v_col) + 1
    stamps: list[str] = []
    values = np.empty(len(body), dtype=np.float64)
    for i, row in enumerate(body):
        if len(row) < width:
            raise DataError(f"{name}: line {i + 2} has {len(row)} fields, expected {len(header)}")
        stamps.append(row[t_col])
        try:
            values[i] = float(row[v_col])
        except ValueError:
            raise DataError(f"{name}: line {i + 2}: value {row[v_col]!r} is not a number") from None
    return _parse_timestamps(name, stamps), values


def _load_json(path: Path) -> Any:
    try:
        with path.open() as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _window_rows(
    name: str, timestamps: NDArray[np.datetime64], raw: object
) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list):
        raise DataError(f"combined_windows.json[{name!r}] must be a list of [start, end] pairs")
    out: list[tuple[int, int]] = []
    for k, pair in enumerate(raw):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            raise DataError(f"combined_windows.json[{name!r}][{k}] must be [start, end] strings")
        rows: list[int] = []
        for text in pair:
            stamp = _parse_timestamps(f"combined_windows.json[{name!r}][{k}]", [text])[0]
            hits = np.flatnonzero(timestamps == stamp)
            # NAB's labeler insists on exactly one matching row per window limit.
            if hits.size != 1:
                raise DataError(
                    f"combined_windows.json[{name!r}][{k}]: timestamp {text!r} matches "
                    f"{hits.size} rows of the file, expected exactly 1"
                )
            rows.append(int(hits[0]))
        start, end = rows
        if end < start:
            raise DataError(f"combined_windows.json[{name!r}][{k}]: window ends before it starts")
        if out and start <= out[-1][1]:
            raise DataError(
                f"combined_windows.json[{name!r}][{k}]: windows must be sorted and disjoint"
            )
        out.append((start, end))
    return tuple(out)


def load_nab_profiles(data_dir: Path) -> dict[str, CostProfile]:
    """Profiles from ``<data_dir>/profiles.json``, or NAB's three standard ones if absent."""
    path = Path(data_dir) / "profiles.json"
    if not path.exists():
        return dict(STANDARD_PROFILES)
    raw = _load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty object of profiles")
    out: dict[str, CostProfile] = {}
    for pname, body in raw.items():
        matrix = body.get("CostMatrix") if isinstance(body, dict) else None
        if not isinstance(matrix, dict):
            raise DataError(f"{path}: profile {pname!r} has no 'CostMatrix' object")
        weights: list[float] = []
        for key in ("tpWeight", "fpWeight", "fnWeight"):
            value = matrix.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DataError(f"{path}: profile {pname!r} CostMatrix.{key} must be a number")
            weights.append(float(value))
        out[pname] = CostProfile(*weights)
    return out


def load_nab_corpus(data_dir: Path) -> list[NabFile]:
    """Load a NAB-layout folder: ``data/**/*.csv`` plus ``labels/combined_windows.json``.

    Every data file must have an entry in the label file and every entry a data
    file (NAB's perfect score counts every labelled window). Files come back
    sorted by name. Raises ``DataError`` naming the file or label key at fault.
    """
    root = Path(data_dir)
    data_root = root / "data"
    label_path = root / "labels" / "combined_windows.json"
    if not data_root.is_dir():
        raise DataError(f"{data_root} is not a directory")
    if not label_path.is_file():
        raise DataError(f"{label_path} does not exist")
    labels = _load_json(label_path)
    if not isinstance(labels, dict):
        raise DataError(f"{label_path}: expected an object mapping file names to windows")

    paths = {p.relative_to(data_root).as_posix(): p for p in sorted(data_root.rglob("*.csv"))}
    if not paths:
        raise DataError(f"{data_root} holds no .csv files")
    unlabelled = sorted(set(paths) - set(labels))
    if unlabelled:
        raise DataError(f"{label_path} has no entry for data file {unlabelled[0]!r}")
    orphans = sorted(set(labels) - set(paths))
    if orphans:
        raise DataError(f"{label_path}: key {orphans[0]!r} has no data file under {data_root}")

    files: list[NabFile] = []
    for name, path in paths.items():
        timestamps, values = _read_csv(path, name)
        files.append(
            NabFile(
                name=name,
                timestamps=timestamps,
                values=values,
                windows=_window_rows(name, timestamps, labels[name]),
                probation=probation_length(values.shape[0]),
            )
        )
    return files
