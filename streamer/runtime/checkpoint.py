"""Writing the per-sensor state a commit round covers to the compacted state topic.

``Checkpointer`` is the round's ``StateWriter``: the partition table says whose state
changed (and who was evicted) since the last round, the engine's stores hold that
state, and each record (``runtime.state``) goes to the state topic's partition of
the sensor's input partition, keyed by the sensor.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import structlog

from streamer.errors import StreamerError
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import PartitionTable
from streamer.runtime.rounds import FLUSH_TIMEOUT_S, Checkpoint, StateAtH
from streamer.runtime.snapshot import snapshot_path, write_snapshot
from streamer.runtime.state import commit_metadata
from streamer.scoring.thresholds import Threshold
from streamer.sensors import SensorState, SensorStore, encode_record

__all__ = ["Checkpointer", "StateProducer", "ring_record"]

log = structlog.get_logger("streamer.daemon")

# State records produced between waits for delivery within one large round.
_STATE_FLUSH_EVERY = 5000


class StateProducer(Protocol):
    """The producer, as the state writer sees it (``kafka.sink.Sink``)."""

    def produce(
        self, topic: str, value: bytes | None, key: str | None = ..., *, partition: int | None = ...
    ) -> None:
        """Queue one record."""

    def flush(self, timeout_s: float = ...) -> None:
        """Wait until everything produced is acknowledged."""


def ring_record(
    saved: dict[str, Any] | None, at_h: Checkpoint, sensor: str
) -> dict[str, Any] | None:
    """A sensor's ring in its state record: saved (parked), else anchored at H, else none."""
    if saved is not None:
        return {"saved": saved}
    anchor = at_h.anchor(sensor)
    return None if anchor is None else {"anchor_offset": anchor[0], "anchor_count": anchor[1]}


