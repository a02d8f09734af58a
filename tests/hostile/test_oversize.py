"""Messages too large for the dead-letter topic: kept as a prefix, never a reason to stop.

Rows 1 and 2 of the hostile-input table: a 2 MB message on an input topic that
allows it, with the DLQ topic at the default limit; a 200 KB message with the DLQ
topic at 100 KB. Both used to kill the daemon (the first also committing offsets it
had not processed). Now each lands in the DLQ, cut, with its original size and
SHA-256, and every valid window around it is published.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamer.config import KafkaConfig
from streamer.deadletter import dead_letter_record
from streamer.errors import KafkaError
from streamer.kafka.sink import Sink
from tests.conftest import NewTopicFactory
from tests.helpers import consume_all
from tests.hostile.conftest import ScoreAll
from tests.integration.helpers import (
    Sample,
    Topics,
    plant_samples,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4


def _big_produce(bootstrap: str, topic: str, samples: list[Sample]) -> None:
    """Produce with a producer that allows records up to 4 MB (the test's own client)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 4_200_000, "linger.ms": 5}
    )
    errors: list[str] = []

    def report(sample: Sample):  # type: ignore[no-untyped-def]
        def cb(err, msg):  # type: ignore[no-untyped-def]
            if err is not None:
                errors.append(str(err))
            else:
                sample.partition, sample.offset = msg.partition(), msg.offset()

        return cb

    for s in samples:
        producer.produce(topic, key=s.key, value=s.value, on_delivery=report(s))
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors[:3]


class TestShrinkingSink:
    """``Sink.produce(shrink=...)``: a record the broker refuses for its size is resized."""

    def test_broker_refusal_is_produced_again_smaller(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic(1, config={"max.message.bytes": "20000"})
        value = random.Random(0).randbytes(100_000)  # nothing for lz4 to compress away
        # No max_batch_bytes: the producer does not know the topic's limit, the broker refuses.
        sink = Sink(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        sizes: list[int] = []

        def shrink(refusals: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
            r = dead_letter_record(
                value,
                b"k",
                kind="oversized",
                reason="test",
                topic="in",
                partition=0,
                offset=7,
                max_value_bytes=len(value) >> refusals,
            )
            sizes.append(len(r.value or b""))
            return r.value or b"", r.key or b"", r.headers

        try:
            sink.produce(topic, value, key=b"k", shrink=shrink)
            sink.produce(topic, b"small", key=b"k")
            sink.flush(30)
        finally:
            sink.close()
        assert sizes and sizes[-1] <= 20000, sizes
        assert sink.resent >= len(sizes)  # with the small neighbour, refused with its batch
        got = consume_all(kafka_bootstrap, topic, expected=2)
        assert len(got) == 2
        headers = dict(got[0].headers() or [])
        assert headers["error.truncated"] == b"true"
        assert headers["original.size"] == str(len(value)).encode()
        assert headers["original.sha256"] == hashlib.sha256(value).hexdigest().encode()
        assert value.startswith(got[0].value() or b"x")
        assert got[1].value() == b"small"

    def test_without_shrink_a_refusal_still_fails(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic(1, config={"max.message.bytes": "20000"})
        sink = Sink(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        try:
            sink.produce(topic, random.Random(1).randbytes(100_000), key=b"k")
            with pytest.raises(KafkaError, match=r"too large"):
                sink.flush(30)
        finally:
            sink.close()


# (input limit, DLQ limit or None for the broker default, size of the bad message)
CASES = [
    ("2MB_default_dlq", "3145728", None, 2_000_000),
    ("200KB_100KB_dlq", None, "102400", 200_000),
]


@pytest.mark.parametrize(
    ("input_limit", "dlq_limit", "size"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_oversized_message_is_dead_lettered_cut_and_nothing_lost(
    input_limit: str | None,
    dlq_limit: str | None,
    size: int,
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    score_all: ScoreAll,
) -> None:
    topics = Topics(
        input=new_topic(1, config={"max.message.bytes": input_limit} if input_limit else None),
        scores=new_topic(1),
        alerts=new_topic(1),
        dlq=new_topic(1, config={"max.message.bytes": dlq_limit} if dlq_limit else None),
        state=new_topic(1, config={"cleanup.policy": "compact"}),
        partitions=1,
    )
    good = plant_samples(2, 100, seed=4)
    # A JSON object padded to `size` bytes: "oversized" against stream.max_message_bytes.
    padding = b"x" * (size - 40)
    big_value = b'{"sensor": "sensor-0", "pad": "' + padding + b'"}'
    big = Sample("sensor-0", b"sensor-0", big_value, False, "oversized")
    samples = [*good[:100], big, *good[100:]]
    _big_produce(kafka_bootstrap, topics.input, samples)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    daemon = score_all(cfg, topics, samples)
    dead = consume_all(kafka_bootstrap, topics.dlq, expected=1, timeout_s=30)
    assert len(dead) == 1, daemon.tail()
    headers = dict(dead[0].headers() or [])
    assert headers["error.kind"] == b"oversized"
    assert headers["error.truncated"] == b"true"
    assert headers["original.size"] == str(len(big_value)).encode()
    assert headers["original.sha256"] == hashlib.sha256(big_value).hexdigest().encode()
    assert headers["source.offset"] == str(big.offset).encode()
    kept = dead[0].value() or b""
    assert 0 < len(kept) < len(big_value) and big_value.startswith(kept)
    truncated = daemon.seen("dead_letter_truncated")
    assert truncated and truncated[0]["size"] == len(big_value), daemon.tail()
    # Still running: a few seconds more, then a clean stop.
    time.sleep(2)
    assert daemon.proc.poll() is None, daemon.tail()
    assert daemon.stop() == 0, daemon.tail()
