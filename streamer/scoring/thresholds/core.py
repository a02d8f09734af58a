"""The SPOT state on one series, shared by SPOT (raw scores) and DSPOT (local-mean residuals)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamer.errors import StateError
from streamer.scoring.thresholds.base import (
    _MAX_THRESHOLD,
    _MIN_PEAKS,
    shallow,
)
from streamer.scoring.thresholds.checks import (
    _spot_params,
)
from streamer.scoring.thresholds.gpd import _spot_likelihood, _tail_quantile, fit_gpd
from streamer.scoring.thresholds.reference import (
    _NO_REFERENCE,
    _ecdf,
    _frozen,
    _reference,
)
from streamer.scoring.thresholds.serial import (
    _CorruptStateError,
    _int,
    _num,
    _sorted_ref,
    _vec,
    pack_floats,
)


class _SpotCore:
    """SPOT state on one series: raw scores for SPOT, residuals from the local mean for DSPOT."""

    __slots__ = (
        "floor",
        "gamma",
        "head",
        "level",
        "max_peaks",
        "n",
        "npk",
        "nt",
        "owned",
        "peaks",
        "rate",
        "ref",
        "risk",
        "sigma",
        "stale",
        "t",
        "z",
    )

    def __init__(self, risk: float, level: float, max_peaks: int) -> None:
        self.risk, self.level, self.max_peaks = risk, level, max_peaks
        self.t = 0.0
        self.n = 0  # points learned from (calibration + online non-alarmed), as in the paper
        self.nt = 0  # peaks ever seen; with n it estimates P(X > t) beyond the kept peaks
        # Ring buffer of the most recent excesses over t. It grows on demand up to max_peaks
        # (most sensors keep few peaks: a full buffer per sensor would cost 8 KB each).
        self.peaks = np.zeros(0)
        # False while ``peaks`` may be shared with a copy (copy on write, see ``copy``).
        self.owned = True
        self.npk = 0
        self.head = 0
        self.gamma, self.sigma, self.z = 0.0, 1.0, 1.0
        # Nt / n as of the last refit: the likelihood changes only when the tail does, so it
        # does not depend on how the stream is cut into batches.
        self.rate = 1.0
        self.floor = 1e-12
        self.ref = _NO_REFERENCE
        # True while a peak learned in a batch across sensors awaits its refit (``settle``).
        self.stale = False

    def calibrate(self, values: NDArray[np.float64]) -> None:
        t = float(np.quantile(values, self.level))
        self.t = t
        # Smallest tail scale: keeps z_q strictly above t when the calibration is constant.
        self.floor = max(1e-6 * max(float(np.std(values)), abs(t)), 1e-12)
        excess = values[values > t] - t
        self.n, self.nt = int(values.size), int(excess.size)
        kept = excess[-self.max_peaks :]
        self.peaks = kept.copy()
        self.owned = True
        self.npk = int(kept.size)
        self.head = self.npk % self.max_peaks
        self.ref = _frozen(_reference(values[values <= t]))
        self.refit()

    def chronological(self) -> NDArray[np.float64]:
        if self.npk < self.max_peaks:
            return self.peaks[: self.npk]
        return np.concatenate((self.peaks[self.head :], self.peaks[: self.head]))

    def refit(self) -> None:
        # Always fit the peaks in arrival order: float sums then do not depend on where the
        # ring buffer wraps, so a restored state continues bit for bit.
        y = self.chronological()
        if y.size >= _MIN_PEAKS:
            gamma, sigma = fit_gpd(y)
        else:
            gamma, sigma = 0.0, float(y.mean()) if y.size else 0.0
        sigma = max(sigma, self.floor)
        self.gamma, self.sigma = gamma, sigma
        # Without any peak yet, count one so that the rate (and z_q) stays defined.
        self.rate = min(max(self.nt, 1) / self.n, 1.0)
        z = _tail_quantile(self.t, gamma, sigma, self.risk / self.rate)
        self.z = max(z, self.t + self.floor)
        self.stale = False

    def add_peak(self, excess: float, *, defer: bool = False) -> None:
        """Learn a peak and refit the tail; ``defer``: leave the refit to ``settle``.

        A deferred refit gives the same fit whenever it runs, since nothing else
        changes the peaks or counts before the series' next point, which settles first.
        """
        if self.head >= self.peaks.size:
            # Still filling (head == npk < max_peaks): grow by a quarter, up to max_peaks.
            # A sensor starts with the calibration's peaks (100 at the defaults) and learns
            # one every ~50 windows: doubling would add 800 bytes for its first new peak.
            size = self.peaks.size
            grown = np.zeros(min(size + max(size // 4, 16), self.max_peaks))
            grown[:size] = self.peaks
            self.peaks = grown
            self.owned = True
        elif not self.owned:
            self.peaks = self.peaks.copy()
            self.owned = True
        self.peaks[self.head] = excess
        self.head = (self.head + 1) % self.max_peaks
        self.npk = min(self.npk + 1, self.max_peaks)
        self.nt += 1
        if defer:
            self.stale = True
        else:
            self.refit()

    def settle(self) -> None:
        """Refit now if a deferred refit is owed."""
        if self.stale:
            self.refit()

    def likelihood(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """GPD tail above t, scaled empirical CDF of the calibration sample below it."""
        return _spot_likelihood(x, self.t, self.rate, self.gamma, self.sigma, _ecdf(self.ref, x))

    def copy(self) -> _SpotCore:
        """Independent copy that shares the (never mutated) calibration reference.

        The peaks are shared too, copy on write: whichever of the two learns a peak
        first copies them. A sensor's threshold starts as a copy of the calibrated
        prototype, whose peaks are ``1 - level`` of the calibration scores (100, 800
        bytes, at the default 5,000 and 0.98), most of a copy's memory; a sensor learns
        a peak about every ``1 / (1 - level)`` windows, and shares them until then.
        """
        new = shallow(self)
        self.owned = new.owned = False
        return new

    def state(self, reference: bool = True) -> dict[str, Any]:
        self.settle()
        state = {
            "risk": self.risk,
            "level": self.level,
            "max_peaks": self.max_peaks,
            "t": self.t,
            "n": self.n,
            "nt": self.nt,
            "peaks": pack_floats(self.chronological()),
            "gamma": self.gamma,
            "sigma": self.sigma,
            "z": self.z,
            "rate": self.rate,
            "floor": self.floor,
        }
        if reference:
            state["ref"] = pack_floats(self.ref)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _SpotCore:
        risk, level, max_peaks = _spot_params(state["risk"], state["level"], state["max_peaks"])
        core = cls(risk, level, max_peaks)
        core.t = _num(state, "t")
        core.n = _int(state, "n", 1)
        core.nt = _int(state, "nt", 0)
        peaks = _vec(state, "peaks")
        if peaks.size > max_peaks or peaks.size > core.nt or (peaks <= 0.0).any():
            raise _CorruptStateError("peaks must be positive, at most max_peaks and at most nt")
        core.peaks = peaks
        core.npk = int(peaks.size)
        core.head = core.npk % max_peaks
        core.gamma, core.sigma = _num(state, "gamma"), _num(state, "sigma")
        core.z, core.floor = _num(state, "z"), _num(state, "floor")
        core.rate = _num(state, "rate")
        if core.sigma <= 0.0 or core.floor <= 0.0 or not core.t < core.z <= _MAX_THRESHOLD:
            raise _CorruptStateError("sigma and floor must be > 0 and z in (t, 1e300]")
        if core.nt > core.n or not 0.0 < core.rate <= 1.0:
            raise _CorruptStateError("nt must not exceed n, and rate must be in (0, 1]")
        core.ref = _frozen(_sorted_ref(state, "ref"))
        if core.ref.size == 0:
            raise _CorruptStateError("ref must not be empty")
        return core


def _core_params(cores: Sequence[_SpotCore]) -> tuple[NDArray[np.float64], ...]:
    """``(z, t, rate, gamma, sigma)`` of many series, one array each."""
    # One pass over the cores, one (n, 5) array: five getattr generators cost three times
    # as much at a burst's thousand sensors.
    table = np.array([(c.z, c.t, c.rate, c.gamma, c.sigma) for c in cores], dtype=np.float64)
    table = table.reshape(len(cores), 5)
    return tuple(np.ascontiguousarray(table[:, i]) for i in range(5))


class CoreReference:
    """``SharedReference`` and ``DeferredFit`` for a threshold built on a ``_SpotCore``."""

    __slots__ = ()
    _core: _SpotCore | None

    @property
    def unsettled(self) -> bool:
        """True while a refit deferred by ``step_each`` is owed."""
        return self._core is not None and self._core.stale

    def settle(self) -> None:
        """Do the deferred refit now (a no-op when none is owed)."""
        if self._core is not None:
            self._core.settle()

    @property
    def reference(self) -> NDArray[np.float64] | None:
        """The calibration sample below ``t`` that the likelihood reads (None before one)."""
        return None if self._core is None else self._core.ref

    def share_reference(self, sample: NDArray[np.float64]) -> None:
        """Read ``sample``, equal to the own one, from now on."""
        if self._core is not None:
            self._core.ref = sample


def _ensure(core: _SpotCore | None, kind: str) -> _SpotCore:
    """The calibrated core with its tail fit up to date (StateError before a calibration)."""
    if core is None:
        raise StateError(f"{kind} threshold is not calibrated: call calibrate() or load a state")
    if core.stale:
        core.refit()
    return core
