"""SPOT (Siffer et al., "Anomaly Detection in Streams with Extreme Value Theory", KDD 2017)."""

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
    _spot_params,
)
from streamer.scoring.thresholds.core import CoreReference, _core_params, _ensure, _SpotCore
from streamer.scoring.thresholds.gpd import _spot_likelihood
from streamer.scoring.thresholds.reference import (
    _ecdf_each,
)
from streamer.scoring.thresholds.serial import _load


class SpotThreshold(CoreReference):
    """SPOT: a generalized Pareto tail fitted above an initial quantile, alarming above z_q.

    ``calibrate`` sets ``t`` to the empirical ``level`` quantile of the calibration scores,
    fits a GPD to the excesses over ``t`` (:func:`fit_gpd`) and sets
    ``z_q = t + sigma / gamma * ((risk * n / Nt) ** -gamma - 1)``. Online, a score above
    ``z_q`` alarms and is not learned; one in ``(t, z_q]`` is a new peak (refit, new
    ``z_q``); any other only counts towards ``n``. The ``max_peaks`` most recent peaks are
    kept (bounded memory); ``Nt / n`` counts every peak ever seen. With fewer than 5
    peaks the tail is exponential with the peaks' mean as scale, and the scale never goes
    below ``1e-6 * max(std, |t|)`` of the calibration, so ``z_q > t`` always holds.

    Likelihood: ``1 - (Nt / n) * (1 + gamma (x - t) / sigma) ** (-1 / gamma)`` above ``t``;
    below it, the empirical CDF of the calibration scores under ``t`` scaled into
    ``[0, 1 - Nt / n]``.
    """

    kind: ClassVar[str] = "spot"
    __slots__ = ("_core", "_level", "_max_peaks", "_risk")

    def __init__(self, risk: float = 1e-4, level: float = 0.98, max_peaks: int = 1000) -> None:
        self._risk, self._level, self._max_peaks = _spot_params(risk, level, max_peaks)
        self._core: _SpotCore | None = None

    def __repr__(self) -> str:
        return f"SpotThreshold(risk={self._risk!r}, level={self._level!r})"

    def calibrate(self, scores: NDArray[np.floating]) -> None:
        """Fit the initial threshold and the tail from training residual scores."""
        x = _calibration_scores(scores, MIN_CALIBRATION)
        core = _SpotCore(self._risk, self._level, self._max_peaks)
        core.calibrate(x)
        self._core = core

    @property
    def value(self) -> float:
        """z_q: the threshold for the next point."""
        return _ensure(self._core, self.kind).z

    @property
    def tail(self) -> tuple[float, float, float]:
        """``(t, gamma, sigma)`` of the current fit."""
        core = _ensure(self._core, self.kind)
        return core.t, core.gamma, core.sigma

    def step(self, scores: NDArray[np.floating]) -> ThresholdResult:
        """Alarm above z_q; learn peaks in (t, z_q]; count the rest."""
        core = _ensure(self._core, self.kind)
        x = _live_scores(scores)
        size = x.size
        thr = np.empty(size)
        lik = np.empty(size)
        anom = np.zeros(size, dtype=bool)
        # State changes only at a peak, so everything between two peaks is decided at once.
        start, alarms = 0, 0
        for i in np.flatnonzero(x > core.t).tolist():
            if x[i] > core.z:
                anom[i] = True
                alarms += 1
                continue
            seg = slice(start, i + 1)
            thr[seg] = core.z
            lik[seg] = core.likelihood(x[seg])
            core.n += i + 1 - start - alarms
            core.add_peak(float(x[i]) - core.t)
            start, alarms = i + 1, 0
        if start < size:
            thr[start:] = core.z
            lik[start:] = core.likelihood(x[start:])
            core.n += size - start - alarms
        return ThresholdResult(thr, anom, lik)

    def likelihood(self, scores: NDArray[np.floating]) -> NDArray[np.float64]:
        """Anomaly likelihood under the current tail fit."""
        return _ensure(self._core, self.kind).likelihood(_live_scores(scores))

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state (parameters, t, counts, kept peaks, fit, reference)."""
        state: dict[str, Any] = {"kind": self.kind, "version": STATE_VERSION}
        state.update(_ensure(self._core, self.kind).state(reference))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state, parameters included."""
        core: _SpotCore = _load(self.kind, state, _SpotCore.from_state)
        self._risk, self._level, self._max_peaks = core.risk, core.level, core.max_peaks
        self._core = core

    def clone(self) -> SpotThreshold:
        """Independent copy (the read-only calibration reference is shared)."""
        new = shallow(self)
        new._core = None if self._core is None else self._core.copy()
        return new

    @classmethod
    def step_each(
        cls, items: Sequence[SpotThreshold], scores: NDArray[np.floating]
    ) -> ThresholdResult:
        """``items[i].step(scores[i:i+1])`` for every i at once: one score per distinct series."""
        cores = [_ensure(th._core, cls.kind) for th in items]
        x = _live_scores(scores)
        z, t, rate, gamma, sigma = _core_params(cores)
        lik = _spot_likelihood(x, t, rate, gamma, sigma, _ecdf_each([c.ref for c in cores], x))
        anom = x > z
        peak = (x > t) & ~anom
        for i in np.flatnonzero(~anom).tolist():
            cores[i].n += 1
        for i in np.flatnonzero(peak).tolist():
            core = cores[i]
            # Deferred: the bank refits in idle time, or the next step of the series does.
            core.add_peak(float(x[i]) - core.t, defer=True)
        return ThresholdResult(z, anom, lik)
