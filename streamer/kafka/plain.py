"""Plain Kafka clients for tools that play the plant and the subscriber (the demo, scripts).

The daemon's own clients are ``Source`` and ``Sink``. A tool that feeds samples in or
watches the output topics needs only an ordinary producer or consumer; these build
them here, so that confluent-kafka stays inside the Kafka layer.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

__all__ = ["plain_consumer", "plain_producer", "topic_names"]


def plain_producer(bootstrap: str, **conf: Any) -> Producer:
    """A producer to ``bootstrap`` with librdkafka's logging at errors only."""
    return Producer({"bootstrap.servers": bootstrap, "log_level": 3, **conf})


def plain_consumer(bootstrap: str, group: str, **conf: Any) -> Consumer:
    """A consumer in ``group`` that starts at the earliest offset and commits nothing."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **conf,
        }
    )


def topic_names(bootstrap: str, timeout_s: float = 5.0) -> set[str]:
    """The names of the cluster's topics."""
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s).topics)
