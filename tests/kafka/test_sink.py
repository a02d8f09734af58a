"""``Sink``: delivery marks on the real broker, and failures that stop a commit."""

from __future__ import annotations

import time

import pytest

from streamer.config import KafkaConfig
from streamer.errors import KafkaError
from streamer.kafka.sink import Sink
from tests.conftest import NewTopicFactory
from tests.helpers import consume_all


def _wait_acknowledged(sink: Sink, token: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not sink.acknowledged(token):
        assert time.monotonic() < deadline, f"mark {token} not acknowledged in {timeout_s}s"
        sink.poll(0.05)


class TestMarks:
    def test_a_mark_is_acknowledged_once_every_record_before_it_is(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic(partitions=3)
        sink = Sink(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        try:
            for i in range(2000):
                sink.produce(topic, b"%d" % i, key=f"k{i % 7}")
            token = sink.mark()
            # Reports are served only by poll/flush/a full queue, none of which ran yet.
            assert not sink.acknowledged(token)
            for i in range(2000, 2010):
                sink.produce(topic, b"%d" % i, key="later")
            _wait_acknowledged(sink, token)
            assert sink.delivered >= 2000
            later = sink.mark()
            assert later > token
            _wait_acknowledged(sink, later)
            assert sink.delivered == 2010
        finally:
            sink.close()
        values = {m.value() for m in consume_all(kafka_bootstrap, topic, expected=2010)}
        assert values == {b"%d" % i for i in range(2010)}

    def test_many_records_through_a_full_queue_are_all_delivered_in_order(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        """``produce_many`` waits for room like ``produce``: a burst ten times the client's
        queue arrives whole and in order, and the hook runs once, after the last record."""
        topic = new_topic(partitions=1)
        cfg = KafkaConfig(
            bootstrap_servers=kafka_bootstrap, client={"queue.buffering.max.messages": 100}
        )
        sink = Sink(cfg)
        hooked: list[int] = []
        try:
            values = [b"%d" % i for i in range(1000)]
            keys = [f"k{i % 7}" for i in range(1000)]
            sink.produce_many(
                topic, values, keys, on_last_delivered=lambda: hooked.append(sink.delivered)
            )
            assert sink.produced == 1000
            _wait_acknowledged(sink, sink.mark())
            assert sink.delivered == 1000
        finally:
            sink.close()
        assert len(hooked) == 1 and hooked[0] >= 999  # the last record's own report follows
        got = consume_all(kafka_bootstrap, topic, expected=1000)
        assert [m.value() for m in got] == values
        assert [m.key() for m in got] == [k.encode() for k in keys]

    def test_marks_with_nothing_produced_are_acknowledged_at_once(
        self, kafka_bootstrap: str
    ) -> None:
        sink = Sink(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        try:
            first = sink.mark()
            second = sink.mark()
            assert sink.acknowledged(first) and sink.acknowledged(second)
        finally:
            sink.close()

    def test_a_failed_record_raises_instead_of_acknowledging(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic()
        cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, client={"message.timeout.ms": 1500})
        sink = Sink(cfg)
        try:
            sink.produce(topic, b"fine")
            # The broker has no such topic and does not create topics: delivery fails.
            sink.produce(f"{topic}-missing", b"lost")
            token = sink.mark()
            with pytest.raises(KafkaError, match="missing"):
                _wait_acknowledged(sink, token)
        finally:
            sink.close(timeout_s=1.0)
