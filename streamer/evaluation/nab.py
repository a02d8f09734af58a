"""The Numenta Anomaly Benchmark (NAB) scorer, reimplemented in numpy.

Semantics follow NAB v1.1 (github numenta/NAB: ``nab/sweeper.py``,
``nab/optimizer.py``, ``nab/scorer.py``, ``nab/runner.py``, ``nab/labeler.py``,
``nab/util.py``):

* **Probation.** The first ``min(floor(0.15 * n), 0.15 * 5000)`` rows of a file
  (at most 750) are dropped before scoring: detections there count for nothing,
  window rows there cannot earn credit, and a window lying wholly inside probation
  is neither rewarded nor charged as missed.
* **Windows.** Window limits in ``combined_windows.json`` must each match exactly
  one timestamp of the file. A window covers the rows from its start row to its
  end row inclusive (by position; NAB files may repeat or step back timestamps).
* **Per-row weights.** For a row ``i`` inside a window ``[L, R]`` of width
  ``W = R - L + 1`` the weight is ``tpWeight * S(-(R - i + 1) / W) / S(-1)``, with
  ``S(x) = 2 * sigmoid(-5x) - 1`` (``S(x) = -1`` for ``x > 3``): ``tpWeight`` at
  the left edge, about 0 at the right edge. A row outside every window weighs
  ``fpWeight * S((i - R') / (W' - 1))`` where ``[L', R']`` is the nearest window
  before it (width ``W'``), or ``-fpWeight`` when no window precedes it.
* **Score at a threshold.** A row is a detection when its anomaly score is
  ``>= threshold``. Each window contributes ``max(-fnWeight, max weight of its
  detected rows)`` (its earliest detection in practice; ``-fnWeight`` when missed),
  and each detection outside windows adds its (negative) weight.
* **Threshold optimisation.** One threshold per profile is chosen over the whole
  corpus: NAB's sweep sorts every scorable row of every file by anomaly score and
  evaluates the score at each distinct score value, plus the start threshold 1.1
  (no detections). The best is the highest score; among equal scores the highest
  threshold wins (NAB sorts the sweep by score with a stable sort). This module
  evaluates exactly the same candidate set, so it reproduces NAB's optimiser.
* **Normalisation.** ``100 * (S - S_null) / (S_perfect - S_null)``, where
  ``S_null`` is the optimised score of NAB's null detector (a constant 0.5; its
  best is almost always "never alarm", i.e. ``-fnWeight`` per scorable window)
  and ``S_perfect = tpWeight * (number of windows in the label file)``.

Differences from NAB, all in cases NAB does not handle: a row after a window one
row wide weighs ``-fpWeight`` (NAB divides by zero there), and anomaly scores
outside ``[0, 1]`` or NaN after probation are rejected rather than sorted
arbitrarily.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from streamer.errors import ConfigError, DataError
from streamer.evaluation.nab_corpus import PROFILE_KEYS, STANDARD_PROFILES, CostProfile, NabFile

__all__ = [
    "OutOfFoldResult",
    "ProfileResult",
    "scaled_sigmoid",
    "score_at_threshold",
    "score_corpus",
    "score_corpus_out_of_fold",
    "threshold_curve",
    "write_nab_results",
]

# NAB's sweep starts above every possible score, which records the "no detection" score.
_START_THRESHOLD = 1.1

# The null detector's constant output (nab/detectors/null/null_detector.py).
_NULL_SCORE = 0.5


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """Outcome of one profile's threshold sweep over a corpus.

    ``score`` is NAB's raw score at ``threshold`` and ``normalized`` the reported
    0-100 figure. The counts are NAB's row counts over scorable rows at that
    threshold (a detection inside a window is a TP row, outside an FP row).
    """

    threshold: float
    score: float
    normalized: float
    null_score: float
    perfect_score: float
    tp: int
    fp: int
    fn: int
    tn: int


def scaled_sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """NAB's ``scaledSigmoid``: ``2 * sigmoid(-5x) - 1``, and ``-1`` beyond ``x > 3``."""
    x = np.asarray(x, dtype=np.float64)
    # Clip only to keep exp() finite; those positions are replaced by -1 anyway.
    sig = 1.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0)))
    out: NDArray[np.float64] = np.where(x > 3.0, -1.0, 2.0 * sig - 1.0)
    return out


_MAX_TP = float(scaled_sigmoid(np.array([-1.0]))[0])


