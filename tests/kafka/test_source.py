"""The consumer side against the real broker: ``read_latest`` and asynchronous commits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError

from streamer.config import KafkaConfig
from streamer.errors import KafkaError
from streamer.kafka.compacted import read_latest
from streamer.kafka.source import CommitResult, Source
from tests.conftest import NewTopicFactory


class TestReadLatest:
    def test_keeps_the_newest_value_per_key_as_compaction_would(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        """Every version is read and counted, the newest per key kept; tombstones stay."""
        topic = new_topic(partitions=3, config={"cleanup.policy": "compact"})
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for rnd in range(5):
            for k in range(40):
                producer.produce(topic, b"v%d-%d" % (k, rnd), key=b"k%d" % k, partition=k % 2)
        producer.produce(topic, None, key=b"k3", partition=1)  # a tombstone, after k3's values
        assert producer.flush(30) == 0

        latest, unfinished = read_latest(
            KafkaConfig(bootstrap_servers=kafka_bootstrap), topic, [0, 1, 2], stall_s=30
        )

        assert unfinished == []
        assert latest[0].records == 100 and latest[1].records == 101 and latest[2].records == 0
        assert latest[0].values == {b"k%d" % k: b"v%d-4" % k for k in range(0, 40, 2)}
        assert latest[1].values == {
            b"k%d" % k: (None if k == 3 else b"v%d-4" % k) for k in range(1, 40, 2)
        }
        assert latest[2].values == {}

    def test_a_long_read_that_advances_is_not_cut_short(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        """Far more records than fit in ``stall_s``: read to the end, progress reported.

        The bound used to be on the whole read: a state topic's uncompacted tail longer
        than it failed every restart alike.
        """
        topic = new_topic(partitions=1, config={"cleanup.policy": "compact"})
        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 50, "batch.size": 1_000_000}
        )
        n = 1_000_000  # about 6 s to read on 2 cores
        for i in range(n):
            while True:
                try:
                    producer.produce(topic, b"v%d" % i, key=b"k%d" % (i % 1000), partition=0)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(60) == 0
        progress: list[tuple[int, list[int]]] = []
        stall_s = 2.0  # a fetch can take a second to come back
        started = time.monotonic()
        latest, unfinished = read_latest(
            KafkaConfig(bootstrap_servers=kafka_bootstrap),
            topic,
            [0],
            stall_s=stall_s,
            on_progress=lambda records, left: progress.append((records, left)),
            progress_every_s=0.2,
        )
        elapsed = time.monotonic() - started
        assert elapsed > stall_s * 1.5, elapsed  # well past the stall bound
        assert unfinished == []
        assert latest[0].records == n
        assert latest[0].values[b"k999"] == b"v%d" % (n - 1)
        counts = [records for records, _ in progress]
        assert len(progress) >= 3 and counts == sorted(counts), progress[:5]
        assert progress[-1] == (n, [])


@pytest.fixture
def assigned(
    kafka_bootstrap: str, new_topic: NewTopicFactory, group_id: str
) -> Iterator[tuple[Source, str]]:
    """A Source in a fresh group, subscribed to a 2-partition topic holding 5 records each."""
    topic = new_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, b"m%d" % i, partition=i % 2)
    assert producer.flush(30) == 0
    assignments: list[list[int]] = []
    source = Source(
        KafkaConfig(bootstrap_servers=kafka_bootstrap, group_id=group_id),
        topic,
        on_assign=assignments.append,
        on_revoke=lambda _parts: None,
        on_lost=lambda _parts: None,
    )
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 10 and time.monotonic() < deadline:
        seen += len(source.consume(100, 0.5))
    assert seen == 10 and sorted(p for a in assignments for p in a) == [0, 1]
    try:
        yield source, topic
    finally:
        source.close()


def _answers(source: Source, timeout_s: float = 30) -> list[CommitResult]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        source.consume(100, 0.1)  # commit callbacks run in here
        got = source.commit_results()
        if got:
            return got
    raise AssertionError("no answer to the asynchronous commit")


class TestCommitAsync:
    def test_answer_comes_back_and_the_offsets_are_committed(
        self, assigned: tuple[Source, str]
    ) -> None:
        """The call returns at once; the answer names each partition's committed offset."""
        source, _topic = assigned
        assert source.commit_async({0: (3, "h0"), 1: (2, "h1")})
        (answer,) = _answers(source)
        assert answer == CommitResult(committed={0: 3, 1: 2}, deferred={})
        got = source.committed([0, 1])
        assert (got[0].offset, got[0].metadata) == (3, "h0")
        assert (got[1].offset, got[1].metadata) == (2, "h1")

    def test_answers_come_in_the_order_sent_and_synchronous_commits_give_none(
        self, assigned: tuple[Source, str]
    ) -> None:
        source, _topic = assigned
        assert source.commit({0: (1, "a")})
        assert source.commit_async({0: (2, "b")})
        assert source.commit_async({0: (4, "c")})
        answers = _answers(source)
        deadline = time.monotonic() + 30
        while len(answers) < 2 and time.monotonic() < deadline:
            answers += _answers(source)
        assert [a.committed for a in answers] == [{0: 2}, {0: 4}]
        assert source.committed([0])[0].offset == 4

    def test_passing_errors_are_deferred_and_others_raised_by_the_next_consume(
        self, assigned: tuple[Source, str]
    ) -> None:
        """The client's callback, fed librdkafka's own error objects."""
        source, topic = assigned
        rebalance = RdKafkaError(RdKafkaError.REBALANCE_IN_PROGRESS)
        source.on_commit(rebalance, [TopicPartition(topic, 0, 7), TopicPartition("other", 0, 1)])
        (answer,) = source.commit_results()
        assert answer.committed == {} and list(answer.deferred) == [0]
        assert "REBALANCE_IN_PROGRESS" in answer.deferred[0]

        denied = RdKafkaError(RdKafkaError.GROUP_AUTHORIZATION_FAILED)
        source.on_commit(denied, [TopicPartition(topic, 1, 7)])
        with pytest.raises(KafkaError, match=rf"commit of {topic}\[1\] failed:.*AUTHORIZATION"):
            source.consume(10, 0)


