"""The threshold contract: the result of a step, the Protocols, the shared constants.

A threshold is calibrated once from the model's training residual scores, then stepped
over one sensor's live scores in order (``Stepping``); its state round-trips through
JSON (``Serialisable``). Three capabilities serve ``ThresholdBank`` at 100,000 sensors,
and every implementation declares them, trivially where they do not apply:
``BatchStepping`` (one score of each of many sensors in one vectorised call),
``SharedReference`` (the calibration sample its likelihood reads, shared between the
clones of one prototype instead of copied per sensor) and ``DeferredFit`` (the tail refit
a batch step owes, done when the daemon is idle instead of on a burst's path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, Self, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MIN_CALIBRATION",
    "READABLE_VERSIONS",
    "STATE_VERSION",
    "BatchStepping",
    "DeferredFit",
    "Serialisable",
    "SharedReference",
    "Stepping",
    "Threshold",
    "ThresholdResult",
    "concat",
    "shallow",
]

STATE_VERSION = 2
"""Version written into every state dict; loading one not in READABLE_VERSIONS raises StateError.

Version 2 writes float arrays (peaks, moving windows, calibration samples) as packed
strings (:func:`pack_floats`); version 1 wrote them as JSON lists of numbers.
"""

READABLE_VERSIONS = (1, 2)
"""State dict versions ``load_state_dict`` accepts."""

MIN_CALIBRATION = 10
"""Fewest calibration scores accepted (DSPOT needs ``depth`` more)."""

# Below this many peaks a GPD fit is noise: use an exponential tail with the peaks' mean.
_MIN_PEAKS = 5
# Order statistics kept from the calibration scores for the empirical part of the
# likelihood: enough resolution for a [0, 1] score, small enough to checkpoint per sensor.
_REFERENCE_SIZE = 256
# Thresholds stay finite (and JSON-serialisable) even for absurd tail fits; scores beyond
# this count as +inf, and calibration scores beyond it are refused, so no threshold can
# overflow to inf (an inf score would then not alarm, and be learned).
_MAX_THRESHOLD = 1e300
# |gamma| below this is the exponential limit; the GPD formulas lose precision there.
_GAMMA_ZERO = 1e-12
# Element types of a version-1 float list.
_NUMBERS = frozenset({int, float})


class ThresholdResult(NamedTuple):
    """Per-point outcome of :meth:`Threshold.step`."""

    threshold: NDArray[np.float64]
    """Threshold each point was compared against: the one in force before the point."""
    anomalous: NDArray[np.bool_]
    """``score > threshold`` (and every non-finite score)."""
    likelihood: NDArray[np.float64]
    """Anomaly likelihood in [0, 1] under the state before the point, monotone in the score."""


class Stepping(Protocol):
    """An adaptive threshold for one sensor's stream of window scores."""

    def calibrate(self, scores: NDArray[np.floating]) -> None:
        """Fit from training residual scores and reset all online state."""
        ...

    @property
    def value(self) -> float:
        """Threshold in force for the next point."""
        ...

    def step(self, scores: NDArray[np.floating]) -> ThresholdResult:
        """Process points in order; adapt online, never learning from a point that alarmed."""
        ...

    def likelihood(self, scores: NDArray[np.floating]) -> NDArray[np.float64]:
        """Anomaly likelihood of each score under the current state (no state change)."""
        ...


class Serialisable(Protocol):
    """A threshold's whole state as JSON, and independent copies of it."""

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state, including ``kind``, ``version`` and the parameters.

        ``reference=False`` leaves out the calibration sample (``ref``), for a caller
        that writes its digest instead (``ThresholdBank.export``).
        """
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state (parameters included); StateError if it is unusable."""
        ...

    def clone(self) -> Self:
        """Independent deep copy."""
        ...


class BatchStepping(Protocol):
    """Stepping many thresholds of one kind at once, one score each."""

    @classmethod
    def step_each(cls, items: Sequence[Self], scores: NDArray[np.floating]) -> ThresholdResult:
        """``items[i].step(scores[i:i+1])`` for every i: bit-identical, in one pass."""
        ...


class SharedReference(Protocol):
    """The calibration sample a threshold's likelihood reads, shareable between clones."""

    @property
    def reference(self) -> NDArray[np.float64] | None:
        """The sample (read-only), or None when the threshold keeps none."""
        ...

    def share_reference(self, sample: NDArray[np.float64]) -> None:
        """Read ``sample`` (equal to its own) from now on, so that clones share one array."""
        ...


class DeferredFit(Protocol):
    """A refit that ``step_each`` may leave owed, to be done later with the same result.

    Every read of the fit (the next step, ``value``, ``state_dict``) does an owed refit
    first, so when it runs changes nothing but where its time is spent.
    """

    @property
    def unsettled(self) -> bool:
        """True while a refit is owed."""
        ...

    def settle(self) -> None:
        """Do an owed refit now (a no-op when none is owed)."""
        ...


class Threshold(Stepping, Serialisable, BatchStepping, SharedReference, DeferredFit, Protocol):
    """What ``ThresholdBank`` and the daemon hold per sensor: every capability above."""


_T = TypeVar("_T")


def shallow(obj: _T) -> _T:
    """A shallow copy of a slotted object (``copy.copy`` goes through pickling's protocol)."""
    cls = type(obj)
    new = cls.__new__(cls)
    for name in cls.__slots__:  # type: ignore[attr-defined]
        setattr(new, name, getattr(obj, name))
    return new


def concat(results: list[ThresholdResult]) -> ThresholdResult:
    """The results of consecutive steps, as one."""
    return ThresholdResult(*(np.concatenate(parts) for parts in zip(*results, strict=True)))
