"""What the engine decides about a batch of windows, as one record the layers pass on.

A leaf (numpy, the ring buffers' window batch and the alert event only): the engine
makes it, the encoders encode it, the publisher sends it, and none of them needs the
others' imports for it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamer.scoring.alerts import AlertEvent
from streamer.windows import WindowBatch

__all__ = ["ScoredBatch"]


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Everything the engine decided about one batch of windows."""

    windows: WindowBatch
    sensors: list[Hashable]
    scores: NDArray[np.float64]
    channel_errors: NDArray[np.float64]
    thresholds: NDArray[np.float64]
    anomalous: NDArray[np.bool_]
    likelihood: NDArray[np.float64]
    alert_open: NDArray[np.bool_]
    events: list[AlertEvent]
    model_version: str

    def __len__(self) -> int:
        return len(self.windows)
