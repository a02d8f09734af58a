"""``read_latest``: a compacted topic's live records, read from the real broker."""

from __future__ import annotations

from confluent_kafka import Producer

from streamer.config import KafkaConfig
from streamer.kafka.source import read_latest
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
            KafkaConfig(bootstrap_servers=kafka_bootstrap), topic, [0, 1, 2], timeout_s=30
        )

        assert unfinished == []
        assert latest[0].records == 100 and latest[1].records == 101 and latest[2].records == 0
        assert latest[0].values == {b"k%d" % k: b"v%d-4" % k for k in range(0, 40, 2)}
        assert latest[1].values == {
            b"k%d" % k: (None if k == 3 else b"v%d-4" % k) for k in range(1, 40, 2)
        }
        assert latest[2].values == {}
