"""Every sensor's state under one roof: its ring buffer, its threshold, its alert tracker.

The engine scores through the three stores; whoever keeps sensors across a stream's
life (the daemon's partition table and state writer) goes through ``SensorStore``:
what a sensor's ring holds and needs, a copy of what it learned at one point of the
stream and that copy as JSON, a restore that is all or nothing, and forgetting a
sensor in one call. numpy only: no torch, no Kafka.

The state record (``encode_record``, ``parse_record``) is what a sensor's state is on
the state topic. One version covers all of it: record version 2 means threshold state
version 2 and alert state version 1 inside, which then carry no version of their own.
Version 3 is version 2 whose ring may be *saved* (the samples of a silent sensor's
partial window, instead of an anchor into the input topic); a record without a saved
ring is still written as version 2, so a previous release reads it. Version 1 records,
written before, carried the three versions apart; they are still read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import orjson
from numpy.typing import NDArray

from streamer.errors import DataError, StaleStateError, StateError
from streamer.scoring import alerts as alert_states
from streamer.scoring import thresholds as threshold_states
from streamer.scoring.alerts import AlertBank
from streamer.scoring.novelty import NoveltyBank
from streamer.scoring.thresholds import Threshold, ThresholdBank, pack_floats, unpack_floats
from streamer.windows import RingCopy, RingWindows, SensorIndex

__all__ = [
    "READABLE_RECORDS",
    "RECORD_VERSION",
    "RingFacts",
    "SensorRecord",
    "SensorState",
    "SensorStore",
    "encode_record",
    "parse_record",
]

RECORD_VERSION = 3
"""Newest state record version written; it fixes the versions of the parts inside."""
# Written for records without a saved ring: the same parts, readable by releases
# that know no saved ring.
_ANCHORED_VERSION = 2
# Record version -> (threshold state version, alert state version) inside it; None: the
# parts carry their own (version 1).
_PARTS: dict[int, tuple[int, int] | None] = {
    1: None,
    2: (threshold_states.STATE_VERSION, alert_states.STATE_VERSION),
    3: (threshold_states.STATE_VERSION, alert_states.STATE_VERSION),
}
READABLE_RECORDS = tuple(_PARTS)
"""State record versions ``parse_record`` reads; any other is reported and ignored."""


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
        self,
        index: SensorIndex,
        windows: RingWindows,
        thresholds: ThresholdBank,
        alerts: AlertBank,
        novelty: NoveltyBank | None = None,
    ) -> None:
        self.index = index
        self.windows = windows
        self.thresholds = thresholds
        self.alerts = alerts
        # Rebuilt from the stream after a restart, not part of the state record.
        self.novelty = novelty

    # -- rings -----------------------------------------------------------------------------

    def rings(self, sensors: Sequence[str]) -> RingFacts:
        """The ring facts of these sensors (each gets a slot if it had none)."""
        windows = self.windows
        slots = self.index.slots(sensors)
        oldest_pos, oldest_count = windows.oldest(slots)
        return RingFacts(
            slots, windows.last_ts_of(slots), self._filled(slots), oldest_pos, oldest_count
        )

    def filled(self, sensors: Sequence[str]) -> NDArray[np.bool_]:
        """Whether each sensor's ring has held a whole window since its last reset."""
        return self._filled(self.index.slots(sensors))

    def _filled(self, slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        filled: NDArray[np.bool_] = self.windows.counts_of(slots) >= self.windows.window
        return filled

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

    def saved_ring(self, sensor: str) -> dict[str, Any]:
        """The sensor's ring as a state record's saved ring (JSON-ready; it must hold samples).

        The values as packed float32 (what the ring holds), the window starts' timestamps
        as packed float64: a copy, unaffected by later samples.
        """
        r = self.windows.copy_ring(self.index.slot(sensor))
        return {
            "count": r.count,
            "last_ts": r.last_ts,
            "last_pos": r.last_pos,
            "values": pack_floats(r.values.ravel(), "<f4"),
            "start_ts": pack_floats(r.start_ts),
            "start_pos": r.start_pos.tolist(),
        }

    def ring_copy(self, saved: Mapping[str, Any]) -> RingCopy:
        """A saved ring read back, checked against this stream's shape; StateError says why not."""
        windows = self.windows
        count, last_pos, last_ts = saved.get("count"), saved.get("last_pos"), saved.get("last_ts")
        if not (_is_int(count) and count >= 1 and _is_int(last_pos) and last_pos >= 0):
            raise StateError(f"saved ring count {count!r} or last_pos {last_pos!r} is invalid")
        if not (isinstance(last_ts, int | float) and math.isfinite(last_ts)):
            raise StateError(f"saved ring last_ts must be a finite number, got {last_ts!r}")
        starts = saved.get("start_pos")
        if not (isinstance(starts, list) and all(_is_int(v) for v in starts)):
            raise StateError("saved ring start_pos must be a list of integers")
        try:
            values = unpack_floats(str(saved.get("values")), "<f4").astype(np.float32)
            start_ts = unpack_floats(str(saved.get("start_ts")))
        except ValueError as exc:
            raise StateError(f"saved ring: {exc}") from None
        w, c = windows.window, windows.channels
        if values.size != w * c:
            raise StateError(
                f"saved ring holds {values.size} values, this stream's window x channels is "
                f"{w} x {c}"
            )
        n_starts = -(-w // windows.stride)
        if start_ts.size != n_starts or len(starts) != n_starts:
            raise StateError(
                f"saved ring holds {start_ts.size} window starts, this stream's window and "
                f"stride ({w}, {windows.stride}) need {n_starts}"
            )
        return RingCopy(
            count,
            float(last_ts),
            last_pos,
            values.reshape(w, c),
            start_ts,
            np.asarray(starts, dtype=np.int64),
        )

    def load_ring(self, sensor: str, ring: RingCopy) -> None:
        """Give the sensor the ring a saved record held (``ring_copy``); StateError if unfit."""
        try:
            self.windows.load_ring(self.index.slot(sensor), ring)
        except DataError as exc:
            self.index.release([sensor])
            raise StateError(f"saved ring: {exc}") from None

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
            # An owed refit done once here serves the sensor and its copy alike; left
            # owed, the copy's export and the sensor's next step would each do it.
            threshold.settle()
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
        if self.novelty is not None:
            self.novelty.drop(sensors)

    def forget(self, sensors: Sequence[str]) -> None:
        """Forget these sensors entirely: rings, thresholds, alert trackers."""
        self.release_rings(sensors)
        self.drop_learned(sensors)


@dataclass(frozen=True, slots=True)
class SensorRecord:
    """A validated state record (``parse_record``): parts as their loaders take them."""

    sensor: str
    partition: int
    upto: int  # H of the commit round that wrote it
    threshold: dict[str, Any] | None
    alerts: dict[str, Any] | None
    # anchor_offset, anchor_count: both present, offset >= 0, count >= 1.
    ring: dict[str, int] | None
    # A saved ring (SensorStore.saved_ring) instead of an anchor: unchecked here, since
    # only the store knows its shape (SensorStore.ring_copy checks it).
    saved: dict[str, Any] | None = None


def encode_record(
    sensor: str,
    partition: int,
    upto: int,
    ring: dict[str, Any] | None,
    threshold: dict[str, Any] | None,
    alerts: dict[str, Any],
) -> bytes:
    """A sensor's state record (sorted keys, stable bytes), from its parts' fresh exports.

    ``ring``: an anchor (``anchor_offset``, ``anchor_count``), ``{"saved": ...}`` (a
    version 3 record) or None. The parts' own ``version`` fields are taken out (the
    record's version fixes them); the dicts are the exports made for this record, so
    they are changed in place.
    """
    if threshold is not None:
        threshold.pop("version", None)
    alerts.pop("version", None)
    return orjson.dumps(
        {
            "version": RECORD_VERSION
            if ring is not None and "saved" in ring
            else _ANCHORED_VERSION,
            "sensor": sensor,
            "partition": partition,
            "upto": upto,
            "threshold": threshold,
            "alerts": alerts,
            "ring": ring,
        },
        option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
    )


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(key: bytes, value: bytes, partition: int) -> SensorRecord:
    """Validate a state record read from ``partition`` under ``key``; StateError says why not."""
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise StateError(f"not JSON: {exc}") from exc
    version = rec.get("version") if isinstance(rec, dict) else None
    if not _is_int(version) or version not in _PARTS:
        raise StateError(f"unknown state record version {version!r}")
    sensor = rec.get("sensor")
    if not isinstance(sensor, str) or sensor.encode() != key:
        raise StateError(f"record sensor {sensor!r} does not match its key")
    if rec.get("partition") != partition:
        raise StateError(f"record is for partition {rec.get('partition')!r}, found in {partition}")
    upto = rec.get("upto")
    if not _is_int(upto):
        raise StateError(f"upto must be an integer, got {upto!r}")
    ring, saved = rec.get("ring"), None
    if version >= 3 and isinstance(ring, dict) and "saved" in ring:
        saved, ring = ring["saved"], None
        if not isinstance(saved, dict):
            raise StateError(f"saved ring must be an object, got {type(saved).__name__}")
    if ring is not None:
        ok = isinstance(ring, dict) and all(
            _is_int(ring.get(k)) for k in ("anchor_offset", "anchor_count")
        )
        if not ok or ring["anchor_count"] < 1 or ring["anchor_offset"] < 0:
            raise StateError(f"bad ring anchor {ring!r}")
    for k in ("threshold", "alerts"):
        if rec.get(k) is not None and not isinstance(rec[k], dict):
            raise StateError(f"{k} must be an object or null")
    threshold, alerts = rec.get("threshold"), rec.get("alerts")
    parts = _PARTS[version]
    if parts is not None:
        # The loaders check a part's version: give each the one this record version means
        # (a version written inside anyway would be a corrupt record, and is refused).
        for name, part, part_version in (
            ("threshold", threshold, parts[0]),
            ("alerts", alerts, parts[1]),
        ):
            if part is not None and part.setdefault("version", part_version) != part_version:
                raise StateError(
                    f"a version {version} record's {name} carries version {part['version']!r}"
                    f" (it implies {part_version})"
                )
    return SensorRecord(sensor, partition, upto, threshold, alerts, ring, saved)