# --------------------------------------------------------------------------- scoring


def _row_geometry(f: NabFile) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Unweighted sigmoid value and window index (-1 outside) of every row of ``f``.

    Inside windows the value still lacks the ``tpWeight / S(-1)`` factor and outside
    the ``fpWeight`` factor, so one geometry serves every profile.
    """
    n = len(f)
    idx = np.arange(n, dtype=np.float64)
    # Rows before the first window: "really far away from the nearest window".
    raw = np.full(n, -1.0)
    window = np.full(n, -1, dtype=np.intp)
    for k, (start, end) in enumerate(f.windows):
        width = float(end - start + 1)
        raw[start : end + 1] = scaled_sigmoid(-(end - idx[start : end + 1] + 1.0) / width)
        window[start : end + 1] = k
        stop = f.windows[k + 1][0] if k + 1 < len(f.windows) else n
        if width > 1:
            raw[end + 1 : stop] = scaled_sigmoid(np.abs(end - idx[end + 1 : stop]) / (width - 1.0))
        else:
            raw[end + 1 : stop] = -1.0  # NAB would divide by zero here.
    return raw, window


def _weights(
    raw: NDArray[np.float64], window: NDArray[np.intp], profile: CostProfile
) -> NDArray[np.float64]:
    out: NDArray[np.float64] = np.where(
        window >= 0, raw * profile.tp_weight / _MAX_TP, raw * profile.fp_weight
    )
    return out


def _checked_scores(f: NabFile, anomaly_scores: Mapping[str, npt.ArrayLike]) -> NDArray[np.float64]:
    if f.name not in anomaly_scores:
        raise DataError(f"no anomaly scores for {f.name!r}")
    try:
        scores = np.asarray(anomaly_scores[f.name], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"anomaly scores for {f.name!r} are not numeric: {exc}") from exc
    if scores.shape != (len(f),):
        raise DataError(
            f"anomaly scores for {f.name!r} have shape {scores.shape}, expected ({len(f)},)"
        )
    tail = scores[f.probation :]
    bad = np.flatnonzero(~((tail >= 0.0) & (tail <= 1.0)))  # also catches NaN
    if bad.size:
        i = int(bad[0]) + f.probation
        raise DataError(
            f"anomaly score of {f.name!r} row {i} is {scores[i]!r}; "
            "after probation scores must lie in [0, 1]"
        )
    return scores


@dataclass(frozen=True, slots=True)
class _Scorable:
    """Every scorable (post-probation) row of a corpus, concatenated."""

    score: NDArray[np.float64]
    raw: NDArray[np.float64]
    window: NDArray[np.intp]  # corpus-wide window id, -1 outside windows
    n_windows: int  # windows with at least one scorable row


def _scorable(files: Sequence[NabFile], scores: Sequence[NDArray[np.float64]]) -> _Scorable:
    s_parts, r_parts, w_parts = [], [], []
    offset = 0
    for f, s in zip(files, scores, strict=True):
        raw, window = _row_geometry(f)
        keep = slice(f.probation, None)
        s_parts.append(s[keep])
        r_parts.append(raw[keep])
        w_parts.append(np.where(window[keep] >= 0, window[keep] + offset, -1))
        offset += len(f.windows)
    window = np.concatenate(w_parts).astype(np.intp)
    return _Scorable(
        score=np.concatenate(s_parts),
        raw=np.concatenate(r_parts),
        window=window,
        n_windows=int(np.unique(window[window >= 0]).size),
    )


@dataclass(frozen=True, slots=True)
class _Curve:
    thresholds: NDArray[np.float64]  # descending, starting with 1.1
    scores: NDArray[np.float64]
    tp: NDArray[np.int64]
    fp: NDArray[np.int64]
    n_in: int
    n_out: int


def _sweep(rows: _Scorable, profile: CostProfile) -> _Curve:
    """NAB's ``calcScoreByThreshold`` over the whole corpus, vectorised.

    Rows are sorted by descending anomaly score; lowering the threshold past a row
    adds its FP weight, or raises its window's part from the previous running
    maximum (starting at ``-fnWeight``) to the new one. The cumulative sum of those
    per-row changes, read at the last row of each run of equal scores, is the
    score at that threshold.
    """
    weight = _weights(rows.raw, rows.window, profile)
    order = np.argsort(-rows.score, kind="stable")
    s = rows.score[order]
    g = rows.window[order]
    w = weight[order]

    delta = np.where(g < 0, w, 0.0)
    floor = -profile.fn_weight
    in_window = np.flatnonzero(g >= 0)
    # Group window rows by window, keeping descending-score order within each.
    grouped = in_window[np.argsort(g[in_window], kind="stable")]
    if grouped.size:
        gid = g[grouped]
        starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], grouped.size], strict=True):
            pos = grouped[a:b]
            running = np.maximum.accumulate(np.maximum(w[pos], floor))
            delta[pos] = running - np.r_[floor, running[:-1]]

    base = floor * rows.n_windows
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.empty(0, np.intp)
    cum = np.cumsum(delta)
    is_in = g >= 0
    return _Curve(
        thresholds=np.r_[_START_THRESHOLD, s[last]],
        scores=np.r_[base, base + cum[last]],
        tp=np.r_[0, np.cumsum(is_in, dtype=np.int64)[last]],
        fp=np.r_[0, np.cumsum(~is_in, dtype=np.int64)[last]],
        n_in=int(np.count_nonzero(is_in)),
        n_out=int(np.count_nonzero(~is_in)),
    )


def _prepare(
    files: Sequence[NabFile], anomaly_scores: Mapping[str, npt.ArrayLike]
) -> list[NDArray[np.float64]]:
    if not files:
        raise DataError("the NAB corpus is empty")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise DataError("the NAB corpus lists a file twice")
    return [_checked_scores(f, anomaly_scores) for f in files]


def threshold_curve(
    files: Sequence[NabFile],
    anomaly_scores: Mapping[str, npt.ArrayLike],
    profile: CostProfile,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Every threshold NAB's sweep considers (descending, from 1.1) and the raw score at each."""
    curve = _sweep(_scorable(files, _prepare(files, anomaly_scores)), profile)
    return curve.thresholds, curve.scores


