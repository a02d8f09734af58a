"""Generalized Pareto tails: Grimshaw's fit, tail quantiles, the SPOT likelihood."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from streamer.errors import DataError
from streamer.scoring.thresholds.base import (
    _GAMMA_ZERO,
    _MAX_THRESHOLD,
)


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
