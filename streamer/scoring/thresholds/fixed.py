"""A constant threshold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from streamer.scoring.thresholds.base import (
    MIN_CALIBRATION,
    STATE_VERSION,
    ThresholdResult,
    shallow,
)
from streamer.scoring.thresholds.checks import (
    _calibration_scores,
    _live_scores,
    _positive,
)
from streamer.scoring.thresholds.reference import (
    _ecdf,
    _frozen,
    _reference,
)
from streamer.scoring.thresholds.serial import (
    _load,
    _sorted_ref,
    pack_floats,
)


class FixedThreshold:
    """A constant threshold: the write-up's "threshold chosen by the user".

    ``calibrate`` only validates the scores and keeps a bounded sorted sample of them.
    Likelihood: the empirical CDF of that sample once calibrated, otherwise
    ``score / (score + value)`` (0 for scores <= 0), which is 0.5 at the threshold.
    """

    kind: ClassVar[str] = "fixed"
    __slots__ = ("_ref", "_value")

    def __init__(self, value: float) -> None:
        self._value = _positive("value", value)
        self._ref: NDArray[np.float64] | None = None

    def __repr__(self) -> str:
        return f"FixedThreshold(value={self._value!r})"

    def calibrate(self, scores: NDArray[np.floating]) -> None:
        """Validate the scores and keep a sample of them for the likelihood."""
        self._ref = _frozen(_reference(_calibration_scores(scores, MIN_CALIBRATION)))

    @property
    def value(self) -> float:
        """The constant threshold."""
        return self._value

    def step(self, scores: NDArray[np.floating]) -> ThresholdResult:
        """``score > value``; nothing is learned."""
        x = _live_scores(scores)
        return ThresholdResult(np.full(x.size, self._value), x > self._value, self._lik(x))

    def _lik(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        if self._ref is not None:
            return _ecdf(self._ref, x)
        with np.errstate(all="ignore"):
            # value / (x + value) stays finite for x = inf, unlike x / (x + value).
            out: NDArray[np.float64] = np.where(x > 0.0, 1.0 - self._value / (x + self._value), 0.0)
        return out

    def likelihood(self, scores: NDArray[np.floating]) -> NDArray[np.float64]:
        """Empirical CDF of the calibration sample, or ``score / (score + value)``."""
        return self._lik(_live_scores(scores))

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state: the value and the calibration sample (possibly empty)."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "value": self._value,
            **({"ref": pack_floats([] if self._ref is None else self._ref)} if reference else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state, the value included."""

        def build(s: Mapping[str, Any]) -> tuple[float, NDArray[np.float64]]:
            return _positive("value", s["value"]), _sorted_ref(s, "ref")

        value, ref = _load(self.kind, state, build)
        self._value, self._ref = value, (_frozen(ref) if ref.size else None)

    def clone(self) -> FixedThreshold:
        """Independent copy (the read-only calibration sample is shared)."""
        return shallow(self)

    @property
    def reference(self) -> NDArray[np.float64] | None:
        """The calibration sample the likelihood reads (None before calibration)."""
        return self._ref

    def share_reference(self, sample: NDArray[np.float64]) -> None:
        """Read ``sample``, equal to the own one, from now on."""
        self._ref = sample

    @property
    def unsettled(self) -> bool:
        """False: nothing is ever refitted later."""
        return False

    def settle(self) -> None:
        """Nothing is owed (see ``unsettled``)."""

    @classmethod
    def step_each(
        cls, items: Sequence[FixedThreshold], scores: NDArray[np.floating]
    ) -> ThresholdResult:
        """``items[i].step(scores[i:i+1])`` for every i at once (nothing is learned)."""
        x = _live_scores(scores)
        value = np.fromiter((th._value for th in items), np.float64, len(items))
        first = items[0]
        if all(th._ref is first._ref and th._value == first._value for th in items):
            lik = first._lik(x)
        else:
            lik = np.concatenate([th._lik(x[i : i + 1]) for i, th in enumerate(items)])
        return ThresholdResult(value, x > value, lik)
