"""Per-channel scaling fitted on training data only and stored with the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from streamer.errors import CheckpointError, DataError

__all__ = ["Scaler"]


@dataclass(frozen=True, slots=True)
class Scaler:
    """``(x - offset) / scale`` per channel."""

    kind: Literal["standard", "minmax"]
    offset: NDArray[np.float64]
    scale: NDArray[np.float64]

    @classmethod
    def fit(cls, values: NDArray[np.floating], kind: Literal["standard", "minmax"]) -> Scaler:
        """Fit on training rows ``(n, channels)``.

        A channel that barely moves in training gets a scale floor relative to its
        magnitude; dividing by a near-zero spread would turn sensor noise in
        production into enormous reconstruction errors.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise DataError(
                f"scaler needs (rows >= 2, channels) training data, got shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise DataError(
                f"training data has a non-finite value at row {bad[0]}, column {bad[1]}"
            )
        if kind == "standard":
            offset = x.mean(axis=0)
            spread = x.std(axis=0)
        else:
            offset = x.min(axis=0)
            spread = x.max(axis=0) - offset
        floor = 1e-3 * (np.abs(x).mean(axis=0) + 1e-3)
        return cls(kind, offset, np.maximum(spread, floor))

    def transform(self, values: NDArray[np.floating]) -> NDArray[np.float32]:
        """Scale an array whose last axis is the channel axis."""
        return ((values - self.offset) / self.scale).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the checkpoint sidecar."""
        return {"kind": self.kind, "offset": self.offset.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, data: Any, channels: int) -> Scaler:
        """Parse the sidecar form, checking shapes and values."""
        try:
            kind = data["kind"]
            offset = np.asarray(data["offset"], dtype=np.float64)
            scale = np.asarray(data["scale"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"scaler in sidecar is malformed: {exc!r}") from exc
        if kind not in ("standard", "minmax"):
            raise CheckpointError(f"scaler kind must be standard or minmax, got {kind!r}")
        if offset.shape != (channels,) or scale.shape != (channels,):
            raise CheckpointError(
                f"scaler has {offset.shape[0] if offset.ndim else 0} channels, model has {channels}"
            )
        if not (np.all(np.isfinite(offset)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise CheckpointError("scaler holds non-finite or non-positive values")
        return cls(kind, offset, scale)
