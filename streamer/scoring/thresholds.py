"""Adaptive anomaly thresholds over a stream of window scores, one instance per sensor.

Every threshold follows the :class:`Threshold` protocol: calibrated once from the
model's training residual scores, then stepped over one sensor's live scores in order.
It adapts online but never learns from a point it alarmed on, so an anomaly cannot
raise the bar that detects it. State round-trips through JSON, so the daemon can
checkpoint it per sensor and restore it after a restart or a rebalance.

Implementations: :class:`SpotThreshold` and :class:`DspotThreshold` (Siffer et al.,
"Anomaly Detection in Streams with Extreme Value Theory", KDD 2017), a rolling
empirical quantile and a fixed value. :class:`ThresholdBank` keeps one per sensor.

A non-finite score (a diverging model), or one beyond ``±1e300``, is treated as ``+inf``:
always anomalous, never learned, likelihood 1. Calibration scores must lie within
``±1e300`` and thresholds stay below about ``2e300``, so every number a threshold learns
and exports is finite, and its state restores. Only numpy is used here.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import copy
import hashlib
import math
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from streamer.errors import ConfigError, DataError, StaleStateError, StateError

__all__ = [
    "MIN_CALIBRATION",
    "READABLE_VERSIONS",
    "STATE_VERSION",
    "DspotThreshold",
    "FixedThreshold",
    "QuantileThreshold",
    "SpotThreshold",
    "Threshold",
    "ThresholdBank",
    "ThresholdResult",
    "fit_gpd",
    "make_threshold",
    "pack_floats",
    "unpack_floats",
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


class Threshold(Protocol):
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

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state, including ``kind``, ``version`` and the parameters.

        ``reference=False`` leaves out the calibration sample (``ref``), for a caller
        that writes its digest instead (``ThresholdBank.export``).
        """
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state (parameters included); StateError if it is unusable."""
        ...

    def clone(self) -> Threshold:
        """Independent deep copy."""
        ...


# --------------------------------------------------------------------------- validation


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v


def _open_unit(name: str, value: object) -> float:
    v = _real(name, value)
    if not 0.0 < v < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
    return v


def _positive(name: str, value: object) -> float:
    v = _real(name, value)
    if v <= 0.0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return v


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _spot_params(risk: object, level: object, max_peaks: object) -> tuple[float, float, int]:
    r = _open_unit("risk", risk)
    lv = _open_unit("level", level)
    # z_q extrapolates beyond t; a risk at or above t's exceedance rate would put z_q below t.
    if r >= 1.0 - lv:
        raise ConfigError(
            f"risk must be smaller than 1 - level (the exceedance rate of the initial "
            f"threshold), got risk={risk!r} with level={level!r}"
        )
    return r, lv, _integer("max_peaks", max_peaks, 2 * _MIN_PEAKS)


def _calibration_scores(scores: ArrayLike, minimum: int, why: str = "") -> NDArray[np.float64]:
    try:
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"calibration scores must be numbers: {exc}") from exc
    bad = np.flatnonzero(~(np.abs(x) <= _MAX_THRESHOLD))  # NaN compares False
    if bad.size:
        raise ConfigError(
            f"calibration scores must be finite and within ±{_MAX_THRESHOLD:g}, got "
            f"{bad.size} non-finite value(s) or beyond, first at index {int(bad[0])}: "
            f"{x[bad[0]]!r}"
        )
    if x.size < minimum:
        raise ConfigError(f"calibration needs at least {minimum} scores{why}, got {x.size}")
    return x


def _live_scores(scores: ArrayLike) -> NDArray[np.float64]:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"scores must be one-dimensional, got shape {x.shape}")
    bad = ~(np.abs(x) <= _MAX_THRESHOLD)
    if bad.any():
        # A NaN compares False with everything and would slip in as a normal point and poison
        # the moving statistics; +inf alarms and is never learned. A finite score beyond
        # 1e300 too: learned, it could carry a threshold or a moving sum past the float range.
        x = np.where(bad, np.inf, x)
    return x


# ------------------------------------------------------------------ state dict helpers


class _CorruptStateError(Exception):
    """Internal: a state dict field is unusable (turned into StateError by the caller)."""


def _header(state: Mapping[str, Any], kind: str) -> None:
    if not isinstance(state, Mapping):
        raise StateError(f"{kind} state must be a mapping, got {type(state).__name__}")
    got_kind, got_version = state.get("kind"), state.get("version")
    if got_kind != kind:
        raise StateError(f"state is for threshold kind {got_kind!r}, expected {kind!r}")
    if got_version not in READABLE_VERSIONS or isinstance(got_version, bool):
        raise StateError(
            f"{kind} state version {got_version!r} is not supported "
            f"(expected one of {list(READABLE_VERSIONS)})"
        )


def _num(state: Mapping[str, Any], key: str) -> float:
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _CorruptStateError(f"{key} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise _CorruptStateError(f"{key} must be finite, got {v!r}")
    return f


def _int(state: Mapping[str, Any], key: str, minimum: int) -> int:
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _CorruptStateError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


def pack_floats(values: ArrayLike) -> str:
    """Float64 values as base64 of their little-endian bytes: exact, and ~11 characters each.

    A state record holds up to ``max_peaks`` peaks per sensor and a commit round writes
    one per changed sensor: as JSON numbers each takes ~19 characters and a float
    formatting (and parsing) step, as packed bytes about 11 and a memory copy.
    """
    raw = np.ascontiguousarray(values, dtype="<f8").tobytes()
    return base64.b64encode(raw).decode("ascii")


def unpack_floats(packed: str) -> NDArray[np.float64]:
    """The values :func:`pack_floats` packed (a new writable array); ValueError if malformed."""
    try:
        raw = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(raw) % 8:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float64 values")
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def _vec(state: Mapping[str, Any], key: str) -> NDArray[np.float64]:
    """A float array field: packed (version 2), a list of numbers (version 1) or an array."""
    v = state[key]
    if isinstance(v, str):
        try:
            a = unpack_floats(v)
        except ValueError as exc:
            raise _CorruptStateError(f"{key} must be packed float64 values: {exc}") from None
    elif isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == np.float64:
        a = v.copy()  # a threshold mutates its own arrays in place
    else:
        # One C-level pass over the element types instead of a Python step per element
        # (bool is its own type, so True is refused as a number).
        if not isinstance(v, list) or not set(map(type, v)) <= _NUMBERS:
            raise _CorruptStateError(f"{key} must be a list of numbers or packed float64 values")
        a = np.asarray(v, dtype=np.float64)
    if not np.isfinite(a).all():
        raise _CorruptStateError(f"{key} must hold finite numbers")
    return a


def _sorted_ref(state: Mapping[str, Any], key: str) -> NDArray[np.float64]:
    shared = state[key]
    if _validated(shared):
        # The prototype's calibration sample itself (``ThresholdBank.restore``), checked
        # when it was frozen, and shared rather than copied.
        return shared  # type: ignore[no-any-return]
    ref = _vec(state, key)
    if ref.size > _REFERENCE_SIZE or (ref.size > 1 and np.any(np.diff(ref) < 0)):
        raise _CorruptStateError(f"{key} must be sorted and hold at most {_REFERENCE_SIZE} values")
    return ref


def _load(kind: str, state: Mapping[str, Any], build: Any) -> Any:
    """Run ``build(state)``, turning every sign of a corrupt record into StateError."""
    _header(state, kind)
    try:
        return build(state)
    except (_CorruptStateError, ConfigError) as exc:
        raise StateError(f"corrupt {kind} state: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StateError(f"corrupt {kind} state: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------ shared maths


# Every array _frozen made read-only (each validated first: finite, and sorted where it is
# a calibration sample). A restore hands a sensor the prototype's sample itself, which
# then needs no second check.
_FROZEN: weakref.WeakValueDictionary[int, NDArray[np.float64]] = weakref.WeakValueDictionary()


def _frozen(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """``a``, read-only: calibration references are shared between a prototype's clones."""
    if _FROZEN.get(id(a)) is not a:  # a restore hands the shared sample back: once is enough
        a.flags.writeable = False
        _FROZEN[id(a)] = a
    return a


