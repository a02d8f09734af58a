"""Producer wrapper: idempotent, acks=all, delivery errors latched and raised on the main thread.

librdkafka reports delivery asynchronously, through a callback that runs inside
``poll``/``flush`` on the calling thread. The first error is latched there and
raised by the next ``produce``, ``poll`` or ``flush``, so the daemon never commits
an offset whose output was not delivered.

Besides ``flush`` (wait for everything), ``mark`` and ``acknowledged`` tell without
waiting when every record produced before a point is acknowledged, while newer
records keep flowing: records are counted per epoch, and ``mark`` starts a new one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaException, Message, Producer

from streamer.config import KafkaConfig
from streamer.errors import KafkaError

__all__ = ["Sink"]

log = structlog.get_logger(__name__)

# Our settings win over the pass-through ones: they are what the delivery guarantee needs.
_REQUIRED = {"enable.idempotence": True, "acks": "all"}
_DEFAULTS: dict[str, Any] = {"linger.ms": 5, "compression.type": "lz4"}


class Sink:
    """Publishes records; ``flush`` returns only when every one is acknowledged."""

    def __init__(self, cfg: KafkaConfig, client_id: str = "streamer") -> None:
        conf: dict[str, Any] = {**_DEFAULTS, "client.id": client_id, **cfg.librdkafka()}
        conf.update(_REQUIRED)
        conf["bootstrap.servers"] = cfg.bootstrap_servers
        conf["error_cb"] = self._on_error
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise KafkaError(f"cannot create producer: {exc}") from exc
        self._failure: str | None = None
        self.delivered = 0
        self.produced = 0
        # Epoch -> its records not yet reported (delivered or failed), oldest first; the
        # current epoch is always present. Closed epochs leave once fully reported.
        self._epoch = 0
        self._unreported: dict[int, int] = {0: 0}
        self._on_delivery = self._reporter(0)

    def _reporter(self, epoch: int) -> Callable[[Any, Message], None]:
        unreported = self._unreported

        def on_delivery(err: Any, msg: Message) -> None:
            if err is not None:
                if self._failure is None:
                    self._failure = f"delivery to {msg.topic()}[{msg.partition()}] failed: {err}"
            else:
                self.delivered += 1
            left = unreported[epoch] - 1
            if left or epoch == self._epoch:
                unreported[epoch] = left
            else:
                del unreported[epoch]

        return on_delivery

    def _then(self, on_delivered: Callable[[], None]) -> Callable[[Any, Message], None]:
        report = self._on_delivery

        def callback(err: Any, msg: Message) -> None:
            report(err, msg)
            if err is None:
                on_delivered()

        return callback

    def mark(self) -> int:
        """A token for "everything produced so far"; see ``acknowledged``."""
        token = self._epoch
        if self._unreported[token] == 0:
            del self._unreported[token]
        self._epoch += 1
        self._unreported[self._epoch] = 0
        self._on_delivery = self._reporter(self._epoch)
        return token

    def acknowledged(self, token: int) -> bool:
        """Whether every record produced before ``mark`` returned ``token`` is reported.

        Reported means acknowledged by the broker, or failed: a failure is latched and
        raised by the next call, so a caller never acts on a failed record. Delivery
        reports are served by ``poll``, ``produce`` (when the queue is full) and ``flush``.
        """
        self.raise_if_failed()
        return next(iter(self._unreported)) > token

    def _on_error(self, err: Any) -> None:
        # Client-level errors: most are transient and librdkafka retries them; a fatal
        # one (e.g. the idempotent producer lost its sequence) must stop the daemon.
        if err.fatal():
            if self._failure is None:
                self._failure = f"producer fatal error: {err}"
        else:
            log.warning("producer_error", error=str(err))

    def raise_if_failed(self) -> None:
        """Raise KafkaError if any delivery failed since start."""
        if self._failure is not None:
            raise KafkaError(self._failure)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None = None,
        partition: int | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        """Queue one record; waits (serving callbacks) while the local queue is full.

        ``on_delivered`` runs (on the thread serving ``poll``/``flush``) once the broker
        acknowledged this record.
        """
        self.raise_if_failed()
        epoch = self._epoch
        callback = self._on_delivery if on_delivered is None else self._then(on_delivered)
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": callback}
        if headers:
            kwargs["headers"] = list(headers.items()) if isinstance(headers, Mapping) else headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                self._unreported[epoch] += 1
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._producer.poll(0.05)
                self.raise_if_failed()
            except KafkaException as exc:
                raise KafkaError(f"cannot produce to {topic}: {exc}") from exc
        self.produced += 1

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery callbacks; raise a latched failure."""
        self._producer.poll(timeout_s)
        self.raise_if_failed()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything produced is acknowledged, or raise KafkaError."""
        started = time.monotonic()
        remaining = self._producer.flush(timeout_s)
        self.raise_if_failed()
        if remaining:
            raise KafkaError(
                f"{remaining} records not acknowledged after {time.monotonic() - started:.1f}s"
            )

    @property
    def pending(self) -> int:
        """Records produced but not yet acknowledged."""
        return len(self._producer)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued (best effort) and release the producer."""
        with contextlib.suppress(KafkaException):
            self._producer.flush(timeout_s)
