"""Adaptive anomaly thresholds over a stream of window scores, one instance per sensor.

Every threshold follows the :class:`Threshold` protocol: calibrated once from the
model's training residual scores, then stepped over one sensor's live scores in order.
It adapts online but never learns from a point it alarmed on, so an anomaly cannot
raise the bar that detects it. State round-trips through JSON, so the daemon can
checkpoint it per sensor and restore it after a restart or a rebalance.

Implementations: :class:`SpotThreshold` and :class:`DspotThreshold` (Siffer et al.,
"Anomaly Detection in Streams with Extreme Value Theory", KDD 2017), a rolling
empirical quantile and a fixed value. :class:`ThresholdBank` keeps one per sensor.

Layout: ``base`` (the Protocols), ``checks``, ``serial`` and ``reference`` (shared
helpers), ``gpd`` (the tail maths), one module per algorithm, ``bank``.

A non-finite score (a diverging model), or one beyond ``±1e300``, is treated as ``+inf``:
always anomalous, never learned, likelihood 1. Calibration scores must lie within
``±1e300`` and thresholds stay below about ``2e300``, so every number a threshold learns
and exports is finite, and its state restores. Only numpy is used here.
"""

from __future__ import annotations

from typing import Any, Literal

from streamer.errors import ConfigError
from streamer.scoring.thresholds.bank import ThresholdBank
from streamer.scoring.thresholds.base import (
    MIN_CALIBRATION,
    READABLE_VERSIONS,
    STATE_VERSION,
    BatchStepping,
    DeferredFit,
    Serialisable,
    SharedReference,
    Stepping,
    Threshold,
    ThresholdResult,
)
from streamer.scoring.thresholds.dspot import DspotThreshold
from streamer.scoring.thresholds.fixed import FixedThreshold
from streamer.scoring.thresholds.gpd import fit_gpd
from streamer.scoring.thresholds.quantile import QuantileThreshold
from streamer.scoring.thresholds.serial import pack_floats, unpack_floats
from streamer.scoring.thresholds.spot import SpotThreshold

__all__ = [
    "MIN_CALIBRATION",
    "READABLE_VERSIONS",
    "STATE_VERSION",
    "BatchStepping",
    "DeferredFit",
    "DspotThreshold",
    "FixedThreshold",
    "QuantileThreshold",
    "Serialisable",
    "SharedReference",
    "SpotThreshold",
    "Stepping",
    "Threshold",
    "ThresholdBank",
    "ThresholdResult",
    "fit_gpd",
    "make_threshold",
    "pack_floats",
    "unpack_floats",
]

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
