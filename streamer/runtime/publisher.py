"""Publishing: scored batches as score and alert records, in order; bad input as dead letters.

The publisher holds the batches queued for inference (oldest first) and publishes
each once its scores are in and every older one is published, so records of a
sensor leave in window order and a commit round's barrier is a count of batches.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from streamer.codec import DeadLetter
from streamer.config import TopicsConfig
from streamer.deadletter import dead_letter_record
from streamer.encoders import encode_alert, encode_scores
from streamer.metrics import Metrics
from streamer.runtime.counters import Counters

if TYPE_CHECKING:  # the engine imports torch; the publisher only passes its batches on
    from streamer.engine import PendingBatch, ScoredBatch

__all__ = ["Publisher", "RecordProducer"]

log = structlog.get_logger("streamer.daemon")

# A dead letter refused for its size this many times (its value halved each time) fails.
_DEAD_LETTER_RESIZES = 24

Shrunk = tuple[bytes | None, bytes | None, list[Any]]


class RecordProducer(Protocol):
    """The producer, as the publisher sees it (``kafka.sink.Sink``)."""

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = ...,
        headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None = ...,
        partition: int | None = ...,
        on_delivered: Callable[[], None] | None = ...,
        shrink: Callable[[int], Shrunk | None] | None = ...,
    ) -> None:
        """Queue one record."""

    def produce_many(
        self,
        topic: str,
        values: Sequence[bytes],
        keys: Sequence[str],
        on_last_delivered: Callable[[], None] | None = ...,
    ) -> None:
        """Queue records in order, hooking ``on_last_delivered`` on the last one."""


class Publisher:
    """Publishes scored batches in order and dead letters at once.

    ``complete`` waits for a batch's scores and decides thresholds and alerts (the
    engine's ``complete``); ``on_published`` is told of each batch published (a commit
    round's barrier); ``on_scored`` of the sensors whose state each batch moved.
    """

    def __init__(
        self,
        producer: RecordProducer,
        topics: TopicsConfig,
        channels: list[str],
        metrics: Metrics,
        counters: Counters,
        *,
        complete: Callable[[PendingBatch], ScoredBatch],
        on_published: Callable[[], None],
        on_scored: Callable[[Iterable[str]], None],
        dead_letter_value_bytes: int,
    ) -> None:
        self.producer = producer
        self.topics = topics
        self.channels = channels
        self.metrics = metrics
        self.counters = counters
        self.complete = complete
        self.on_published = on_published
        self.on_scored = on_scored
        # Bytes of a message's value a dead letter keeps (set from the topic limits).
        self.dead_letter_value_bytes = dead_letter_value_bytes
        self.pending: deque[PendingBatch] = deque()

    def queue(self, batches: Iterable[PendingBatch]) -> None:
        """Batches submitted for inference, to be published in this order."""
        self.pending.extend(batches)

    def publish_done(self, block_s: float) -> None:
        """Publish scored batches in order; wait up to ``block_s`` for the oldest one."""
        pending = self.pending
        if pending and block_s > 0 and not pending[0].future.done():
            try:
                pending[0].future.result(timeout=block_s)
            except TimeoutError:
                return
        while pending and pending[0].future.done():
            self._publish_next()

    def drain(self) -> None:
        """Wait for and publish every queued batch."""
        while self.pending:
            self._publish_next()

    def _publish_next(self) -> None:
        """Complete and publish the oldest queued batch (waiting for its scores)."""
        self.publish(self.complete(self.pending.popleft()))
        self.on_published()

    def publish(self, b: ScoredBatch) -> None:
        """A batch's score records and alert events."""
        n = len(b)
        if n == 0:
            return
        topic_out = self.topics.scores
        produce = self.producer.produce
        sensors = [str(s) for s in b.sensors]
        records = encode_scores(self.topics.input, b, self.channels)
        end_ts = b.windows.end_ts
        e2e = self.metrics.end_to_end

        def delivered() -> None:
            # Hooked on the batch's last score only: its records leave in the same producer
            # batches, so one acknowledgement times them all, at one callback per batch.
            e2e.observe(np.maximum(time.time() - end_ts, 0.0))

        self.producer.produce_many(topic_out, records, sensors, on_last_delivered=delivered)
        for ev in b.events:
            produce(self.topics.alerts, encode_alert(ev), key=ev.sensor)
            (self.metrics.alerts_opened if ev.state == "open" else self.metrics.alerts_closed).inc()
            log.info(
                "alert_opened" if ev.state == "open" else "alert_closed",
                alert=ev.id,
                sensor=ev.sensor,
                peak_score=ev.peak_score,
                top_channels=[c for c, _ in ev.top_channels],
            )
        self.counters.windows += n
        self.counters.alerts += len(b.events)
        self.metrics.windows_scored.inc(n)
        # Their thresholds and alert state moved: checkpoint them at the next round.
        self.on_scored(set(sensors))

    def dead_letter(
        self, value: bytes | None, key: bytes | None, partition: int, offset: int, d: DeadLetter
    ) -> None:
        """Send a bad message to the dead-letter topic, cut to what the topic accepts."""
        self.counters.dead_letters += 1
        by_kind = self.counters.dead_by_kind
        by_kind[d.kind] = by_kind.get(d.kind, 0) + 1
        self.metrics.dead_letter(d.kind)

        def record(max_value_bytes: int) -> Shrunk:
            r = dead_letter_record(
                value,
                key,
                kind=d.kind,
                reason=d.reason,
                topic=self.topics.input,
                partition=partition,
                offset=offset,
                max_value_bytes=max_value_bytes,
            )
            if r.truncated:
                self.metrics.dead_letters_truncated.inc()
                log.warning(
                    "dead_letter_truncated",
                    kind=d.kind,
                    partition=partition,
                    offset=offset,
                    size=len(value or b""),
                    kept=len(r.value or b""),
                )
            return r.value, r.key, r.headers

        def smaller(refusals: int) -> Shrunk | None:
            # Refused anyway (a topic's limit lowered since start-up): halve what is kept.
            if refusals > _DEAD_LETTER_RESIZES:
                return None
            return record(min(len(value or b""), self.dead_letter_value_bytes) >> refusals)

        first = record(self.dead_letter_value_bytes)
        self.producer.produce(
            self.topics.dlq, first[0], key=first[1], headers=first[2], shrink=smaller
        )