def _validated(a: object) -> bool:
    """Whether ``a`` is an array :func:`_frozen` made read-only (and so already checked)."""
    return _FROZEN.get(id(a)) is a


# The calibration sample of a threshold not calibrated yet.
_NO_REFERENCE = _frozen(np.zeros(0))


def _reference(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sorted sample of at most ``_REFERENCE_SIZE`` evenly spaced order statistics."""
    s = np.sort(values)
    if s.size > _REFERENCE_SIZE:
        s = s[np.linspace(0, s.size - 1, _REFERENCE_SIZE).round().astype(np.intp)]
    return s


def _ecdf(ref: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Empirical CDF of the sorted sample ``ref`` at ``x`` (fraction of ref <= x)."""
    out: NDArray[np.float64] = np.searchsorted(ref, x, side="right") / ref.size
    return out


def _ecdf_each(refs: Sequence[NDArray[np.float64]], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``_ecdf(refs[i], x[i])`` for every i, one search per distinct reference array."""
    first = refs[0]
    if all(r is first for r in refs):
        return _ecdf(first, x)  # the usual case: every sensor shares its prototype's sample
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(refs):
        groups.setdefault(id(r), []).append(i)
    out = np.empty(x.size)
    for rows in groups.values():
        idx = np.asarray(rows)
        out[idx] = _ecdf(refs[rows[0]], x[idx])
    return out


def _at(v: float | NDArray[np.float64], mask: NDArray[np.bool_]) -> float | NDArray[np.float64]:
    return v[mask] if isinstance(v, np.ndarray) else v


def _spot_likelihood(
    x: NDArray[np.float64],
    t: float | NDArray[np.float64],
    rate: float | NDArray[np.float64],
    gamma: float | NDArray[np.float64],
    sigma: float | NDArray[np.float64],
    below: NDArray[np.float64],
) -> NDArray[np.float64]:
    """GPD tail above ``t``; ``below`` (the empirical CDF at x) scaled into [0, 1 - rate].

    The parameters are scalars (one series) or arrays aligned with ``x`` (one value per
    series, in a batch across sensors): the arithmetic per element is the same either
    way, so both give bit-identical results.
    """
    out: NDArray[np.float64] = (1.0 - rate) * below
    above = x > t
    if above.any():
        ta, ra, ga, sa = _at(t, above), _at(rate, above), _at(gamma, above), _at(sigma, above)
        y = x[above] - ta
        with np.errstate(all="ignore"):
            exponential = np.exp(-y / sa)
            arg = np.maximum(ga * y / sa, -1.0)
            # Beyond the end point of a bounded tail (arg = -1) the survival is 0.
            pareto = np.where(arg > -1.0, np.exp(-np.log1p(arg) / ga), 0.0)
            surv = np.where(np.abs(ga) < _GAMMA_ZERO, exponential, pareto)
        # surv is in [0, 1] and the CDF in [0, 1], so out is in [0, 1] without clipping.
        out[above] = 1.0 - ra * np.minimum(np.nan_to_num(surv, nan=0.0), 1.0)
    return out


def _w(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Grimshaw's u(x) v(x) - 1 for each x, written without cancelling the leading 1s.

    With a = mean(xy/(1+xy)) and b = mean(log1p(xy)): u = 1 - a, v = 1 + b, so
    u v - 1 = b - a - a b.
    """
    xy = np.multiply.outer(x, y)
    a = (xy / (1.0 + xy)).sum(axis=1) / y.size
    b = np.log1p(xy).sum(axis=1) / y.size
    out: NDArray[np.float64] = b - a - a * b
    return out


# Grid for Grimshaw's root search. Negative side: x = -f / ymax with f dense near 0 (x -> 0,
# the exponential limit) and near 1 (the support edge of a bounded tail). Positive side:
# x = g / ymax, geometric up to Grimshaw's bound 2 (mean - min) / min**2.
_NEG_FRACTIONS = np.unique(
    np.concatenate((np.geomspace(1e-6, 0.5, 10), 1.0 - np.geomspace(1e-6, 0.5, 10)))
)[::-1]
_POS_UNIT = np.linspace(0.0, 1.0, 20)


def _roots(y: NDArray[np.float64], ymin: float, ymax: float, ymean: float) -> NDArray[np.float64]:
    """Roots of Grimshaw's equation in x = gamma / sigma, away from the trivial root x = 0."""
    neg = -_NEG_FRACTIONS / ymax
    hi = 2.0 * (ymean - ymin) / (ymin * ymin)
    hi = min(hi, 1e12 / ymax)
    lo = 1e-6 / ymax
    pos = lo * (max(hi, 2.0 * lo) / lo) ** _POS_UNIT  # geometric; np.geomspace costs ~50 us
    with np.errstate(all="ignore"):
        grid = np.concatenate((neg, pos))
        f = _w(grid, y)
        s = np.sign(f)
        # Brackets within each side only: w ~ x**2 near 0, so a "change" across 0 is noise.
        same_side = np.ones(grid.size - 1, dtype=bool)
        same_side[neg.size - 1] = False
        br = np.flatnonzero(same_side & (s[:-1] * s[1:] < 0) & np.isfinite(f[:-1] + f[1:]))
        exact: NDArray[np.float64] = grid[f == 0.0]
        if br.size == 0:
            return exact
        roots = [
            _illinois(y, *ab)
            for ab in zip(
                grid[br].tolist(),
                grid[br + 1].tolist(),
                f[br].tolist(),
                f[br + 1].tolist(),
                strict=True,
            )
        ]
    return np.concatenate((exact, roots))


def _w1(x: float, y: NDArray[np.float64]) -> float:
    """:func:`_w` at one point."""
    # sum() / size: ndarray.mean() adds ~5 us of Python overhead per call.
    xy = x * y
    a = float((xy / (1.0 + xy)).sum()) / y.size
    b = float(np.log1p(xy).sum()) / y.size
    return b - a - a * b


def _illinois(y: NDArray[np.float64], a: float, b: float, fa: float, fb: float) -> float:
    """Root of Grimshaw's equation in the bracket [a, b] by the Illinois method.

    Modified regula falsi: superlinear and never leaves its bracket, so ~10 evaluations
    replace ~40 bisection steps. Scalar on purpose: there is usually one bracket, and
    Python floats cost less than numpy calls on one-element arrays.
    """
    for _ in range(100):
        c = b - fb * (b - a) / (fb - fa)
        if not min(a, b) < c < max(a, b):
            c = 0.5 * (a + b)
        fc = _w1(c, y)
        if fc == 0.0:
            return c
        if (fc > 0.0) != (fb > 0.0):
            a, fa = b, fb
        else:
            fa *= 0.5
        b, fb = c, fc
        if abs(b - a) <= 1e-9 * abs(b):
            break
    return b


def fit_gpd(peaks: NDArray[np.floating]) -> tuple[float, float]:
    """Maximum-likelihood generalized Pareto ``(gamma, sigma)`` for positive excesses.

    Grimshaw's trick, as in SPOT: the likelihood equations reduce to one equation in
    ``x = gamma / sigma``, ``u(x) v(x) = 1`` with ``u = mean(1 / (1 + x y))`` and
    ``v = 1 + mean(log(1 + x y))``; each root gives ``gamma = v - 1`` and
    ``sigma = gamma / x``. Roots are bracketed on a grid and refined; the one with the
    highest log-likelihood wins, the exponential tail (``gamma = 0``) included.
    """
    y = np.asarray(peaks, dtype=np.float64).reshape(-1)
    if not y.size or not np.all(np.isfinite(y) & (y > 0.0)):
        raise DataError(f"fit_gpd needs positive finite excesses, got {y.size} values: {y[:5]}")
    ymean = float(y.mean())
    best_gamma, best_sigma = 0.0, ymean
    # Per-peak log-likelihood. At any x the profile is -(log sigma + gamma + 1), because
    # mean(log1p(gamma y / sigma)) = mean(log1p(x y)) = gamma by construction.
    best_ll = -(math.log(ymean) + 1.0)
    ymin, ymax = float(y.min()), float(y.max())
    if not ymax > ymin:
        return best_gamma, best_sigma
    with np.errstate(all="ignore"):
        for x in _roots(y, ymin, ymax, ymean).tolist():
            gamma = float(np.log1p(x * y).mean())
            if x == 0.0 or not math.isfinite(gamma) or abs(gamma) < _GAMMA_ZERO:
                continue
            sigma = gamma / x
            if not (math.isfinite(sigma) and sigma > 0.0):
                continue
            ll = -(math.log(sigma) + gamma + 1.0)
            if ll > best_ll:
                best_gamma, best_sigma, best_ll = gamma, sigma, ll
    return best_gamma, best_sigma


def _tail_quantile(t: float, gamma: float, sigma: float, ratio: float) -> float:
    """``t + sigma / gamma * (ratio**-gamma - 1)`` with ratio = risk * n / Nt, kept finite."""
    lr = math.log(ratio)
    if abs(gamma) < _GAMMA_ZERO:
        z = t - sigma * lr
    else:
        e = -gamma * lr
        z = t + sigma / gamma * math.expm1(e) if e < 700.0 else _MAX_THRESHOLD
    return min(z, _MAX_THRESHOLD) if math.isfinite(z) else _MAX_THRESHOLD


_T = TypeVar("_T")


def _shallow(obj: _T) -> _T:
    """A shallow copy of a slotted object (``copy.copy`` goes through pickling's protocol)."""
    cls = type(obj)
    new = cls.__new__(cls)
    for name in cls.__slots__:  # type: ignore[attr-defined]
        setattr(new, name, getattr(obj, name))
    return new


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

    def add_peak(self, excess: float) -> None:
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
        new = _shallow(self)
        self.owned = new.owned = False
        return new

    def state(self, reference: bool = True) -> dict[str, Any]:
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
    n = len(cores)
    return tuple(
        np.fromiter((getattr(c, name) for c in cores), np.float64, n)
        for name in ("z", "t", "rate", "gamma", "sigma")
    )


def _ensure(core: _SpotCore | None, kind: str) -> _SpotCore:
    if core is None:
        raise StateError(f"{kind} threshold is not calibrated: call calibrate() or load a state")
    return core


# ------------------------------------------------------------------------------- SPOT


class SpotThreshold:
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
        new = _shallow(self)
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
            core.add_peak(float(x[i]) - core.t)
        return ThresholdResult(z, anom, lik)


# ------------------------------------------------------------------------------ DSPOT


class DspotThreshold:
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
        new = _shallow(self)
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
            core.add_peak(float(resid[i]) - core.t)
        return ThresholdResult(thr, anom, lik)


# --------------------------------------------------------------------------- quantile


class QuantileThreshold:
    """``margin`` times the rolling empirical ``quantile`` of the last ``window`` learned scores.

    Only non-alarmed scores are learned; calibration fills the window with the last
    ``window`` calibration scores. The quantile interpolates linearly between order
    statistics (numpy's default). The likelihood is the empirical CDF of the window.

    ``margin`` must exceed 1. Since alarmed scores are never learned, the window is a
    sample truncated at the threshold, and its quantile settles where
    ``F(q) = quantile * F(margin * q)``. At margin 1 the only solution is the bottom of
    the distribution: the threshold ratchets down until it alarms on everything
    (quantile 0.99 on i.i.d. exponential scores: 33 % alarms after 50k points, 80 % after
    200k). From margin 1.2 up it settles: 0.15 % (exponential) to 0.7 % (Pareto, alpha 3)
    alarms at margin 1.5.

    The window changes with every learned point, so ``step`` is a sequential loop over a
    sorted list (bisect): O(log window) comparisons plus one memmove per point, ~1 us.
    """

    kind: ClassVar[str] = "quantile"
    __slots__ = ("_fifo", "_margin", "_q", "_size", "_sorted")

    def __init__(self, quantile: float = 0.99, window: int = 1000, margin: float = 1.5) -> None:
        q = _real("quantile", quantile)
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"quantile must be in (0, 1], got {quantile!r}")
        self._q = q
        self._size = _integer("window", window, 1)
        m = _real("margin", margin)
        if m <= 1.0:
            raise ConfigError(
                f"margin must be > 1 (at 1 the threshold ratchets down, since alarmed scores "
                f"are never learned), got {margin!r}"
            )
        self._margin = m
        self._fifo: deque[float] = deque()  # learned scores in arrival order
        self._sorted: list[float] = []  # the same, sorted

    def __repr__(self) -> str:
        return (
            f"QuantileThreshold(quantile={self._q!r}, window={self._size}, margin={self._margin!r})"
        )

    def _fill(self, values: list[float]) -> None:
        self._fifo = deque(values)
        self._sorted = sorted(values)

    def calibrate(self, scores: NDArray[np.floating]) -> None:
        """Fill the window with the last ``window`` calibration scores."""
        x = _calibration_scores(scores, MIN_CALIBRATION)
        self._fill(x[-self._size :].tolist())

    def _threshold(self) -> float:
        s = self._sorted
        if not s:
            raise StateError(
                "quantile threshold is not calibrated: call calibrate() or load a state"
            )
        pos = self._q * (len(s) - 1)
        lo = int(pos)
        q = s[-1] if lo + 1 >= len(s) else s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)
        # Capped like SPOT's z_q: margin x q could pass the float range, and an infinite
        # threshold would let an inf score in as normal.
        return min(self._margin * q, _MAX_THRESHOLD)

    @property
    def value(self) -> float:
        """The threshold for the next point."""
        return self._threshold()

    def step(self, scores: NDArray[np.floating]) -> ThresholdResult:
        """Compare each score with the threshold before it; learn the normal ones."""
        thr_now = self._threshold()
        x = _live_scores(scores)
        size = x.size
        thr = np.empty(size)
        lik = np.empty(size)
        anom = np.zeros(size, dtype=bool)
        fifo, s, cap = self._fifo, self._sorted, self._size
        for i, xi in enumerate(x.tolist()):
            thr[i] = thr_now
            lik[i] = bisect.bisect_right(s, xi) / len(s)
            if xi > thr_now:
                anom[i] = True
                continue
            if len(fifo) == cap:
                del s[bisect.bisect_left(s, fifo.popleft())]
            fifo.append(xi)
            bisect.insort(s, xi)
            thr_now = self._threshold()
        return ThresholdResult(thr, anom, lik)

    def likelihood(self, scores: NDArray[np.floating]) -> NDArray[np.float64]:
        """Empirical CDF of the current window."""
        self._threshold()
        return _ecdf(np.asarray(self._sorted), _live_scores(scores))

    def state_dict(self, *, reference: bool = True) -> dict[str, Any]:
        """JSON-serialisable state: parameters and the window in arrival order."""
        self._threshold()
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "quantile": self._q,
            "window_size": self._size,
            "margin": self._margin,
            "window": pack_floats(np.fromiter(self._fifo, np.float64, len(self._fifo))),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state, parameters included."""

        def build(s: Mapping[str, Any]) -> tuple[QuantileThreshold, list[float]]:
            proto = QuantileThreshold(s["quantile"], s["window_size"], s["margin"])
            values = _vec(s, "window")
            if not 0 < values.size <= proto._size:
                raise _CorruptStateError(
                    f"window must hold 1 to {proto._size} values, got {values.size}"
                )
            return proto, values.tolist()

        proto, values = _load(self.kind, state, build)
        self._q, self._size, self._margin = proto._q, proto._size, proto._margin
        self._fill(values)

    def clone(self) -> QuantileThreshold:
        """Independent deep copy."""
        return copy.deepcopy(self)


# ------------------------------------------------------------------------------ fixed


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
        return _shallow(self)

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


# ---------------------------------------------------------------------------- factory

_METHODS: dict[str, type[SpotThreshold | DspotThreshold | QuantileThreshold | FixedThreshold]] = {
    "spot": SpotThreshold,
    "dspot": DspotThreshold,
    "quantile": QuantileThreshold,
    "fixed": FixedThreshold,
}


def make_threshold(
    method: Literal["spot", "dspot", "quantile", "fixed"], **params: Any
) -> Threshold:
    """An uncalibrated threshold by method name; ConfigError on an unknown name or parameter."""
    cls = _METHODS.get(method)
    if cls is None:
        raise ConfigError(f"threshold method must be one of {sorted(_METHODS)}, got {method!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"threshold method {method!r}: {exc}") from exc


# ------------------------------------------------------------------------------- bank


# A sensor with at least this many rows in one batch is stepped on its own.
_ALONE_FROM = 8


def _concat(results: list[ThresholdResult]) -> ThresholdResult:
    return ThresholdResult(*(np.concatenate(parts) for parts in zip(*results, strict=True)))


class ThresholdBank:
    """One threshold per sensor, each cloned from a calibrated prototype on first sight."""

    def __init__(self, prototype: Threshold) -> None:
        self._prototype = prototype
        self._by_sensor: dict[str, Threshold] = {}
        # The prototype's calibration sample and its SHA-256, while it is the same array.
        self._sample_digest: tuple[NDArray[np.float64], str] | None = None

    def __len__(self) -> int:
        return len(self._by_sensor)

    def __contains__(self, sensor: object) -> bool:
        return sensor in self._by_sensor

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_sensor))

    @property
    def prototype(self) -> Threshold:
        """The calibrated threshold new sensors start from."""
        return self._prototype

    def set_prototype(self, prototype: Threshold) -> None:
        """Start sensors seen from now on from ``prototype``; known sensors keep theirs."""
        self._prototype = prototype

    def get(self, sensor: str) -> Threshold | None:
        """The sensor's threshold, or None if it has not been seen (or was dropped)."""
        return self._by_sensor.get(sensor)

    def _of(self, sensor: str) -> Threshold:
        th = self._by_sensor.get(sensor)
        if th is None:
            th = self._by_sensor[sensor] = self._prototype.clone()
        return th

    def step(
        self, sensors: Sequence[str] | NDArray[np.str_], scores: NDArray[np.floating]
    ) -> ThresholdResult:
        """Step a batch whose rows belong to many sensors; each sensor's rows stay in order."""
        x = np.asarray(scores, dtype=np.float64)
        keys = np.asarray(sensors)
        if x.ndim != 1 or keys.shape != x.shape:
            raise DataError(
                f"sensors and scores must be 1-D of one length, got {keys.shape} and {x.shape}"
            )
        size = x.size
        thr = np.empty(size)
        lik = np.empty(size)
        anom = np.zeros(size, dtype=bool)
        if size == 0:
            return ThresholdResult(thr, anom, lik)
        names, inverse = np.unique(keys, return_inverse=True)
        if names.size == 1:
            return self._of(str(names[0])).step(x)
        owners = [self._of(str(name)) for name in names.tolist()]
        counts = np.bincount(inverse, minlength=names.size)
        order = np.argsort(inverse, kind="stable")  # stable: keeps each sensor's rows in order
        ends = np.cumsum(counts)
        # A sensor with many rows in the batch is stepped alone (its own step vectorises
        # over them); the others, usually nearly all, in rounds across sensors.
        for j in np.flatnonzero(counts >= _ALONE_FROM).tolist():
            idx = order[ends[j] - counts[j] : ends[j]]
            res = owners[j].step(x[idx])
            thr[idx], anom[idx], lik[idx] = res.threshold, res.anomalous, res.likelihood
        if counts.min() < _ALONE_FROM:
            # Round k holds the k-th row of every sensor: one row per sensor, so a sensor's
            # rows are still stepped in order, and each round is one vectorised call.
            rank = np.empty(size, dtype=np.intp)
            rank[order] = np.arange(size) - np.repeat(ends - counts, counts)
            rank[(counts >= _ALONE_FROM)[inverse]] = -1
            for k in range(min(int(counts.max()), _ALONE_FROM - 1)):
                rows = np.flatnonzero(rank == k)
                if rows.size:
                    self._round(
                        rows, [owners[j] for j in inverse[rows].tolist()], x, thr, anom, lik
                    )
        return ThresholdResult(thr, anom, lik)

    @staticmethod
    def _round(
        rows: NDArray[np.intp],
        owners: list[Threshold],
        x: NDArray[np.float64],
        thr: NDArray[np.float64],
        anom: NDArray[np.bool_],
        lik: NDArray[np.float64],
    ) -> None:
        """Step ``x[rows[i]]`` on ``owners[i]`` (distinct thresholds), writing the results."""
        kinds = {type(o) for o in owners}
        for kind in kinds:
            if len(kinds) == 1:
                sel, group = rows, owners
            else:
                mask = np.fromiter((type(o) is kind for o in owners), bool, len(owners))
                sel = rows[mask]
                group = [o for o, m in zip(owners, mask.tolist(), strict=True) if m]
            step_each = getattr(kind, "step_each", None)
            if step_each is not None:
                res = step_each(group, x[sel])
            else:
                res = _concat(
                    [o.step(x[r : r + 1]) for o, r in zip(group, sel.tolist(), strict=True)]
                )
            thr[sel], anom[sel], lik[sel] = res.threshold, res.anomalous, res.likelihood

    def drop(self, sensors: Sequence[str]) -> None:
        """Forget these sensors (e.g. on partition revocation); unknown names are ignored."""
        for s in sensors:
            self._by_sensor.pop(s, None)

    def export(self, sensor: str, of: Threshold | None = None) -> dict[str, Any]:
        """The sensor's state dict (KeyError if it has none).

        ``of``: export this copy (``clone``) of the sensor's threshold instead. A clone
        takes a quarter of the time of an export: a commit round copies every changed
        sensor's threshold at one point of the stream and exports them while it goes on.

        A calibration sample shared with the prototype is written as its SHA-256
        (``ref_sha256``) instead of 256 numbers: most of a state record otherwise, and
        every changed sensor's record is written at every commit round.
        """
        th = self._by_sensor[sensor] if of is None else of
        shared = self._prototype_sample()
        if shared is None or _reference_of(th) is not shared[0]:
            return th.state_dict()
        state = th.state_dict(reference=False)
        state["ref_sha256"] = shared[1]
        return state

    def _prototype_sample(self) -> tuple[NDArray[np.float64], str] | None:
        """The prototype's calibration sample and its SHA-256 (None if it keeps none)."""
        ref = _reference_of(self._prototype)
        if ref is None:
            return None
        if self._sample_digest is None or self._sample_digest[0] is not ref:
            digest = hashlib.sha256(np.ascontiguousarray(ref, dtype="<f8").tobytes()).hexdigest()
            self._sample_digest = (ref, digest)
        return self._sample_digest

    def restore(self, sensor: str, state: Mapping[str, Any]) -> None:
        """Install a sensor's state; StateError leaves the sensor as it was."""
        th = self._prototype.clone()
        if isinstance(state, Mapping) and "ref_sha256" in state:
            shared = self._prototype_sample()
            if shared is None or state["ref_sha256"] != shared[1]:
                raise StaleStateError(
                    f"state refers to calibration sample {state['ref_sha256']!r}, which is not "
                    "the current model's (the model changed since it was written)"
                )
            state = {k: v for k, v in state.items() if k != "ref_sha256"}
            state["ref"] = shared[0]  # the array itself: nothing to parse
        th.load_state_dict(state)
        _share_reference(th, self._prototype)
        self._by_sensor[sensor] = th


def _reference_of(th: Threshold) -> NDArray[np.float64] | None:
    """The calibration sample a threshold's likelihood uses, if it keeps one."""
    if isinstance(th, SpotThreshold | DspotThreshold):
        return None if th._core is None else th._core.ref
    if isinstance(th, FixedThreshold):
        return th._ref
    return None


def _share_reference(th: Threshold, prototype: Threshold) -> None:
    """Point a restored threshold at the prototype's equal calibration sample.

    Saves the sample's memory per sensor, and lets a batch across sensors search one
    array instead of one per sensor.
    """
    mine, theirs = _reference_of(th), _reference_of(prototype)
    if mine is None or theirs is None or mine is theirs or not np.array_equal(mine, theirs):
        return
    if isinstance(th, SpotThreshold | DspotThreshold) and th._core is not None:
        th._core.ref = theirs
    elif isinstance(th, FixedThreshold):
        th._ref = theirs
