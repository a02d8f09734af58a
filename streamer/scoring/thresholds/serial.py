"""State dict helpers: headers, checked fields, packed float arrays, corrupt records."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from streamer.errors import ConfigError, StateError
from streamer.scoring.thresholds.base import (
    _NUMBERS,
    _REFERENCE_SIZE,
    READABLE_VERSIONS,
)
from streamer.scoring.thresholds.reference import (
    _validated,
)


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


def pack_floats(values: ArrayLike, dtype: str = "<f8") -> str:
    """Float64 values as base64 of their little-endian bytes: exact, and ~11 characters each.

    ``dtype`` "<f4" packs float32 values (a sensor's saved ring) in half the space.

    A state record holds up to ``max_peaks`` peaks per sensor and a commit round writes
    one per changed sensor: as JSON numbers each takes ~19 characters and a float
    formatting (and parsing) step, as packed bytes about 11 and a memory copy.
    """
    raw = np.ascontiguousarray(values, dtype=dtype).tobytes()
    return base64.b64encode(raw).decode("ascii")


def unpack_floats(packed: str, dtype: str = "<f8") -> NDArray[np.float64]:
    """The values :func:`pack_floats` packed, as float64 (a new array); ValueError if malformed."""
    try:
        raw = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {size}-byte values")
    return np.frombuffer(raw, dtype=dtype).astype(np.float64)


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
