"""Calibration samples: bounded sorted samples, their empirical CDF, and read-only sharing.

A sample is validated (finite, sorted) once, frozen read-only, and then shared between
every clone of a prototype and every restored sensor that has the same one."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from streamer.scoring.thresholds.base import (
    _REFERENCE_SIZE,
)

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
