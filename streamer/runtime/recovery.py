"""Recovery on assignment: a partition's state is read back before any of its messages.

For each newly assigned partition: its commit (offset and H, from the metadata), the
latest state record of each of its sensors from the compacted state topic, and from
them thresholds, alerts and ring anchors in the engine's stores, and the replay marks
(``restored_h``, per-sensor ``upto``) that keep windows published before from being
published again.

A restore does not stop the partitions the daemon already holds. The daemon pauses a
newly assigned partition in the consumer and ``begin`` reads its state on a thread of
its own (a reader that joins no group). The loop calls ``step`` once per iteration: once
a read is done, it installs the records a slice at a time (a few milliseconds of the
loop's time per iteration), and hands back each partition whose state is in place, for
the daemon to resume. Until then the partition is in the table marked ``restoring``:
no message of it is processed and no round commits it. A partition a clean stop on this
host left a snapshot of (``runtime.snapshot``), with nothing changed since, is read from
that file instead of the topic.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from streamer.config import KafkaConfig
from streamer.errors import KafkaError, StateError
from streamer.kafka.compacted import LatestRecords, read_latest
from streamer.kafka.source import Committed
from streamer.metrics import Health, Metrics
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.snapshot import read_snapshot, snapshot_path
from streamer.runtime.state import commit_head
from streamer.sensors import parse_record

__all__ = ["Recovery"]

log = structlog.get_logger("streamer.daemon")

# A long state restore says how far it got this often.
_RESTORE_LOG_S = 5.0
# Loop time a restore may take per iteration to install records, by default: the
# partitions already held are scored between slices (60-100 us a record: ~100 a slice).
_SLICE_S = 0.008
# The same for a restore with nothing else to serve meanwhile (a start).
_ALONE_S = 0.5


class _Read:
    """One assignment's state read, on a thread of its own."""

    def __init__(
        self, partitions: list[int], committed: Mapping[int, Committed], alone: bool
    ) -> None:
        self.partitions = partitions
        self.committed = dict(committed)
        # The H each commit was made at (its metadata), for the snapshot check and install.
        self.heads = {p: commit_head(c.metadata, c.offset) for p, c in self.committed.items()}
        # No partition was served when it began (a start): nothing waits on its installs.
        self.alone = alone
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.records = 0
        self.state: dict[int, LatestRecords] = {}
        self.unfinished: list[int] = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class _Install:
    """Installing one partition's latest records into the table, a slice at a time."""

    def __init__(
        self, part: Partition, start: int, latest: LatestRecords, started: float, alone: bool
    ) -> None:
        self.part = part
        self.start = start
        self.latest = latest
        self.started = started
        self.alone = alone
        self.restored = self.corrupt = self.anchors = 0


