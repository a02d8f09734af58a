"""DSPOT: SPOT on the residual from a moving mean, so that a slow drift moves the threshold."""

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
    _integer,
    _live_scores,
    _spot_params,
)
from streamer.scoring.thresholds.core import CoreReference, _core_params, _ensure, _SpotCore
from streamer.scoring.thresholds.gpd import _spot_likelihood
from streamer.scoring.thresholds.reference import (
    _ecdf_each,
)
from streamer.scoring.thresholds.serial import (
    _CorruptStateError,
    _load,
    _num,
    _vec,
    pack_floats,
)


class DspotThreshold(CoreReference):
    """DSPOT: SPOT on ``x - M``, M the mean of the last ``depth`` non-alarmed scores.

    Calibration takes the local-mean residuals of the calibration scores (each score minus
    the mean of the ``depth`` before it) to fit the SPOT tail, and leaves the last
    ``depth`` calibration scores in the moving window. The reported threshold is
    ``z_q + M`` in score units, so a slow drift moves the threshold with it. Alarmed
    scores enter neither the peaks nor the moving window. The likelihood is SPOT's on
    ``x - M``.
    """

    kind: ClassVar[str] = "dspot"
    # Slots: one of these per sensor (a __dict__ would be ~300 bytes of each).
    __slots__ = ("_core", "_depth", "_head", "_level", "_max_peaks", "_risk", "_window", "_wsum")

    # Points decided per vectorised pass; grows while no event interrupts a pass.
    _CHUNK_MIN, _CHUNK_MAX = 32, 4096

    def __init__(
        self, risk: float = 1e-4, level: float = 0.98, depth: int = 50, max_peaks: int = 1000
    ) -> None:
        self._risk, self._level, self._max_peaks = _spot_params(risk, level, max_peaks)
        self._depth = _integer("depth", depth, 1)
        self._core: _SpotCore | None = None
        # Moving window (ring buffer) and its running sum. The sum is updated one point at a
        # time in a fixed order (np.cumsum is sequential), so results do not depend on how the
        # stream is cut into batches.
        self._window = np.zeros(self._depth)
        self._head = 0
        self._wsum = 0.0

    def __repr__(self) -> str:
        return f"DspotThreshold(risk={self._risk!r}, level={self._level!r}, depth={self._depth})"

    def calibrate(self, scores: NDArray[np.floating]) -> None:
        """Fit the tail on local-mean residuals and fill the moving window."""
        d = self._depth
        x = _calibration_scores(scores, d + MIN_CALIBRATION, f" (depth={d} plus {MIN_CALIBRATION})")
        wsum0 = float(x[:d].sum())
        sums = self._running(wsum0, x, x[d:])
        resid = x[d:] - sums[:-1] / d
        core = _SpotCore(self._risk, self._level, self._max_peaks)
        core.calibrate(resid)
        self._core = core
        self._window = x[-d:].copy()
        self._head = 0
        self._wsum = float(sums[-1])

    @staticmethod
    def _running(
        wsum: float, evicted: NDArray[np.float64], added: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """Window sums before each added point and after the last: sequential accumulation."""
        seq = np.empty(added.size + 1)
        seq[0] = wsum
        seq[1:] = added - evicted[: added.size]
        return np.cumsum(seq)

    def _ordered(self) -> NDArray[np.float64]:
        return np.concatenate((self._window[self._head :], self._window[: self._head]))

    @property
    def mean(self) -> float:
        """M: mean of the last ``depth`` non-alarmed scores."""
        _ensure(self._core, self.kind)
        return self._wsum / self._depth

    @property
    def value(self) -> float:
        """z_q + M: the threshold for the next point, in score units."""
        return _ensure(self._core, self.kind).z + self._wsum / self._depth

    def step(self, scores: NDArray[np.floating]) -> ThresholdResult:
        """Alarm above z_q + M; learn peaks of x - M in (t, z_q]; every non-alarm moves M."""
        core = _ensure(self._core, self.kind)
        x = _live_scores(scores)
        size, d = x.size, self._depth
        thr = np.empty(size)
        lik = np.empty(size)
        anom = np.zeros(size, dtype=bool)
        pos, chunk = 0, self._CHUNK_MIN
        while pos < size:
            # Decide a chunk assuming every point is learned (M moves with each); the first
            # alarm or peak invalidates what follows it, so only the prefix up to it is kept.
            seg = x[pos : pos + chunk]
            win = self._ordered()
            with np.errstate(invalid="ignore"):
                # An inf score alarms; the inf/nan means it makes after it are discarded.
                sums = self._running(self._wsum, np.concatenate((win, seg)), seg)
                m = sums[:-1] / d
                th = core.z + m
                alarm = seg > th
                resid = seg - m
                event = alarm | (resid > core.t)
            e = int(np.argmax(event)) if event.any() else seg.size
            upto = min(e + 1, seg.size)
            thr[pos : pos + upto] = th[:upto]
            lik[pos : pos + upto] = core.likelihood(resid[:upto])
            learned = e + (1 if e < seg.size and not alarm[e] else 0)
            if learned:
                self._push(seg[:learned], sums[learned])
            core.n += learned
            if e < seg.size:
                if alarm[e]:
                    anom[pos + e] = True
                else:
                    core.add_peak(float(resid[e]) - core.t)
                chunk = self._CHUNK_MIN
            else:
                chunk = min(2 * chunk, self._CHUNK_MAX)
            pos += upto
        return ThresholdResult(thr, anom, lik)

    def _push(self, values: NDArray[np.float64], new_sum: float) -> None:
        d = self._depth
        k = values.size
        if k >= d:
            self._window = values[-d:].copy()
            self._head = 0
        else:
            idx = (self._head + np.arange(k)) % d
            self._window[idx] = values
            self._head = (self._head + k) % d
        self._wsum = float(new_sum)

    def likelihood(self, scores: NDArray[np.floating]) -> NDArray[np.float64]:
        """SPOT likelihood of ``x - M`` under the current state."""
        core = _ensure(self._core, self.kind)
        return core.likelihood(_live_scores(scores) - self._wsum / self._depth)

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state: the SPOT state on residuals plus the moving window."""
        state: dict[str, Any] = {"kind": self.kind, "version": STATE_VERSION}
        state.update(_ensure(self._core, self.kind).state(reference))
        state["depth"] = self._depth
        state["window"] = pack_floats(self._ordered())
        state["window_sum"] = self._wsum
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state, parameters included."""

        def build(s: Mapping[str, Any]) -> tuple[_SpotCore, int, NDArray[np.float64], float]:
            core = _SpotCore.from_state(s)
            depth = _integer("depth", s["depth"], 1)
            window = _vec(s, "window")
            if window.size != depth:
                raise _CorruptStateError(
                    f"window must hold depth={depth} values, got {window.size}"
                )
            return core, depth, window, _num(s, "window_sum")

        core, depth, window, wsum = _load(self.kind, state, build)
        self._risk, self._level, self._max_peaks = core.risk, core.level, core.max_peaks
        self._core, self._depth = core, depth
        self._window, self._head, self._wsum = window, 0, wsum

    def clone(self) -> DspotThreshold:
        """Independent copy (the read-only calibration reference is shared)."""
        new = shallow(self)
        new._core = None if self._core is None else self._core.copy()
        new._window = self._window.copy()
        return new

    @classmethod
    def step_each(
        cls, items: Sequence[DspotThreshold], scores: NDArray[np.floating]
    ) -> ThresholdResult:
        """``items[i].step(scores[i:i+1])`` for every i at once: one score per distinct series.

        The arithmetic per point is the same as in :meth:`step` (M = sum / depth, the sum
        moved by ``x - evicted``), so results are bit-identical to stepping each alone.
        """
        cores = [_ensure(th._core, cls.kind) for th in items]
        x = _live_scores(scores)
        n = len(cores)
        wsum = np.fromiter((th._wsum for th in items), np.float64, n)
        depth = np.fromiter((th._depth for th in items), np.int64, n)
        z, t, rate, gamma, sigma = _core_params(cores)
        with np.errstate(invalid="ignore"):
            m = wsum / depth
            thr = z + m
            anom = x > thr
            resid = x - m
            peak = (resid > t) & ~anom
        lik = _spot_likelihood(
            resid, t, rate, gamma, sigma, _ecdf_each([c.ref for c in cores], resid)
        )
        xs = x.tolist()
        for i in np.flatnonzero(~anom).tolist():
            th = items[i]
            # Every non-alarmed point is learned: it enters the moving window.
            w, h = th._window, th._head
            th._wsum = th._wsum + (xs[i] - float(w[h]))
            w[h] = xs[i]
            th._head = (h + 1) % th._depth
            cores[i].n += 1
        for i in np.flatnonzero(peak).tolist():
            core = cores[i]
            # Deferred: the bank refits in idle time, or the next step of the series does.
            core.add_peak(float(resid[i]) - core.t, defer=True)
        return ThresholdResult(thr, anom, lik)
