"""Helpers shared by the test suite: bounded waits, plain produce/consume against a broker,
and threshold state as older versions wrote it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
import structlog.testing
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamer.scoring.thresholds import unpack_floats

# The float array fields of the threshold state dicts.
THRESHOLD_ARRAYS = frozenset({"peaks", "ref", "window"})


def threshold_as_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A threshold state dict as version 1 wrote it: float arrays as lists of numbers."""
    assert state["version"] == 2, state
    out = {k: (unpack_floats(v).tolist() if k in THRESHOLD_ARRAYS else v) for k, v in state.items()}
    out["version"] = 1
    return out


def record_as_version_1(rec: dict[str, Any]) -> dict[str, Any]:
    """A state record as the first record version wrote it.

    Each part carries its own version (threshold 1: float arrays as lists; alerts 1),
    where a version 2 record's version stands for both.
    """
    assert rec["version"] == 2, rec
    out = {**rec, "version": 1}
    if rec["threshold"] is not None:
        out["threshold"] = threshold_as_version_1({**rec["threshold"], "version": 2})
    if rec["alerts"] is not None:
        out["alerts"] = {**rec["alerts"], "version": 1}
    return out


class Timeout:
    """A deadline for a polling loop, so no test can spin forever.

    ``while not timeout.expired: ...`` with ``timeout.remaining`` as the poll
    timeout keeps every wait bounded by one number stated up front.
    """

    __slots__ = ("_deadline", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self._deadline

    @property
    def remaining(self) -> float:
        """Seconds left before the deadline, never negative."""
        return max(0.0, self._deadline - time.monotonic())


def produce_json(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[str | bytes | None, bytes]],
    *,
    timeout_s: float = 30.0,
) -> None:
    """Produce ``(key, value)`` records in order and wait until every one is acknowledged.

    Raises AssertionError naming the first delivery error, or if acks are missing at
    the deadline, so a test never goes on with half its input written.
    """
    errors: list[str] = []

    def on_delivery(err: object, msg: Message) -> None:
        if err is not None:
            errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            # One request in flight keeps the order across retries without idempotence,
            # whose producer-id handshake costs 0.5-1s per producer on a fresh broker.
            "max.in.flight.requests.per.connection": 1,
            "linger.ms": 1,
        }
    )
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    remaining = producer.flush(timeout_s)
    assert not errors, f"delivery failed: {errors[0]} ({len(errors)} errors)"
    assert remaining == 0, (
        f"{remaining} of {len(records)} records unacknowledged after {timeout_s}s"
    )


def consume_all(
    bootstrap: str,
    topic: str,
    expected: int | None = None,
    timeout_s: float = 30.0,
) -> list[Message]:
    """Read every partition of ``topic`` from the beginning and return the messages.

    With ``expected`` set, stop as soon as that many arrived (or at the deadline, so
    the caller's assertion shows what did arrive). With ``expected=None``, read up
    to the end offsets seen at the start: everything already written. Partitions
    are assigned, not subscribed, so no consumer group joins or commits.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # Partitions join the fetch as their start offsets resolve; a short long-poll
            # keeps a late one from waiting out the default 500 ms.
            "fetch.wait.max.ms": 50,
        }
    )
    timeout = Timeout(timeout_s)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout.remaining)
        partitions = sorted(metadata.topics[topic].partitions)
        assert partitions, f"topic {topic} does not exist: {metadata.topics[topic].error}"
        end_offsets: dict[int, int] | None = None
        if expected is None:
            end_offsets = {
                p: consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout.remaining
                )[1]
                for p in partitions
            }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        at_end: set[int] = set()
        while not timeout.expired:
            if expected is not None and len(messages) >= expected:
                break
            if end_offsets is not None and at_end >= set(end_offsets):
                break
            msg = consumer.poll(min(timeout.remaining, 0.5))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    partition, offset = msg.partition(), msg.offset()
                    if (
                        end_offsets is not None
                        and partition is not None
                        and offset is not None
                        and offset >= end_offsets[partition]
                    ):
                        at_end.add(partition)
                    continue
                raise KafkaException(err)
            messages.append(msg)
        return messages
    finally:
        consumer.close()


class CapturedLog:
    """A structlog logger that keeps its events in memory, whatever the global configuration.

    Hand ``logger`` to the code under test: other tests may have configured structlog
    (and cached its loggers) for JSON on stdout, which ``structlog.testing.capture_logs``
    cannot intercept.
    """

    def __init__(self) -> None:
        self._sink = structlog.testing.CapturingLogger()
        self.logger: Any = structlog.wrap_logger(
            self._sink,
            processors=[],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every event so far (or those named ``name``), each with its ``level``."""
        out = [{"level": c.method_name, **c.kwargs} for c in list(self._sink.calls)]
        return [e for e in out if name is None or e["event"] == name]

    def wait_for(self, name: str, timeout: Timeout, count: int = 1) -> list[dict[str, Any]]:
        """The events named ``name``, once ``count`` are there (AssertionError at the deadline)."""
        while not timeout.expired:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"{count} x {name} not logged within {timeout.timeout_s}s: {self.events()}"
        )
