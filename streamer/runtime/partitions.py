"""The partition table: which sensors the daemon holds, where, and since when.

Per assigned input partition a ``Partition`` (offsets and the sensor sets a commit
round reads); per live sensor its partition, the ring anchor last written for it and
when its last message arrived; per evicted sensor whose learned state is kept, since
when. The table decides who is registered (``track``, under ``stream.max_sensors``),
who is evicted (``snapshot``: silent, idle, or pinning the replay too far back), who
is parked (silent for ``stream.park_after_s``: its partial window is saved with its
state rather than anchored in the input topic, so it no longer holds the commit back)
and whose state a round must write (``Partition.dirty`` and ``Partition.evicted``).

The sensor state itself (rings, thresholds, alerts) lives in the engine's
``SensorStore``; the table only says which sensors it holds for which partition.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.codec import offset_of, partition_of, to_position
from streamer.config import StreamConfig
from streamer.metrics import Metrics
from streamer.runtime.counters import Counters
from streamer.runtime.eviction import EVICTIONS_LOGGED, choose_evictions, log_evictions
from streamer.runtime.parking import ParkedRings
from streamer.runtime.rounds import Checkpoint
from streamer.sensors import SensorRecord, SensorStore
from streamer.windows import WindowBatch

__all__ = ["Partition", "PartitionTable"]

log = structlog.get_logger("streamer.daemon")


@dataclass(slots=True)
class Partition:
    """What the daemon tracks per assigned input partition."""

    partition: int
    # Offset of the last message consumed (H_p); -1 before the first one.
    consumed: int = -1
    # H of the last commit (read from the commit metadata at assignment, then ours).
    committed_h: int = -1
    # The offset last committed: a restart replays from it (-1: none yet).
    committed_offset: int = -1
    # Windows and dead letters at or below this offset were already published.
    restored_h: int = -1
    # Sensor -> offset up to which its windows were published (state newer than commit).
    skip: dict[str, int] = field(default_factory=dict)
    replay_until: int = -1  # max(restored_h, every skip value)
    stale: int = 0  # restored thresholds written under another model (re-warmed)
    sensors: set[str] = field(default_factory=set)  # sensors with a ring (or a pending anchor)
    known: set[str] = field(default_factory=set)  # every sensor seen or restored here
    dirty: set[str] = field(default_factory=set)  # state to write at the next round
    evicted: set[str] = field(default_factory=set)  # state records to clear at the next round
    # Its state is being installed (runtime.recovery): none of its messages is processed
    # and no round commits it until it is in place.
    restoring: bool = False


class PartitionTable:
    """The assigned partitions, their live and evicted sensors, and the eviction policy."""

    def __init__(
        self,
        sensors: SensorStore,
        stream: StreamConfig,
        metrics: Metrics,
        counters: Counters,
        *,
        limit_log_every_s: float = 60.0,
    ) -> None:
        self.sensors = sensors
        self.stream = stream
        self.metrics = metrics
        self.counters = counters
        self.parts: dict[int, Partition] = {}
        self.sensor_part: dict[str, int] = {}
        # Offset of the ring anchor last written to the state topic, per live sensor.
        self.anchor_offset: dict[str, int] = {}
        # Per live sensor, when its last message arrived (monotonic): wall-clock idleness
        # (stream.max_idle_s) and which sensor gives way under stream.max_sensors.
        self.last_seen: dict[str, float] = {}
        # Evicted sensors whose threshold and alert state is kept in memory: since when
        # (monotonic) and their partition, oldest first (see expire_evicted).
        self.evicted_at: dict[str, tuple[float, int]] = {}
        # Silent sensors whose ring is saved with their state (runtime.parking).
        self.parked = ParkedRings(sensors, metrics)
        # Sensor-limit events since the last sensor_limit_reached line (one per interval).
        self.limit_counts = {"evicted": 0, "refused_samples": 0, "refused_sensors": 0}
        self.limit_logged = 0.0
        self.limit_log_every_s = limit_log_every_s

    # -- registration ----------------------------------------------------------------------

    def track(
        self, keys: NDArray[np.object_], parts: NDArray[np.int64]
    ) -> NDArray[np.bool_] | None:
        """Register new sensors (their ring anchor is written at the next round).

        Beyond stream.max_sensors, a new sensor takes the place of the least recently seen
        one, not in this batch, that has not filled a window yet (since its last reset).
        Sensors that fill windows are never displaced by new ids: with no such place left,
        the samples of the sensors that find no room are marked in the returned mask, to
        be dead-lettered (sensor_limit), so a flood of new ids costs no real sensor its
        window.
        """
        known = self.sensor_part
        names = keys.tolist()
        now = time.monotonic()
        # One dict lookup per sample: cheaper than finding the distinct keys (np.unique
        # sorts objects with Python comparisons), and almost every key is known.
        new = [i for i, key in enumerate(names) if key not in known]
        refused = None
        if new:
            first: dict[str, int] = {}
            for i in new:
                first.setdefault(names[i], int(parts[i]))
            room = self.stream.max_sensors - len(known)
            if len(first) > room:
                room += self._make_room(len(first) - room, set(names))
                if len(first) > room:
                    over = set(itertools.islice(first, room, None))
                    refused = np.fromiter((n in over for n in names), bool, len(names))
                    for key in over:
                        del first[key]
                    self._count_limit(refused_samples=int(refused.sum()), refused_sensors=len(over))
            for key, p in first.items():
                self.sensor_part[key] = p
                part = self.parts[p]
                part.sensors.add(key)
                part.known.add(key)
                part.dirty.add(key)
                part.evicted.discard(key)
                self.evicted_at.pop(key, None)
        if refused is None:
            self.last_seen.update(zip(names, itertools.repeat(now)))
        else:
            kept = (n for n, r in zip(names, refused.tolist(), strict=True) if not r)
            self.last_seen.update((n, now) for n in kept)
        return refused

    def _make_room(self, wanted: int, batch: set[str]) -> int:
        """Evict up to ``wanted`` live sensors that have not filled a window, not in ``batch``.

        The least recently seen go first. Runs only at the limit: a pass over the live
        sensors. Returns how many were evicted.
        """
        names = [s for s in self.sensor_part if s not in batch]
        if not names:
            return 0
        unfilled = np.flatnonzero(~self.sensors.filled(names))
        seen = np.fromiter(
            map(self.last_seen.get, names, itertools.repeat(0.0)),
            dtype=np.float64,
            count=len(names),
        )
        oldest = unfilled[np.argsort(seen[unfilled], kind="stable")[:wanted]]
        victims = [names[i] for i in oldest.tolist()]
        for s in victims:
            self.evicted(s, self.parts[self.sensor_part[s]], "sensor_limit")
        self._count_limit(evicted=len(victims))
        return len(victims)

    def _count_limit(self, **counts: int) -> None:
        """Count sensor-limit events; one sensor_limit_reached line per stats interval."""
        for k, v in counts.items():
            self.limit_counts[k] += v
        self.metrics.sensors_refused.inc(counts.get("refused_samples", 0))
        now = time.monotonic()
        if now - self.limit_logged >= self.limit_log_every_s:
            self.limit_logged = now
            log.warning(
                "sensor_limit_reached",
                max_sensors=self.stream.max_sensors,
                sensors=len(self.sensor_part),
                **self.limit_counts,
                hint="a flood of new sensor ids, or raise stream.max_sensors",
            )
            self.limit_counts = dict.fromkeys(self.limit_counts, 0)

    def changed(self, sensors: Iterable[str]) -> None:
        """These sensors' thresholds and alert state moved: write them at the next round."""
        for s in sensors:
            p = self.sensor_part.get(s)
            if p is not None and p in self.parts:
                self.parts[p].dirty.add(s)

    # -- eviction --------------------------------------------------------------------------

    def evicted(self, sensor: str, part: Partition, reason: str) -> None:
        """Drop a live sensor's ring; keep what it learned, if anything (see expire_evicted).

        A sensor that was never scored has nothing to keep: it leaves the known set, and
        its record (if an anchor was written) is cleared with a tombstone at the next round.
        """
        written = sensor in self.anchor_offset
        self.forget_ring(sensor, part)
        if self.sensors.learned(sensor):
            part.evicted.add(sensor)
            self.evicted_at.pop(sensor, None)
            self.evicted_at[sensor] = (time.monotonic(), part.partition)
        else:
            part.known.discard(sensor)
            if written:
                part.evicted.add(sensor)
        self.counters.evicted += 1
        self.metrics.sensors_evicted.labels(reason=reason).inc()

    def expire_evicted(self) -> list[tuple[str, int]]:
        """Forget the state of sensors evicted too long ago, or beyond max_sensors of them.

        Returns those of still assigned partitions: their records are to be cleared with a
        tombstone. Run between rounds only (no round's records in flight): the tombstone
        then comes after every earlier record of the sensor, so a restart re-warms it too.
        """
        ttl_s = self.stream.evicted_state_ttl_s
        cap = self.stream.max_sensors
        now = time.monotonic()
        expired: list[tuple[str, int]] = []
        for sensor, (since, p) in self.evicted_at.items():  # oldest first
            if now - since <= ttl_s and len(self.evicted_at) - len(expired) <= cap:
                break
            expired.append((sensor, p))
        if not expired:
            return []
        names = [s for s, _ in expired]
        self.sensors.drop_learned(names)
        owned = []
        for sensor, p in expired:
            del self.evicted_at[sensor]
            part = self.parts.get(p)
            if part is not None:
                part.known.discard(sensor)
                part.evicted.discard(sensor)
                owned.append((sensor, p))
        self.metrics.sensors_expired.inc(len(expired))
        log.info("evicted_state_expired", sensors=len(expired), kept=len(self.evicted_at))
        return owned

    def forget_ring(self, sensor: str, part: Partition) -> None:
        """Release a sensor's ring and its live-sensor bookkeeping (not what it learned)."""
        self.sensors.release_rings([sensor])
        part.sensors.discard(sensor)
        part.dirty.discard(sensor)
        self.sensor_part.pop(sensor, None)
        self.anchor_offset.pop(sensor, None)
        self.last_seen.pop(sensor, None)
        self.parked.forget(sensor)

    def _expire_anchors(self, part: Partition) -> None:
        """Anchors the replay went past without meeting (record older than the log) are void."""

        def passed(pos: int) -> bool:
            return bool(partition_of(pos) == part.partition and offset_of(pos) <= part.consumed)

        for sensor, pos, empty in self.sensors.missed_anchors(passed):
            if empty:
                self.forget_ring(sensor, part)
            log.warning(
                "state_anchor_missed",
                sensor=sensor,
                partition=part.partition,
                anchor_offset=offset_of(pos),
            )

    # -- commit rounds ---------------------------------------------------------------------

    def snapshot(self, p: int) -> Checkpoint | None:
        """Step 1 of a round for partition p: evict, and take the ring anchors at H."""
        part = self.parts.get(p)
        if part is None or part.restoring or part.consumed <= part.committed_h:
            return None  # nothing consumed since the last commit (or still replaying)
        h = part.consumed
        self._expire_anchors(part)
        if self.parked.resume:
            self.parked.replayed(p, part.consumed)
        names, oldest_pos, oldest_count, park = self._evict(part, h)
        quiet = [names[i] for i in np.flatnonzero(park).tolist()]
        write, parked = self.parked.update(p, part.committed_offset, quiet, self.sensor_part)
        part.dirty.update(write)
        for s in parked:
            self.anchor_offset.pop(s, None)
        evicted, part.evicted = part.evicted, set()
        return Checkpoint(p, h, names, oldest_pos, oldest_count, evicted)

    def _evict(
        self, part: Partition, h: int
    ) -> tuple[list[str], NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
        """Evict silent sensors and those that would make the replay too long.

        Returns the sensors kept, with the position and count of the oldest sample a
        future window of theirs needs (``RingWindows.oldest``) and whether each is quiet
        enough to park. Vectorised: at 100,000 sensors it runs at every commit round.
        """
        names = list(part.sensors)
        rings = self.sensors.rings(names)
        oldest_pos, oldest_count = rings.oldest_pos, rings.oldest_count
        written = np.fromiter(
            map(self.anchor_offset.get, names, itertools.repeat(-1)),
            dtype=np.int64,
            count=len(names),
        )
        mono = time.monotonic()
        seen = np.fromiter(
            map(self.last_seen.get, names, itertools.repeat(mono)),
            dtype=np.float64,
            count=len(names),
        )
        ev = choose_evictions(
            h=h,
            oldest_pos=oldest_pos,
            written=written,
            last_ts=rings.last_ts,
            filled=rings.filled,
            idle_s=mono - seen,
            stream=self.stream,
        )
        order = ev.order(names)
        unscored = [self.sensors.unscored(int(rings.slots[i])) for i in order[:EVICTIONS_LOGGED]]
        log_evictions(part.partition, names, unscored, ev, order, self.stream)
        for i in order:
            self.evicted(names[i], part, ev.reason(i))
        if not ev.any:
            return names, oldest_pos, oldest_count, ev.park
        kept = np.flatnonzero(~ev.out)
        return (
            [names[i] for i in kept.tolist()],
            oldest_pos[kept],
            oldest_count[kept],
            ev.park[kept],
        )

    def commit_offset(self, part: Partition, h: int) -> int:
        """The offset to commit: the oldest anchor written for a live sensor, else H + 1.

        Parked sensors have no anchor: their records carry the samples themselves.
        """
        nothing = itertools.repeat(h + 1)
        return min(map(self.anchor_offset.get, part.sensors, nothing), default=h + 1)

    def give_back(self, checkpoints: list[Checkpoint], unsent: Iterable[tuple[Any, ...]]) -> None:
        """An abandoned round's evictions and unsent sensors are for the next round."""
        for c in checkpoints:
            part = self.parts.get(c.partition)
            if part is not None:
                part.evicted |= c.evicted
        for sensor, p, *_ in unsent:
            part = self.parts.get(p)
            if part is not None:
                (part.dirty if sensor in part.sensors else part.evicted).add(sensor)

    def committed(self, heads: dict[int, int], offsets: dict[int, int]) -> None:
        """The coordinator accepted a commit of these partitions' H, at these offsets."""
        for p, h in heads.items():
            part = self.parts.get(p)
            if part is not None:
                # An answer can come after a later (revocation) commit or a reassignment
                # that already moved H on; never move it back.
                part.committed_h = max(part.committed_h, h)
                part.committed_offset = max(part.committed_offset, offsets.get(p, -1))

    # -- assignment ------------------------------------------------------------------------

    def apply(self, part: Partition, rec: SensorRecord, start: int) -> None:
        """Restore one sensor of ``part`` from its state record; ``start``: the commit."""
        sensors = self.sensors
        sensor = rec.sensor
        # Checked before anything is installed: a record is restored whole or not at all.
        saved = sensors.ring_copy(rec.saved) if rec.saved is not None else None
        part.known.add(sensor)
        # Stale: written under another model, so the threshold starts from the current
        # model's calibration; alerts and the ring anchor still apply.
        part.stale += sensors.restore(sensor, rec.threshold, rec.alerts)
        if rec.upto > part.restored_h:
            part.skip[sensor] = rec.upto
            part.replay_until = max(part.replay_until, rec.upto)
        ring = rec.ring
        live = saved is not None or (ring is not None and ring["anchor_offset"] >= start)
        if live:
            self.sensor_part[sensor] = part.partition
            self.last_seen[sensor] = time.monotonic()
            part.sensors.add(sensor)
        if saved is not None and rec.saved is not None:
            self.parked.restored(sensor, saved, rec.saved)
        elif ring is not None and live:
            position = to_position(part.partition, int(ring["anchor_offset"]))
            sensors.anchor(sensor, position, ring["anchor_count"])
            self.anchor_offset[sensor] = ring["anchor_offset"]
        elif sensors.learned(sensor):
            # Evicted before the record was written: its state is kept as any eviction's.
            self.evicted_at[sensor] = (time.monotonic(), part.partition)

    def serving(self) -> list[int]:
        """The assigned partitions whose state is in place (not restoring)."""
        return [p for p, part in self.parts.items() if not part.restoring]

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked or lost partitions and every sensor's state they held."""
        for p in partitions:
            part = self.parts.pop(p)
            sensors = sorted(part.known)
            for s in sensors:
                self.forget_ring(s, part)
            self.sensors.drop_learned(sensors)
            for s in sensors:
                self.evicted_at.pop(s, None)

    # -- the replay filter -----------------------------------------------------------------

    def replay_filter(self, parts: NDArray[np.int64], positions: NDArray[np.int64]) -> Any:
        """Window filter for a replay: None (keep all) once past every partition's replay mark.

        The filter returns, per window, whether it is new: its last offset is above both
        the partition's restored H and its sensor's ``upto``.
        """
        offs = offset_of(positions)
        if not any(
            (offs[parts == p] <= self.parts[p].replay_until).any()
            for p in np.unique(parts).tolist()
        ):
            return None
        index = self.sensors.index
        counters, metrics = self.counters, self.metrics

        def keep(w: WindowBatch) -> NDArray[np.bool_]:
            out = np.ones(len(w), dtype=bool)
            sensors = index.keys_of(w.slots)
            for i, pos in enumerate(w.end_pos.tolist()):
                p, off = partition_of(pos), offset_of(pos)
                part = self.parts[p]
                if off <= part.replay_until:
                    mark = part.skip.get(str(sensors[i]), part.restored_h)
                    out[i] = off > max(mark, part.restored_h)
            skipped = int((~out).sum())
            counters.skipped_windows += skipped
            metrics.windows_skipped.inc(skipped)
            return out

        return keep