class TestFencedStaticMember:
    def test_fenced_once_it_rejoins_and_fenced_again_it_stops(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory, group_id: str
    ) -> None:
        """A static member fenced by a client with its instance id (as its own earlier
        registration fences it after an outage longer than its session) gets a new client
        and its partitions back, its old ones reported lost; fenced again at once, the
        error stands and names the instance id."""
        topic = new_topic(partitions=1)
        cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, group_id=group_id, instance_id="x1")
        assigned: list[list[int]] = []
        lost: list[list[int]] = []
        source = Source(cfg, topic, assigned.append, lambda _p: None, lost.append)

        def other() -> Consumer:
            c = Consumer(
                {
                    "bootstrap.servers": kafka_bootstrap,
                    "group.id": group_id,
                    "group.instance.id": "x1",
                    "session.timeout.ms": 6000,
                    "partition.assignment.strategy": "cooperative-sticky",
                }
            )
            c.subscribe([topic])
            return c

        def spin_until(done: Callable[[], bool], *others: Consumer) -> None:
            deadline = time.monotonic() + 60
            while not done() and time.monotonic() < deadline:
                source.consume(100, 0.1)
                for c in others:
                    c.poll(0.05)
            assert done(), (assigned, lost)

        intruders = []
        try:
            spin_until(lambda: assigned == [[0]])
            intruders.append(other())
            spin_until(lambda: len(assigned) == 2, intruders[0])
            assert lost == [[0]] and assigned[1] == [0]
            intruders.append(other())
            with pytest.raises(KafkaError, match="x1"):
                spin_until(lambda: False, intruders[1])
        finally:
            for c in intruders:
                with contextlib.suppress(Exception):
                    c.close()
            with contextlib.suppress(KafkaError):
                source.close()