def score_at_threshold(
    files: Sequence[NabFile],
    anomaly_scores: Mapping[str, npt.ArrayLike],
    profile: CostProfile,
    threshold: float,
) -> float:
    """Raw NAB score of the corpus when rows scoring ``>= threshold`` are detections.

    This is NAB's scoring step (``Sweeper.scoreDataSet`` summed over files), written
    independently of the sweep.
    """
    total = 0.0
    for f, s in zip(files, _prepare(files, anomaly_scores), strict=True):
        raw, window = _row_geometry(f)
        keep = slice(f.probation, None)
        weight = _weights(raw[keep], window[keep], profile)
        win = window[keep]
        detected = s[keep] >= threshold
        total += float(weight[detected & (win < 0)].sum())
        for k in np.unique(win[win >= 0]):
            hits = weight[detected & (win == k)]
            total += max(-profile.fn_weight, float(hits.max())) if hits.size else -profile.fn_weight
    return total


def score_corpus(
    files: Sequence[NabFile],
    anomaly_scores: Mapping[str, npt.ArrayLike],
    profiles: Mapping[str, CostProfile] | None = None,
) -> dict[str, ProfileResult]:
    """Optimise one threshold per profile over the corpus and normalise the score.

    ``anomaly_scores`` maps each file's ``name`` to one score per row, in [0, 1]
    after probation (anything, NaN included, inside it). ``profiles`` defaults to
    NAB's standard three. Result keys are NAB profile names mapped through
    ``PROFILE_KEYS`` (``standard``, ``reward_low_FP``, ``reward_low_FN``).
    """
    if profiles is None:
        profiles = STANDARD_PROFILES
    rows = _scorable(files, _prepare(files, anomaly_scores))
    null_rows = _Scorable(
        score=np.full_like(rows.score, _NULL_SCORE),
        raw=rows.raw,
        window=rows.window,
        n_windows=rows.n_windows,
    )
    total_windows = sum(len(f.windows) for f in files)

    results: dict[str, ProfileResult] = {}
    for pname, profile in profiles.items():
        curve = _sweep(rows, profile)
        # argmax returns the first maximum: the highest threshold among ties, as in NAB.
        best = int(np.argmax(curve.scores))
        score = float(curve.scores[best])
        null = float(np.max(_sweep(null_rows, profile).scores))
        perfect = profile.tp_weight * total_windows
        span = perfect - null
        tp, fp = int(curve.tp[best]), int(curve.fp[best])
        results[PROFILE_KEYS.get(pname, pname)] = ProfileResult(
            threshold=float(curve.thresholds[best]),
            score=score,
            normalized=100.0 * (score - null) / span if span else math.nan,
            null_score=null,
            perfect_score=perfect,
            tp=tp,
            fp=fp,
            fn=curve.n_in - tp,
            tn=curve.n_out - fp,
        )
    return results