class Checkpointer:
    """Produces the state records of commit rounds (a ``rounds.StateWriter``)."""

    def __init__(
        self,
        table: PartitionTable,
        sensors: SensorStore,
        producer: StateProducer,
        topic: str,
        counters: Counters,
    ) -> None:
        self.table = table
        self.sensors = sensors
        self.producer = producer
        self.topic = topic
        self.counters = counters

    @property
    def written(self) -> int:
        """State records produced since start (tombstones included)."""
        return self.counters.state_written

    def round_size(self, checkpoints: list[Checkpoint]) -> int:
        """An upper bound on the records the round writes: its sensors and evictions."""
        return sum(len(c.evicted) + len(c.sensors) for c in checkpoints)

    def snapshot(self, partition: int) -> Checkpoint | None:
        """Step 1 of a round for a partition (``PartitionTable.snapshot``)."""
        return self.table.snapshot(partition)

    def checkpoint(self, c: Checkpoint, defer: deque[StateAtH] | None = None) -> tuple[int, str]:
        """Produce the state records of a snapshot; its commit (offset, metadata).

        Written: the sensors evicted at H, and those present at H whose thresholds or
        alerts changed. A sensor that appeared after H stays dirty for the next round.
        With ``defer``, the sensors' state at H is appended there, to be serialised and
        produced later: a threshold snapshot takes a quarter of the time of its record.
        """
        p, h = c.partition, c.h
        part = self.table.parts[p]
        anchor_offset, parked = self.table.anchor_offset, self.table.parked
        # Keep what was learned by evicted sensors; only the ring anchor is gone.
        records: list[tuple[str, dict[str, Any] | None]] = [(s, None) for s in sorted(c.evicted)]
        c.evicted = set()
        at_h = c.index() if part.dirty else {}
        dirty = sorted(s for s in part.dirty if s in at_h and s in part.sensors)
        part.dirty.difference_update(dirty)
        for s in dirty:
            # A parked sensor's ring as of the snapshot at H (PartitionTable.snapshot saved
            # it then), else its anchor at H, which the commit offset then follows.
            ring = ring_record(parked.ring(s), c, s)
            if ring is not None and "anchor_offset" in ring:
                anchor_offset[s] = ring["anchor_offset"]
            records.append((s, ring))
        for n, (s, ring) in enumerate(records, 1):
            # Deferred, the threshold as of H is a copy, serialised later.
            state = self.sensors.snapshot(s, copy=defer is not None)
            if defer is not None:
                defer.append((s, p, h, ring, state.threshold, state.alerts))
                continue
            self.write(s, p, self.value(s, p, h, ring, state.threshold, state.alerts))
            if n % _STATE_FLUSH_EVERY == 0:
                # Bound what the producer holds: at 100,000 changed sensors one round is
                # hundreds of MB of records. Everything must be delivered before the
                # commit anyway, so waiting for this slice now costs only a round trip.
                self.producer.flush(FLUSH_TIMEOUT_S)
        return self.table.commit_offset(part, h), commit_metadata(h)

    def every_record(self, p: int) -> Iterator[tuple[bytes, bytes]]:
        """Every sensor's state record of partition ``p`` as of now (a local snapshot).

        What a round writing every sensor at H would write, H the partition's last
        consumed offset (all of it committed): live sensors with their ring (anchored at
        the oldest sample their next window needs, or saved if parked), evicted ones that
        learned something without one.
        """
        part = self.table.parts[p]
        h = part.consumed
        live = sorted(part.sensors)
        rings = self.sensors.rings(live)
        at_h = Checkpoint(p, h, live, rings.oldest_pos, rings.oldest_count, set())
        for s in sorted(part.known):
            ring = ring_record(self.table.parked.ring(s), at_h, s) if s in part.sensors else None
            state = self.sensors.snapshot(s, copy=False)
            value = self.value(s, p, h, ring, state.threshold, dict(state.alerts))
            if value is not None:
                yield s.encode(), value

    def save_snapshots(
        self, directory: Path, group: str, end_offset: Callable[[int], int]
    ) -> dict[int, int]:
        """Leave each served partition's state in ``directory`` (``runtime.snapshot``).

        Only partitions whose state is all committed (the shutdown round's commit went
        through, no replay under way); ``end_offset(p)``: the state topic partition's end
        now. A file that cannot be written costs the next start a read of the state
        topic, never this stop: it is logged and skipped. Returns the records per file
        (and logs ``state_snapshot_written`` when there are any).
        """
        started = time.perf_counter()
        saved: dict[int, int] = {}
        for p in self.table.serving():
            part = self.table.parts[p]
            if part.consumed < 0 or part.consumed != part.committed_h:
                continue
            try:
                saved[p] = write_snapshot(
                    snapshot_path(directory, group, self.topic, p),
                    group=group,
                    state_topic=self.topic,
                    partition=p,
                    h=part.committed_h,
                    state_end=end_offset(p),
                    records=self.every_record(p),
                )
            except (OSError, StreamerError) as exc:
                log.warning("state_snapshot_not_written", partition=p, error=str(exc))
        if saved:
            log.info(
                "state_snapshot_written",
                directory=str(directory),
                records=saved,
                seconds=round(time.perf_counter() - started, 3),
            )
        return saved

    def produce(self, state: StateAtH) -> None:
        """Serialise and produce one state record copied at H."""
        self.write(state[0], state[1], self.value(*state))

    def value(
        self,
        sensor: str,
        p: int,
        h: int,
        ring: dict[str, Any] | None,
        threshold: Threshold | None,
        alerts: dict[str, Any],
    ) -> bytes | None:
        """A sensor's state record for H = h, from its threshold (snapshot) and alerts.

        None (a tombstone) for an evicted sensor that was never scored: nothing to keep.
        """
        if threshold is None and ring is None:
            return None
        th = self.sensors.export(SensorState(sensor, threshold, alerts))
        return encode_record(sensor, p, h, ring, th, alerts)

    def tombstones(self, sensors: Iterable[tuple[str, int]]) -> None:
        """Clear the records of sensors whose kept state expired (sensor, partition)."""
        for sensor, p in sensors:
            self.producer.produce(self.topic, None, key=sensor, partition=p)

    def write(self, sensor: str, p: int, value: bytes | None) -> None:
        """Produce one state record (None: a tombstone) and count it."""
        self.producer.produce(self.topic, value, key=sensor, partition=p)
        self.counters.state_written += 1

    def give_back(self, checkpoints: list[Checkpoint], unsent: Iterable[StateAtH]) -> None:
        """An abandoned round's evictions and unsent sensors are for the next round."""
        self.table.give_back(checkpoints, unsent)

    def committed(self, heads: dict[int, int], offsets: dict[int, int]) -> None:
        """The coordinator accepted a commit of these partitions' H, at these offsets."""
        self.table.committed(heads, offsets)
