"""librdkafka's own log lines, as rate-limited structlog events instead of raw stderr.

By default librdkafka prints ``%3|1764201600.123|FAIL|rdkafka#consumer-1| ...`` to
stderr from its own threads: during a broker outage that is a line per connection
attempt per client, interleaved with the daemon's JSON log. Given a ``logger``
setting (a ``logging.Logger``), confluent-kafka instead queues each line and hands it
to that logger on the thread that calls ``poll``/``consume``/``flush``, as
``logger.log(level, "%s [%s] %s", facility, client name, message)``.
``client_logger()`` is that logger: its handler turns every line into one
``kafka_client_log`` event (``facility``, ``client``, ``message``, at the line's
level), at most ``burst`` per facility per interval, the next one let through
carrying how many were left out (``suppressed``). Debug lines, which librdkafka sends
only when ``kafka.client.debug`` asks for them, are never limited.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from streamer.ratelimit import RateLimiter

__all__ = ["CLIENT_LOGGER", "ClientLogHandler", "client_logger"]

log = structlog.get_logger("streamer.kafka.client")

CLIENT_LOGGER = "streamer.kafka.librdkafka"
# Per facility (FAIL, REQTMOUT, ...), for every client of the process together.
_BURST = 5
_INTERVAL_S = 60.0

_install_lock = threading.Lock()


class ClientLogHandler(logging.Handler):
    """Turns confluent-kafka's log records into rate-limited ``kafka_client_log`` events."""

    def __init__(
        self,
        limiter: RateLimiter | None = None,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        super().__init__(logging.DEBUG)
        self._limiter = limiter if limiter is not None else RateLimiter(_BURST, _INTERVAL_S)
        self._log: FilteringBoundLogger = logger if logger is not None else log

    def emit(self, record: logging.LogRecord) -> None:
        """Log the record as one event, unless its facility is over the rate limit."""
        try:
            args = record.args
            if isinstance(args, tuple) and len(args) == 3:  # confluent-kafka's own call
                facility, client, message = (str(a) for a in args)
            else:
                facility, client, message = "-", record.name, record.getMessage()
            # Debug lines come only when kafka.client.debug asks for them, and then every
            # one of them is wanted: the limit is for what librdkafka says unasked.
            suppressed = 0 if record.levelno < logging.INFO else self._limiter.allow(facility)
            if suppressed is None:
                return
            extra: dict[str, Any] = {"suppressed": suppressed} if suppressed else {}
            self._log.log(
                record.levelno,
                "kafka_client_log",
                facility=facility,
                client=client,
                message=message,
                **extra,
            )
        except Exception:
            # Raised into confluent-kafka's callback, it would come out of the consume or
            # poll that served the line: a log line must never stop the daemon.
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        """Drop the line (logging would print a traceback to stderr: the noise replaced here)."""
        return


def client_logger() -> logging.Logger:
    """The ``logger`` setting for a confluent-kafka client: its lines become structlog events.

    One logger and one handler for the whole process, so the rate limit bounds every
    client's lines together. It does not propagate: a root handler someone configured
    would print each line a second time.
    """
    logger = logging.getLogger(CLIENT_LOGGER)
    with _install_lock:
        if not any(isinstance(h, ClientLogHandler) for h in logger.handlers):
            logger.addHandler(ClientLogHandler())
            logger.setLevel(logging.DEBUG)  # librdkafka's log_level decides what is sent
            logger.propagate = False
    return logger