class Recovery:
    """Restores assigned partitions into the partition table and the engine's stores."""

    def __init__(
        self,
        kafka: KafkaConfig,
        state_topic: str,
        table: PartitionTable,
        health: Health,
        counters: Counters,
        metrics: Metrics | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = state_topic
        self.table = table
        self.health = health
        self.counters = counters
        self.metrics = metrics
        # Where clean stops leave each partition's state (None: not used).
        self.snapshot_dir = snapshot_dir
        self.reads: list[_Read] = []
        self.installs: deque[_Install] = deque()

    @property
    def installing(self) -> bool:
        """Whether records are read and waiting to be installed (the loop should not idle)."""
        return bool(self.installs) or any(r.done.is_set() for r in self.reads)

    @property
    def pending(self) -> list[int]:
        """Partitions assigned whose state is not in place yet."""
        out = [p for r in self.reads for p in r.partitions]
        return sorted(out + [i.part.partition for i in self.installs])

    # -- reading ---------------------------------------------------------------------------

    def begin(self, partitions: list[int], committed: Mapping[int, Committed]) -> None:
        """Start reading the partitions' state (the daemon has paused them)."""
        read = _Read(list(partitions), committed, alone=not self.table.serving())
        read.thread = threading.Thread(
            target=self._read, args=(read,), name="state-restore", daemon=True
        )
        self.reads.append(read)
        read.thread.start()
        self._show()

    def _read(self, read: _Read) -> None:
        """The reading thread: every partition's latest records, or the error that stopped it."""
        try:
            read.state, read.unfinished = read_latest(
                self.kafka,
                self.topic,
                read.partitions,
                self.kafka.restore_timeout_s,
                on_progress=self._progress(read),
                stop=read.stop,
                known=self._snapshots(read),
            )
        except BaseException as exc:  # handed to the loop, which fails with it
            read.error = exc
        finally:
            read.done.set()

    def _snapshots(self, read: _Read) -> dict[int, tuple[int, dict[bytes, bytes]]]:
        """The local snapshots (``runtime.snapshot``) written at the commit each partition has.

        Each file is removed once read: the state moves on from here without it.
        """
        if self.snapshot_dir is None:
            return {}
        known = {}
        group = self.kafka.group_id
        for p in read.partitions:
            path = snapshot_path(self.snapshot_dir, group, self.topic, p)
            snap = read_snapshot(path, group=group, state_topic=self.topic, partition=p)
            path.unlink(missing_ok=True)
            if snap is None:
                continue
            h = read.heads.get(p, -1)
            if snap.h != h:
                log.info("state_snapshot_stale", partition=p, snapshot_h=snap.h, committed_h=h)
                continue
            known[p] = (snap.state_end, snap.values)
        return known

    def _progress(self, read: _Read) -> Callable[[int, list[int]], None]:
        """What a read does as it goes: counts (for /readyz and metrics), a line every 5 s.

        Runs on the reading thread: it only sets plain attributes and logs.
        """
        logged = [read.started]

        def progress(records: int, unfinished: list[int]) -> None:
            now = time.monotonic()
            read.records = records
            if unfinished and now - logged[0] >= _RESTORE_LOG_S:
                logged[0] = now
                log.info(
                    "state_restore_progress",
                    partitions=read.partitions,
                    unfinished=unfinished,
                    records=records,
                    seconds=round(now - read.started, 1),
                )

        return progress

    # -- installing, from the loop ---------------------------------------------------------

    def step(self, budget_s: float = _SLICE_S) -> list[tuple[int, int]]:
        """Install what finished reads brought, for about ``budget_s`` of loop time.

        A restore that began with no partition served (a start) takes ``_ALONE_S`` slices
        instead: the partitions it resumes first would otherwise hold up the rest.
        Returns (partition, offset) for each partition whose state is now in place: the
        daemon resumes it from that offset (its commit). KafkaError if a read failed or
        stalled for ``kafka.restore_timeout_s``.
        """
        if not self.reads and not self.installs:
            return []
        for read in [r for r in self.reads if r.done.is_set()]:
            self.reads.remove(read)
            self._finished(read)
        ready = []
        if self.installs:
            alone = self.installs[0].alone
            deadline = time.perf_counter() + (max(budget_s, _ALONE_S) if alone else budget_s)
            # A restore makes only long-lived objects (each sensor's state): collections
            # their allocations trigger free nothing, and at 100,000 sensors cost seconds.
            collecting = gc.isenabled()
            gc.disable()
            try:
                # At least one slice per call, however short the budget.
                while self.installs:
                    job = self.installs[0]
                    if self._install(job, deadline):
                        self.installs.popleft()
                        job.part.restoring = False
                        self._restored(job)
                        ready.append((job.part.partition, job.start))
                    if time.perf_counter() >= deadline:
                        break
            finally:
                if collecting:
                    gc.enable()
        self._show()
        return ready

    def _finished(self, read: _Read) -> None:
        """A read is done: fail on its error, else queue its partitions for installing."""
        if read.error is not None:
            if isinstance(read.error, KafkaError):
                raise read.error
            raise KafkaError(f"restoring {self.topic} failed: {read.error}") from read.error
        if read.unfinished:
            raise KafkaError(
                f"restoring {self.topic} partitions {read.unfinished} made no progress for "
                f"{self.kafka.restore_timeout_s}s (kafka.restore_timeout_s)"
            )
        for p in read.partitions:
            c = read.committed.get(p)
            start = c.offset if c is not None and c.offset >= 0 else 0
            h = read.heads.get(p, -1)
            part = Partition(
                partition=p,
                committed_h=h,
                committed_offset=c.offset if c is not None else -1,
                restored_h=h,
                replay_until=h,
                restoring=True,
            )
            self.table.parts[p] = part
            latest = read.state.get(p, LatestRecords())
            self.installs.append(_Install(part, start, latest, read.started, read.alone))

    def _install(self, job: _Install, deadline: float) -> bool:
        """Install records of one partition until ``deadline``; True once all are in."""
        part, values = job.part, job.latest.values
        p, table = part.partition, self.table
        n = 0
        while values:
            # Taken out as it is applied: each record's bytes are freed once restored.
            key, value = values.popitem()
            n += 1
            if value is not None:
                try:
                    rec = parse_record(key, value, p)
                    table.apply(part, rec, job.start)
                except StateError as exc:
                    job.corrupt += 1
                    self.counters.state_corrupt += 1
                    log.warning(
                        "state_corrupt",
                        partition=p,
                        sensor=key.decode(errors="replace")[:256],
                        error=str(exc),
                    )
                else:
                    job.restored += 1
                    job.anchors += rec.sensor in table.anchor_offset
            if n % 32 == 0 and time.perf_counter() >= deadline:
                return not values
        return True

    def _restored(self, job: _Install) -> None:
        part = job.part
        log.info(
            "state_restored",
            partition=part.partition,
            sensors=job.restored,
            corrupt=job.corrupt,
            stale_thresholds=part.stale,
            anchors=job.anchors,
            parked=sum(1 for s in part.sensors if s in self.table.parked),
            records=job.latest.records,
            from_snapshot=job.latest.known,
            start_offset=job.start,
            committed_h=part.restored_h,
            replay_until=part.replay_until,
            seconds=round(time.monotonic() - job.started, 3),
        )

    # -- revocation and shutdown -----------------------------------------------------------

    def cancel(self, partitions: list[int]) -> None:
        """These partitions left before their state was in place: stop restoring them.

        What was installed already stays in the table for the daemon to drop with them.
        """
        gone = set(partitions)
        for read in list(self.reads):
            read.partitions = [p for p in read.partitions if p not in gone]
            if not read.partitions:
                read.stop.set()
                self.reads.remove(read)
        self.installs = deque(i for i in self.installs if i.part.partition not in gone)
        self._show()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every read in flight and wait for its thread (shutdown)."""
        for read in self.reads:
            read.stop.set()
        for read in self.reads:
            if read.thread is not None:
                read.thread.join(timeout_s)
        self.reads.clear()
        self.installs.clear()
        self._show()

    def _show(self) -> None:
        """/readyz and the metrics say what is being restored, and how far it got."""
        records = sum(r.records for r in self.reads)
        installing = sum(len(i.latest.values) for i in self.installs)
        pending = self.pending
        if pending:
            since = min([r.started for r in self.reads] + [i.started for i in self.installs])
            self.health.restoring = (
                f"{self.topic} {pending}: {records:,} records read in "
                f"{time.monotonic() - since:.0f} s, {installing:,} to install"
            )
        else:
            self.health.restoring = None
        if self.metrics is not None:
            self.metrics.partitions_restoring.set(len(pending))
            self.metrics.state_restore_records.set(records)
