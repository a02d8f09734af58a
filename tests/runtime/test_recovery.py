"""Recovery over a stand-in state read: partitions restore a slice at a time, or fail loudly.

The state topic's reader (``read_latest``, tested against the broker in
tests/kafka) is replaced by one that returns prepared records when told to; the
partition table and stores are the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamer.config import KafkaConfig, StreamConfig
from streamer.errors import KafkaError
from streamer.kafka.compacted import LatestRecords
from streamer.kafka.source import Committed
from streamer.metrics import Health, Metrics
from streamer.runtime import recovery as recovery_module
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.recovery import Recovery
from streamer.sensors import encode_record
from tests.runtime.conftest import CHANNELS, new_store


class StandInRead:
    """``read_latest`` as the recovery calls it: waits for ``go``, then answers."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.unfinished: list[int] = []
        self.error: BaseException | None = None
        self.records: dict[int, dict[bytes, bytes | None]] = {}
        self.stopped = threading.Event()

    def __call__(
        self, _cfg: Any, _topic: str, partitions: list[int], _stall: float, **kw: Any
    ) -> tuple[dict[int, LatestRecords], list[int]]:
        stop: threading.Event = kw["stop"]
        while not self.go.wait(0.01):
            if stop.is_set():
                self.stopped.set()
                return {}, list(partitions)
        if self.error is not None:
            raise self.error
        out = {}
        for p in partitions:
            values = dict(self.records.get(p, {}))
            out[p] = LatestRecords(values, len(values))
        kw["on_progress"](sum(r.records for r in out.values()), self.unfinished)
        return out, self.unfinished


@pytest.fixture
def read(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInRead]:
    stand_in = StandInRead()
    monkeypatch.setattr(recovery_module, "read_latest", stand_in)
    yield stand_in
    stand_in.go.set()


def recovery(serving: bool = True) -> tuple[Recovery, PartitionTable, Health, Metrics]:
    """A recovery over a fresh table; ``serving``: the table serves partition 9 meanwhile."""
    stores = new_store()
    metrics, health = Metrics(), Health(30.0)
    table = PartitionTable(stores, StreamConfig(channels=CHANNELS), metrics, Counters())
    if serving:
        table.parts[9] = Partition(partition=9)
    kafka = KafkaConfig(restore_timeout_s=5.0)
    return Recovery(kafka, "state", table, health, Counters(), metrics), table, health, metrics


def record(sensor: str, partition: int, anchor: int) -> bytes:
    alerts = new_store().alerts.export(sensor)
    ring = {"anchor_offset": anchor, "anchor_count": 1}
    return encode_record(sensor, partition, 40, ring, None, alerts)


def committed(*partitions: int) -> dict[int, Committed]:
    return {p: Committed(p, 30, '{"v": 1, "h": 40}') for p in partitions}


def until_ready(rec: Recovery, budget_s: float) -> tuple[list[tuple[int, int]], int]:
    """Step until nothing is pending; the partitions handed back and the steps it took."""
    ready: list[tuple[int, int]] = []
    steps = 0
    deadline = time.monotonic() + 10
    while rec.reads and not rec.installing and time.monotonic() < deadline:
        time.sleep(0.001)  # the reading thread: not a step of the loop's
    while rec.pending:
        ready += rec.step(budget_s)
        steps += 1
        assert steps < 10_000
    return ready, steps


def test_partitions_restore_a_slice_at_a_time_then_are_handed_back(read: StandInRead) -> None:
    rec, table, health, metrics = recovery()
    read.records = {0: {f"s{i}".encode(): record(f"s{i}", 0, 35) for i in range(300)}}
    rec.begin([0, 1], committed(0, 1))
    assert rec.pending == [0, 1] and health.restoring is not None
    assert rec.step() == [] and 0 not in table.parts  # still reading
    assert metrics.partitions_restoring._value.get() == 2
    read.go.set()
    ready, steps = until_ready(rec, budget_s=1e-6)
    assert sorted(ready) == [(0, 30), (1, 30)]
    # A budget too short for more than a slice: many steps, the loop ran between them.
    assert steps >= 300 // 32
    part = table.parts[0]
    assert not part.restoring and part.restored_h == 40 and len(part.sensors) == 300
    assert table.anchor_offset["s7"] == 35
    assert health.restoring is None and metrics.partitions_restoring._value.get() == 0


def test_a_start_installs_in_long_slices(read: StandInRead) -> None:
    """Nothing served meanwhile: no slicing that would only hold up the later partitions."""
    rec, _, _, _ = recovery(serving=False)
    read.records = {
        p: {f"s{p}-{i}".encode(): record(f"s{p}-{i}", p, 35) for i in range(300)} for p in (0, 1)
    }
    rec.begin([0, 1], committed(0, 1))
    read.go.set()
    ready, steps = until_ready(rec, budget_s=1e-6)
    assert sorted(ready) == [(0, 30), (1, 30)] and steps <= 2


def test_a_partition_is_not_served_while_it_restores(read: StandInRead) -> None:
    rec, table, _, _ = recovery()
    read.records = {0: {f"s{i}".encode(): record(f"s{i}", 0, 35) for i in range(200)}}
    rec.begin([0], committed(0))
    read.go.set()
    while 0 not in table.parts:
        assert rec.step(1e-6) == []
    assert table.parts[0].restoring and table.serving() == [9]
    table.parts[0].consumed = 99
    assert table.snapshot(0) is None  # no round commits it
    until_ready(rec, 1.0)
    assert table.serving() == [9, 0] and table.snapshot(0) is not None


def test_a_stalled_read_fails_the_loop_with_the_setting_named(read: StandInRead) -> None:
    rec, _, _, _ = recovery()
    read.unfinished = [3]
    rec.begin([3], committed(3))
    read.go.set()
    with pytest.raises(KafkaError, match=r"partitions \[3\] made no progress for 5.0s"):
        until_ready(rec, 1.0)


def test_a_failed_read_fails_the_loop(read: StandInRead) -> None:
    rec, _, _, _ = recovery()
    read.error = KafkaError("reading state[0] failed: broker gone")
    rec.begin([0], committed(0))
    read.go.set()
    with pytest.raises(KafkaError, match="broker gone"):
        until_ready(rec, 1.0)


def test_a_partition_revoked_while_reading_stops_its_read(read: StandInRead) -> None:
    rec, table, health, _ = recovery()
    rec.begin([2], committed(2))
    rec.cancel([2])
    assert rec.pending == [] and health.restoring is None
    assert read.stopped.wait(5)
    assert rec.step() == [] and list(table.parts) == [9]


def test_a_partition_revoked_while_installing_is_left_to_drop(read: StandInRead) -> None:
    rec, table, _, _ = recovery()
    read.records = {0: {f"s{i}".encode(): record(f"s{i}", 0, 35) for i in range(200)}}
    rec.begin([0, 1], committed(0, 1))
    read.go.set()
    while 0 not in table.parts:
        rec.step(1e-6)
    rec.cancel([0])
    ready, _ = until_ready(rec, 1.0)
    assert ready == [(1, 30)]
    assert table.parts[0].restoring  # half installed: the daemon's revocation drops it
    table.drop([0])
    assert not any(s.startswith("s") for s in table.sensor_part)
