"""Parameter and score validation shared by the thresholds: a clear error naming the value."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from streamer.errors import ConfigError, DataError
from streamer.scoring.thresholds.base import (
    _MAX_THRESHOLD,
    _MIN_PEAKS,
)


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
