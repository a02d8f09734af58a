"""Fakes for the runtime's narrow Protocols, and a partition table over real stores.

No Kafka and no torch: the rings, thresholds and alerts are the real (torch-free)
stores, the producer and the consumer's commits are fakes that record what they saw
and deliver, refuse or fail on command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from streamer.codec import to_position
from streamer.config import StreamConfig
from streamer.errors import KafkaError
from streamer.metrics import Metrics
from streamer.runtime.checkpoint import Checkpointer
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.rounds import CommitRounds
from streamer.scoring.alerts import AlertBank
from streamer.scoring.thresholds import ThresholdBank, make_threshold
from streamer.sensors import SensorStore
from streamer.windows import RingWindows, SensorIndex

CHANNELS = ["a", "b"]
WINDOW, STRIDE = 4, 2
STATE_TOPIC = "state"


def new_store() -> SensorStore:
    """The engine's per-sensor stores, without the engine (and its inference worker)."""
    return SensorStore(
        SensorIndex(),
        RingWindows(len(CHANNELS), WINDOW, STRIDE, max_gap_s=300.0),
        ThresholdBank(make_threshold("fixed", value=1.0)),
        AlertBank(CHANNELS, 1, 1, 1, 1),
    )


class FakeProducer:
    """Records every record; ``acked`` marks are acknowledged; ``fail_flush`` raises."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, Any, int | None]] = []
        self.marks = 0
        self.acked = True
        self.fail_flush = False

    def produce(self, topic: str, value: bytes | None, key: Any = None, **kw: Any) -> None:
        self.records.append((topic, value, key, kw.get("partition")))

    def flush(self, timeout_s: float = 60.0) -> None:
        if self.fail_flush:
            raise KafkaError("1 record(s) not delivered: broker gone (injected)")

    def mark(self) -> int:
        self.marks += 1
        return self.marks

    def acknowledged(self, token: int) -> bool:
        return self.acked

    def state_keys(self) -> list[Any]:
        return [key for topic, _, key, _ in self.records if topic == STATE_TOPIC]


class FakeCommitter:
    """Records commits; ``refuse`` makes the next ones fail as during a rebalance."""

    def __init__(self) -> None:
        self.sync: list[dict[int, tuple[int, str]]] = []
        self.sent: list[dict[int, tuple[int, str]]] = []
        self.refuse = False

    def commit(self, offsets: dict[int, tuple[int, str]]) -> bool:
        if self.refuse:
            return False
        self.sync.append(offsets)
        return True

    def commit_async(self, offsets: dict[int, tuple[int, str]]) -> bool:
        if self.refuse:
            return False
        self.sent.append(offsets)
        return True


@dataclass
class Rig:
    """A partition table, its state writer and the commit rounds, over fakes."""

    stores: SensorStore
    table: PartitionTable
    producer: FakeProducer
    committer: FakeCommitter
    writer: Checkpointer
    rounds: CommitRounds
    counters: Counters

    def assign(self, *partitions: int) -> None:
        for p in partitions:
            self.table.parts[p] = Partition(partition=p)

    def consume(self, p: int, sensors: list[str], first_offset: int, ts: float = 0.0) -> int:
        """One sample per sensor at consecutive offsets of partition p; H moves past them."""
        keys = np.array(sensors, dtype=object)
        parts = np.full(len(sensors), p, dtype=np.int64)
        assert self.table.track(keys, parts) is None
        offsets = np.arange(first_offset, first_offset + len(sensors), dtype=np.int64)
        self.stores.windows.push(
            self.stores.index.slots(sensors),
            np.full(len(sensors), ts),
            np.zeros((len(sensors), len(CHANNELS)), dtype=np.float32),
            to_position(parts, offsets),
        )
        part = self.table.parts[p]
        part.consumed = max(part.consumed, int(offsets[-1]))
        return int(offsets[-1])

    def score(self, *sensors: str) -> None:
        """As a published batch does: the sensors' thresholds moved."""
        self.stores.thresholds.step(list(sensors), np.full(len(sensors), 0.5))
        self.table.changed(sensors)


@pytest.fixture
def rig() -> Rig:
    stores = new_store()
    counters = Counters()
    table = PartitionTable(stores, StreamConfig(channels=CHANNELS), Metrics(), counters)
    producer = FakeProducer()
    committer = FakeCommitter()
    writer = Checkpointer(table, stores, producer, STATE_TOPIC, counters)
    rounds = CommitRounds(producer, committer, writer, defer_max=1000)
    return Rig(stores, table, producer, committer, writer, rounds, counters)