@dataclass(frozen=True, slots=True)
class OutOfFoldResult:
    """One profile scored out of fold: each fold's threshold chosen on the other folds."""

    thresholds: list[float]  # per fold
    score: float  # raw, summed over the held-out folds
    normalized: float


def score_corpus_out_of_fold(
    files: Sequence[NabFile],
    anomaly_scores: Mapping[str, npt.ArrayLike],
    folds: Sequence[int],
    profiles: Mapping[str, CostProfile] | None = None,
) -> dict[str, OutOfFoldResult]:
    """NAB's score with the threshold chosen without the labels of the files it scores.

    ``folds[i]`` is the fold of ``files[i]``. For each fold and profile, the threshold
    NAB's sweep would pick on the other folds' files is applied to the fold's files;
    the raw scores of the folds add up (NAB's raw score is a sum over files) and are
    normalised with the whole corpus's null and perfect scores, as in ``score_corpus``.
    """
    if profiles is None:
        profiles = STANDARD_PROFILES
    if len(folds) != len(files):
        raise DataError(f"{len(folds)} fold numbers for {len(files)} files")
    whole = score_corpus(files, anomaly_scores, profiles)
    out: dict[str, OutOfFoldResult] = {}
    for pname, profile in profiles.items():
        key = PROFILE_KEYS.get(pname, pname)
        thresholds, total = [], 0.0
        for fold in sorted(set(folds)):
            train = [f for f, k in zip(files, folds, strict=True) if k != fold]
            held = [f for f, k in zip(files, folds, strict=True) if k == fold]
            ts, raw = threshold_curve(train, anomaly_scores, profile)
            threshold = float(ts[int(np.argmax(raw))])  # the highest among ties, as NAB
            thresholds.append(threshold)
            total += score_at_threshold(held, anomaly_scores, profile, threshold)
        ref = whole[key]
        span = ref.perfect_score - ref.null_score
        out[key] = OutOfFoldResult(
            thresholds=thresholds,
            score=total,
            normalized=100.0 * (total - ref.null_score) / span if span else math.nan,
        )
    return out


# --------------------------------------------------------------------------- results files

_DETECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _format_timestamps(timestamps: npt.ArrayLike) -> list[str]:
    arr = np.asarray(timestamps)
    if arr.dtype.kind in "iuf":
        # Unix seconds -> datetime64; NAB files carry whole seconds.
        arr = (
            (np.asarray(arr, dtype=np.float64) * 1e9)
            .round()
            .astype(np.int64)
            .astype("datetime64[ns]")
        )
    elif arr.dtype.kind != "M":
        raise DataError(f"timestamps must be datetime64 or Unix seconds, got dtype {arr.dtype}")
    return [t.replace("T", " ") for t in np.datetime_as_string(arr, unit="s")]


def write_nab_results(
    out_dir: Path,
    detector: str,
    file: NabFile,
    timestamps: npt.ArrayLike,
    scores: npt.ArrayLike,
) -> Path:
    """Write ``<out_dir>/<category>/<detector>_<name>.csv`` in NAB's results layout.

    The file has the header ``timestamp,anomaly_score``; timestamps are written
    ``YYYY-MM-DD HH:MM:SS`` as in NAB's data. NaN scores inside probation are
    written as 0.0 (NAB ignores those rows, its tools expect numbers). Returns the
    path written.
    """
    if not _DETECTOR_NAME.fullmatch(detector):
        raise ConfigError(f"detector name {detector!r} must be letters, digits, '_', '.', '-'")
    values = _checked_scores(file, {file.name: scores})
    stamps = _format_timestamps(timestamps)
    if len(stamps) != len(file):
        raise DataError(f"{file.name!r}: {len(stamps)} timestamps for {len(file)} rows")
    values = np.where(np.isfinite(values), values, 0.0)

    category, _, base = file.name.rpartition("/")
    target = Path(out_dir) / category / f"{detector}_{base}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["timestamp", "anomaly_score"])
        writer.writerows(zip(stamps, (repr(float(v)) for v in values), strict=True))
    return target
