"""Parked sensors: a silent sensor's partial window saved with its state, not anchored.

A live sensor's state record normally anchors its ring in the input topic: the offset
of the oldest sample its next window needs, from which a restart's replay rebuilds it.
That anchor is also the least a commit may cover, so a silent sensor would hold its
partition's commit back until it is evicted. After ``stream.park_after_s`` of silence
(``runtime.eviction``) its ring is saved into its record instead (``ParkedRings``), and
it no longer counts for the commit. A restore loads the saved ring whole; the replay
from the commit then drops the samples the ring holds already (``held``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.codec import offset_of, partition_of
from streamer.metrics import Metrics
from streamer.sensors import SensorStore
from streamer.windows import RingCopy

__all__ = ["ParkedRings"]

log = structlog.get_logger("streamer.daemon")


class ParkedRings:
    """The saved rings of parked sensors, and the replay marks of restored ones."""

    def __init__(self, sensors: SensorStore, metrics: Metrics) -> None:
        self.sensors = sensors
        self.metrics = metrics
        # Parked sensors: their newest sample's timestamp when their ring was saved, and
        # the saved ring their state records carry instead of an anchor (as of that H).
        self.saved: dict[str, tuple[float, dict[str, Any]]] = {}
        # Restored parked sensors: the position of the newest sample in their saved
        # ring. A replay drops their samples up to it (they are in the ring already).
        self.resume: dict[str, int] = {}

    def __contains__(self, sensor: object) -> bool:
        return sensor in self.saved

    def ring(self, sensor: str) -> dict[str, Any] | None:
        """The saved ring a parked sensor's record carries (as of the last snapshot)."""
        entry = self.saved.get(sensor)
        return None if entry is None else entry[1]

    def update(
        self,
        partition: int,
        committed_offset: int,
        quiet: list[str],
        sensor_part: Mapping[str, int],
    ) -> tuple[list[str], list[str]]:
        """At a round's snapshot: park the ``quiet`` sensors, refresh or anchor parked ones.

        A parked sensor that spoke again gets its ring saved afresh, and is anchored again
        once its next window needs no sample before the offset last committed (an anchor
        before it would pull the commit back, and a restart from that commit would not
        meet it). Returns the sensors whose record the round must write, and those
        parked now (their anchors no longer count).
        """
        saved, sensors = self.saved, self.sensors
        mine = [s for s in saved if sensor_part.get(s) == partition] if saved else []
        quiet_set = set(quiet)
        dirty = []
        if mine:
            rings = sensors.rings(mine)
            floor = committed_offset
            unpark = (rings.oldest_count > 0) & (offset_of(rings.oldest_pos) >= floor)
            for s, gone, ts in zip(mine, unpark.tolist(), rings.last_ts.tolist(), strict=True):
                if gone and s not in quiet_set:
                    del saved[s]  # anchored at this round
                    dirty.append(s)
                elif ts != saved[s][0]:
                    saved[s] = (ts, sensors.saved_ring(s))
                    dirty.append(s)
        new = [s for s in quiet if s not in saved]
        for s, ts in zip(new, sensors.rings(new).last_ts.tolist(), strict=True):
            saved[s] = (ts, sensors.saved_ring(s))
        if new:
            self.metrics.sensors_parked.inc(len(new))
            log.info("sensors_parked", partition=partition, sensors=len(new), parked=len(saved))
        return dirty + new, new

    def restored(self, sensor: str, ring: RingCopy, saved: dict[str, Any]) -> None:
        """A parked sensor's record was restored: load its ring; its replay mark is set."""
        self.sensors.load_ring(sensor, ring)
        self.saved[sensor] = (ring.last_ts, saved)
        self.resume[sensor] = ring.last_pos

    def forget(self, sensor: str) -> None:
        """The sensor's ring is gone (evicted, or its partition left)."""
        self.saved.pop(sensor, None)
        self.resume.pop(sensor, None)

    def held(self, keys: NDArray[np.object_], positions: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which samples a restored parked sensor's saved ring holds already (a replay's)."""
        resume = self.resume
        return np.fromiter(
            (
                resume.get(k, -1) >= pos
                for k, pos in zip(keys.tolist(), positions.tolist(), strict=True)
            ),
            dtype=bool,
            count=len(keys),
        )

    def replayed(self, partition: int, consumed: int) -> None:
        """The partition's replay reached ``consumed``: the marks it went past are done with."""
        for s, pos in list(self.resume.items()):
            if partition_of(pos) == partition and offset_of(pos) <= consumed:
                del self.resume[s]
