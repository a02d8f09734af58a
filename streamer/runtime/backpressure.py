"""Backpressure: stop consuming while the inference queue is full, in two steps.

Pausing holds consumption first: no consume call, so librdkafka keeps what it
prefetched, where pausing the partitions in the client would discard it and fetch it
again on resume. They are paused in the client only if the hold lasts
``kafka.pause_after_s``, so that the consumer goes on serving rebalances.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog

__all__ = ["Backpressure", "Pausable", "QueueFill"]

log = structlog.get_logger("streamer.daemon")


class Pausable(Protocol):
    """The consumer, as backpressure sees it (``kafka.source.Source``)."""

    def pause(self, partitions: list[int]) -> None:
        """Stop fetching these partitions."""

    def resume(self, partitions: list[int]) -> None:
        """Fetch them again."""


class QueueFill(Protocol):
    """The inference worker's queue, as backpressure sees it."""

    @property
    def is_full(self) -> bool:
        """No room for another batch."""

    @property
    def is_half_empty(self) -> bool:
        """Room again for half the queue."""

    @property
    def queue_depth(self) -> int:
        """Batches queued."""

    @property
    def queued_windows(self) -> int:
        """Windows queued."""


class Backpressure:
    """Whether the loop consumes, given the worker's queue; pauses the client if it must."""

    def __init__(
        self,
        queue: QueueFill,
        pause_after_s: float,
        partitions: Callable[[], list[int]],
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.pause_after_s = pause_after_s
        self.partitions = partitions
        self.on_pause = on_pause
        self.paused = False  # not consuming: the worker's queue is full
        self.since = 0.0  # monotonic, when the hold began
        self.client_paused = False  # the partitions are paused in the client too

    @property
    def consuming(self) -> bool:
        """Whether the loop calls consume: not held, or held long enough to pause the client."""
        return not self.paused or self.client_paused

    def fields(self) -> dict[str, int]:
        """The worker queue's fill, for the backpressure and stats log lines."""
        return {"queue_depth": self.queue.queue_depth, "queued_windows": self.queue.queued_windows}

    def update(self, source: Pausable) -> None:
        """Hold or release by the queue's fill; pause the client after ``pause_after_s``."""
        if self.paused and self.queue.is_half_empty:
            self._set(source, False)
        if not self.paused and self.queue.is_full:
            self._set(source, True)
        if (
            self.paused
            and not self.client_paused
            and time.monotonic() - self.since >= self.pause_after_s
        ):
            parts = self.partitions()
            source.pause(parts)
            self.client_paused = True
            log.warning(
                "partitions_paused",
                held_s=round(time.monotonic() - self.since, 3),
                **self.fields(),
                partitions=parts,
            )

    def _set(self, source: Pausable, paused: bool) -> None:
        parts = self.partitions()
        if paused:
            self.since = time.monotonic()
            if self.on_pause is not None:
                self.on_pause()
            log.info("consumption_paused", **self.fields(), partitions=parts)
        else:
            if self.client_paused:
                source.resume(parts)
                self.client_paused = False
            log.info(
                "consumption_resumed",
                **self.fields(),
                partitions=parts,
                paused_s=round(time.monotonic() - self.since, 3),
            )
        self.paused = paused
