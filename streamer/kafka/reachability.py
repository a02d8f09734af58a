"""Whether the Kafka clients reach a broker: one line when an outage starts, one when it ends.

librdkafka reports an unreachable broker through the client's error callback: a
``_TRANSPORT`` error for every failed connection attempt (every 0.1 to 10 s per
broker) and ``_ALL_BROKERS_DOWN`` once none of the client's brokers is up. Logged one
by one, a 30 s outage made 734 warnings, and nothing told the readiness probe.
``Reachability`` reads those reports instead:

- ``_ALL_BROKERS_DOWN`` marks the client down. ``_TRANSPORT`` and ``_RESOLVE`` are one
  connection failing, which librdkafka retries by itself: no line of their own
  (librdkafka's ``FAIL`` line says the same, rate-limited by ``clientlog``).
- A client is up again once its statistics (``stats_cb``, every
  ``statistics.interval.ms``) show a broker in state ``UP``. They are parsed only
  while the client is down. Consumed messages prove nothing: a consumer hands out
  what it prefetched long after its broker went away.
- An outage lasts while any client is down. ``kafka_unreachable`` (a warning, with
  ``since``) is logged once it has lasted ``announce_after_s``, because librdkafka
  also reports all brokers down for an instant while it swaps a bootstrap address
  for a learned one; ``kafka_reachable_again`` (with ``down_s``) when every client is
  up again. ``on_change`` gets the outage's start (``time.monotonic()``) or None:
  ``Health.set_broker_down_since``, which ``/readyz`` reads.
- Any other non-fatal error is one ``kafka_client_error`` warning, at most a few per
  client and error code per interval.

Callbacks run on the threads that serve the clients (``poll``, ``consume``,
``flush``); a lock keeps the state consistent when they are different threads.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from confluent_kafka import KafkaError as RdKafkaError
from structlog.typing import FilteringBoundLogger

from streamer.ratelimit import RateLimiter

__all__ = ["ANNOUNCE_AFTER_S", "STATS_INTERVAL_MS", "Reachability"]

log = structlog.get_logger(__name__)

# How often a client reports its brokers' states, unless kafka.client sets a positive
# statistics.interval.ms: the delay before a recovered broker is noticed.
STATS_INTERVAL_MS = 2000
ANNOUNCE_AFTER_S = 2.0
_CONNECTION_CODES = frozenset({RdKafkaError._TRANSPORT, RdKafkaError._RESOLVE})
_ERROR_BURST = 5
_ERROR_INTERVAL_S = 60.0


class Reachability:
    """Tracks from the clients' callbacks whether any broker answers them; see the module doc.

    Each client registers under a name (``watch``) and reports its errors with it
    (``on_error``); a tracker shared by the daemon's consumer and producer tells one
    outage once, however many clients saw it.
    """

    def __init__(
        self,
        on_change: Callable[[float | None], None] | None = None,
        *,
        announce_after_s: float = ANNOUNCE_AFTER_S,
        stats_interval_ms: int = STATS_INTERVAL_MS,
        limiter: RateLimiter | None = None,
        logger: FilteringBoundLogger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if announce_after_s < 0:
            raise ValueError(f"announce_after_s must be >= 0, got {announce_after_s}")
        if stats_interval_ms <= 0:
            raise ValueError(f"stats_interval_ms must be positive, got {stats_interval_ms}")
        self._on_change = on_change
        self._announce_after_s = announce_after_s
        self._stats_interval_ms = stats_interval_ms
        self._errors = (
            limiter if limiter is not None else RateLimiter(_ERROR_BURST, _ERROR_INTERVAL_S)
        )
        self._log: FilteringBoundLogger = logger if logger is not None else log
        self._clock = clock
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}  # client -> since when it reaches no broker
        self._since: float | None = None  # start of the outage (some client down)
        self._reason = ""
        self._announced = False

    @property
    def down_since(self) -> float | None:
        """When the current outage started (the clock's time), or None while all clients are up."""
        return self._since

    def watch(self, client: str, conf: Mapping[str, Any]) -> dict[str, Any]:
        """Settings to add to ``client``'s configuration ``conf`` so its statistics come here.

        A positive ``statistics.interval.ms`` in ``conf`` is kept; otherwise the
        tracker's own interval is set (statistics are how a recovery is seen).
        """
        try:
            interval = int(conf.get("statistics.interval.ms", 0))
        except (TypeError, ValueError):
            interval = 0
        return {
            "stats_cb": functools.partial(self.on_stats, client),
            "statistics.interval.ms": interval if interval > 0 else self._stats_interval_ms,
        }

    def on_error(self, client: str, err: Any) -> None:
        """A non-fatal error ``err`` (a confluent_kafka.KafkaError) reported by ``client``."""
        code = err.code()
        if code == RdKafkaError._ALL_BROKERS_DOWN:
            self._mark_down(client, str(err))
        elif code in _CONNECTION_CODES:
            self._check()
        else:
            suppressed = self._errors.allow((client, code))
            if suppressed is not None:
                extra = {"suppressed": suppressed} if suppressed else {}
                self._log.warning(
                    "kafka_client_error", client=client, code=err.name(), error=str(err), **extra
                )

    def on_stats(self, client: str, stats: str) -> None:
        """``client``'s statistics (librdkafka's JSON); they end its outage if a broker is up."""
        if client not in self._down:
            return  # up: the common case, nothing to parse
        if _any_broker_up(stats):
            self._mark_up(client)
        else:
            self._check()

    def forget(self, client: str) -> None:
        """``client`` is closed: it no longer keeps an outage going (nothing is logged)."""
        with self._lock:
            if self._down.pop(client, None) is not None and not self._down:
                self._end()

    # -- state -----------------------------------------------------------------------

    def _mark_down(self, client: str, reason: str) -> None:
        with self._lock:
            if client not in self._down:
                now = self._clock()
                self._down[client] = now
                if self._since is None:
                    self._since, self._reason = now, reason
                    if self._on_change is not None:
                        self._on_change(now)
        self._check()

    def _mark_up(self, client: str) -> None:
        with self._lock:
            if self._down.pop(client, None) is None or self._down:
                return  # others are still down: the outage goes on
            since, announced = self._since, self._announced
            self._end()
            if announced and since is not None:
                down_s = self._clock() - since
                self._log.info("kafka_reachable_again", client=client, down_s=round(down_s, 1))

    def _end(self) -> None:
        self._since, self._announced, self._reason = None, False, ""
        if self._on_change is not None:
            self._on_change(None)

    def _check(self) -> None:
        """Announce the outage once it has lasted ``announce_after_s``."""
        with self._lock:
            since = self._since
            if since is None or self._announced:
                return
            down_s = self._clock() - since
            if down_s < self._announce_after_s:
                return
            self._announced = True
            started = datetime.fromtimestamp(time.time() - down_s, UTC)
            self._log.warning(
                "kafka_unreachable",
                since=started.isoformat(timespec="milliseconds"),
                down_s=round(down_s, 1),
                clients=sorted(self._down),
                reason=self._reason,
            )


def _any_broker_up(stats: str) -> bool:
    """Whether librdkafka's statistics JSON shows a broker connected (state ``UP``)."""
    try:
        brokers = orjson.loads(stats).get("brokers")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    if not isinstance(brokers, dict):
        return False
    # The internal pseudo-broker is never a connection to a cluster.
    return any(
        isinstance(b, dict) and b.get("state") == "UP" and b.get("source") != "internal"
        for b in brokers.values()
    )
