"""Recovery on assignment: a partition's state is read back before any of its messages.

For each newly assigned partition: its commit (offset and H, from the metadata), the
latest state record of each of its sensors from the compacted state topic, and from
them thresholds, alerts and ring anchors in the engine's stores, and the replay marks
(``restored_h``, per-sensor ``upto``) that keep windows published before from being
published again.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping

import structlog

from streamer.config import KafkaConfig
from streamer.errors import KafkaError, StateError
from streamer.kafka.compacted import LatestRecords, read_latest
from streamer.kafka.source import Committed
from streamer.metrics import Health
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.state import commit_head
from streamer.sensors import parse_record

__all__ = ["Recovery"]

log = structlog.get_logger("streamer.daemon")

# A long state restore says how far it got this often.
_RESTORE_LOG_S = 5.0


class Recovery:
    """Restores assigned partitions into the partition table and the engine's stores."""

    def __init__(
        self,
        kafka: KafkaConfig,
        state_topic: str,
        table: PartitionTable,
        health: Health,
        counters: Counters,
    ) -> None:
        self.kafka = kafka
        self.topic = state_topic
        self.table = table
        self.health = health
        self.counters = counters

    def assign(self, partitions: list[int], committed: Mapping[int, Committed]) -> None:
        """Read the partitions' state and restore it; KafkaError if the read stalls."""
        started = time.monotonic()
        stall_s = self.kafka.restore_timeout_s
        try:
            state, unfinished = read_latest(
                self.kafka,
                self.topic,
                partitions,
                stall_s,
                on_progress=self._progress(partitions, started),
            )
        finally:
            self.health.restoring = None
        if unfinished:
            raise KafkaError(
                f"restoring {self.topic} partitions {unfinished} made no progress for "
                f"{stall_s}s (kafka.restore_timeout_s)"
            )
        # A restore makes only long-lived objects (each sensor's state): the collections
        # their allocations would trigger free nothing, and at 100,000 sensors cost seconds.
        # The daemon's heap settle afterwards walks them once instead.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for p in partitions:
                c = committed.get(p)
                start = c.offset if c is not None and c.offset >= 0 else 0
                h = commit_head(c.metadata if c is not None else None, c.offset if c else -1)
                part = Partition(
                    partition=p,
                    committed_h=h,
                    committed_offset=c.offset if c is not None else -1,
                    restored_h=h,
                    replay_until=h,
                )
                self.table.parts[p] = part
                self._restore(part, start, state[p], started)
        finally:
            if collecting:
                gc.enable()

    def _progress(self, partitions: list[int], started: float) -> Callable[[int, list[int]], None]:
        """What a state restore does while it reads: heartbeat, /readyz, a line every 5 s.

        A restore runs inside the loop's consume call. While it advances the loop counts as
        alive (a long uncompacted state tail must not trip the watchdog and kill a daemon
        that would finish), and /readyz says what it is doing.
        """
        logged = [started]

        def progress(records: int, unfinished: list[int]) -> None:
            now = time.monotonic()
            self.health.beat()
            self.health.restoring = (
                f"{self.topic} {partitions}: {records:,} records read in {now - started:.0f} s"
            )
            if unfinished and now - logged[0] >= _RESTORE_LOG_S:
                logged[0] = now
                log.info(
                    "state_restore_progress",
                    partitions=partitions,
                    unfinished=unfinished,
                    records=records,
                    seconds=round(now - started, 1),
                )

        return progress

    def _restore(self, part: Partition, start: int, latest: LatestRecords, started: float) -> None:
        """Restore every sensor of the partition from its latest state record."""
        p = part.partition
        restored = corrupt = anchors = 0
        values = latest.values
        anchor_offset = self.table.anchor_offset
        for key in list(values):
            # Taken out as it is applied: each record's bytes are freed once restored.
            value = values.pop(key)
            if value is None:
                continue
            try:
                rec = parse_record(key, value, p)
                self.table.apply(part, rec, start)
            except StateError as exc:
                corrupt += 1
                self.counters.state_corrupt += 1
                log.warning(
                    "state_corrupt",
                    partition=p,
                    sensor=key.decode(errors="replace")[:256],
                    error=str(exc),
                )
                continue
            restored += 1
            anchors += rec.sensor in anchor_offset
        log.info(
            "state_restored",
            partition=p,
            sensors=restored,
            corrupt=corrupt,
            stale_thresholds=part.stale,
            anchors=anchors,
            records=latest.records,
            start_offset=start,
            committed_h=part.restored_h,
            replay_until=part.replay_until,
            seconds=round(time.monotonic() - started, 3),
        )
