"""Point-wise confusion counts and the SKAB leaderboard metrics.

The SKAB protocol pools one confusion matrix over all scored files (point-wise, no
point-adjust) and reports, as fractions:

* F1 = TP / (TP + (FP + FN) / 2)
* FAR (false alarm rate) = FP / (FP + TN)
* MAR (missed alarm rate) = FN / (FN + TP)

A metric whose denominator is zero is reported as 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from streamer.errors import DataError

__all__ = ["Confusion", "skab_confusion", "skab_metrics"]


@dataclass(frozen=True, slots=True)
class Confusion:
    """Point-wise confusion counts; ``a + b`` and ``sum(...)`` pool them over files."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        if not isinstance(other, Confusion):
            return NotImplemented
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    def __radd__(self, other: object) -> Confusion:
        # The builtin sum() starts from the integer 0.
        if isinstance(other, int) and other == 0:
            return self
        if isinstance(other, Confusion):
            return other.__add__(self)
        return NotImplemented

    @property
    def total(self) -> int:
        """Number of points counted."""
        return self.tp + self.fp + self.fn + self.tn

    @classmethod
    def pooled(cls, parts: Iterable[Confusion]) -> Confusion:
        """The sum of ``parts`` (the empty confusion when there are none)."""
        out = cls()
        for part in parts:
            out = out + part
        return out


def _binary(name: str, values: npt.ArrayLike) -> NDArray[np.bool_]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{name} must be numeric 0/1 or boolean, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr != 0) & (arr != 1))  # NaN fails both comparisons
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{name}[{i}] = {arr[i]!r} is not 0 or 1")
    out: NDArray[np.bool_] = arr == 1
    return out


def skab_confusion(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> Confusion:
    """Point-wise confusion of binary predictions against binary labels (1 = anomaly).

    Both inputs are one-dimensional, of equal length, and hold only 0/1 (ints, floats
    such as SKAB's ``1.0``, or booleans). Raises ``DataError`` otherwise.
    """
    truth = _binary("y_true", y_true)
    pred = _binary("y_pred", y_pred)
    if truth.shape != pred.shape:
        raise DataError(f"y_true has {truth.shape[0]} points but y_pred has {pred.shape[0]}")
    tp = int(np.count_nonzero(truth & pred))
    fp = int(np.count_nonzero(~truth & pred))
    fn = int(np.count_nonzero(truth & ~pred))
    return Confusion(tp=tp, fp=fp, fn=fn, tn=int(truth.size) - tp - fp - fn)


def _ratio(num: int | float, den: int | float) -> float:
    return float(num) / float(den) if den else 0.0


def skab_metrics(conf: Confusion) -> dict[str, float]:
    """SKAB's ``f1``, ``far`` and ``mar`` as fractions (0.0 where a denominator is 0)."""
    return {
        "f1": _ratio(conf.tp, conf.tp + (conf.fp + conf.fn) / 2),
        "far": _ratio(conf.fp, conf.fp + conf.tn),
        "mar": _ratio(conf.fn, conf.fn + conf.tp),
    }
