"""Every sensor's state under one roof: its ring buffer, its threshold, its alert tracker.

The engine scores through the three stores; whoever keeps sensors across a stream's
life (the daemon's partition table and state writer) goes through ``SensorStore``:
what a sensor's ring holds and needs, a copy of what it learned at one point of the
stream and that copy as JSON, a restore that is all or nothing, and forgetting a
sensor in one call. numpy only: no torch, no Kafka.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamer.errors import StaleStateError, StateError
from streamer.scoring.alerts import AlertBank
from streamer.scoring.thresholds import Threshold, ThresholdBank
from streamer.windows import RingWindows, SensorIndex

__all__ = ["RingFacts", "SensorState", "SensorStore"]


@dataclass(frozen=True, slots=True)
class RingFacts:
    """What the rings of some sensors hold, one row per sensor asked (``SensorStore.rings``)."""

    slots: NDArray[np.int64]
    last_ts: NDArray[np.float64]  # the newest sample's timestamp (-inf: none held)
    filled: NDArray[np.bool_]  # the ring has held a whole window since its last reset
    oldest_pos: NDArray[np.int64]  # position of the oldest sample the next window needs
    oldest_count: NDArray[np.int64]  # that sample's count since the reset (0: none held)


@dataclass(frozen=True, slots=True)
class SensorState:
    """What one sensor learned, as of one point of its stream: a copy, safe to keep."""

    sensor: str
    threshold: Threshold | None  # None: never scored
    alerts: dict[str, Any]


class SensorStore:
    """Rings, thresholds and alert trackers of every sensor, kept and dropped together."""

    def __init__(
        self, index: SensorIndex, windows: RingWindows, thresholds: ThresholdBank, alerts: AlertBank
    ) -> None:
        self.index = index
        self.windows = windows
        self.thresholds = thresholds
        self.alerts = alerts

    # -- rings -----------------------------------------------------------------------------

    def rings(self, sensors: Sequence[str]) -> RingFacts:
        """The ring facts of these sensors (each gets a slot if it had none)."""
        windows = self.windows
        slots = self.index.slots(sensors)
        oldest_pos, oldest_count = windows.oldest(slots)
        return RingFacts(
            slots,
            windows.last_ts_of(slots),
            windows.counts_of(slots) >= windows.window,
            oldest_pos,
            oldest_count,
        )

    def unscored(self, slot: int) -> int:
        """Samples the ring at ``slot`` holds that no emitted window covered yet."""
        return self.windows.unscored(slot)

    def release_rings(self, sensors: Sequence[str]) -> None:
        """Empty and free these sensors' rings; what they learned stays."""
        held = [s for s in sensors if s in self.index]
        if held:
            self.windows.reset(self.index.slots(held))
            self.index.release(held)

    def anchor(self, sensor: str, position: int, count: int) -> None:
        """Continue the sensor's ring exactly from a replay that starts at ``position``."""
        self.windows.set_anchor(self.index.slot(sensor), position, count)

    def missed_anchors(self, passed: Callable[[int], bool]) -> list[tuple[str, int, bool]]:
        """Void the anchors whose position the replay went past (``passed(position)``).

        Returns (sensor, position, whether its ring is empty) for each.
        """
        windows, index = self.windows, self.index
        out = []
        for slot, (pos, _count) in list(windows.anchors.items()):
            if passed(pos):
                windows.clear_anchors([slot])
                out.append((str(index.key(slot)), pos, windows.count(slot) == 0))
        return out

    # -- what sensors learned ---------------------------------------------------------------

    def learned(self, sensor: str) -> bool:
        """Whether the sensor was ever scored (it has a threshold of its own)."""
        return sensor in self.thresholds

    def snapshot(self, sensor: str, *, copy: bool) -> SensorState:
        """What the sensor learned; ``copy``: a threshold copy, unaffected by later scores."""
        threshold = self.thresholds.get(sensor)
        if copy and threshold is not None:
            threshold = threshold.clone()
        return SensorState(sensor, threshold, self.alerts.export(sensor))

    def export(self, state: SensorState) -> dict[str, Any] | None:
        """The threshold of a snapshot as JSON (None if the sensor was never scored)."""
        if state.threshold is None:
            return None
        return self.thresholds.export(state.sensor, of=state.threshold)

    def restore(
        self,
        sensor: str,
        threshold: Mapping[str, Any] | None,
        alerts: Mapping[str, Any] | None,
    ) -> bool:
        """Install what a sensor learned; all or nothing. Returns whether it was stale.

        Stale: the threshold was written under another model, so the sensor starts from
        the current model's calibration (its alerts still apply). StateError: unusable,
        and the sensor is left without either part.
        """
        stale = False
        if threshold is not None:
            try:
                self.thresholds.restore(sensor, threshold)
            except StaleStateError:
                stale = True
        if alerts is not None:
            try:
                self.alerts.restore(sensor, alerts)
            except StateError:
                # A sensor with half its state would be worse than re-warming.
                self.thresholds.drop([sensor])
                raise
        return stale

    def drop_learned(self, sensors: Sequence[str]) -> None:
        """Forget what these sensors learned (their rings are left as they are)."""
        self.thresholds.drop(sensors)
        self.alerts.drop(sensors)

    def forget(self, sensors: Sequence[str]) -> None:
        """Forget these sensors entirely: rings, thresholds, alert trackers."""
        self.release_rings(sensors)
        self.drop_learned(sensors)
