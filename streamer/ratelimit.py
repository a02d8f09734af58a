"""A per-key rate limit for log lines, so a flood of one kind of event cannot flood the log.

A broker outage makes librdkafka report a failed connection every few hundred
milliseconds, and a thousand half-open connections to the metrics port fail a
thousand times: each is worth knowing about once, not a thousand times. The limit
lets ``burst`` events per key through in each ``interval_s`` window and counts the
rest; the next line let through carries that count (``suppressed``), so nothing
goes unaccounted for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``burst`` events per key in each ``interval_s`` window; counts the others.

    Thread-safe: the metrics server's threads share one.
    """

    __slots__ = ("_clock", "_keys", "_lock", "burst", "interval_s")

    def __init__(
        self,
        burst: int = 5,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        # key -> [window start, events let through in the window, events dropped since
        # the last one let through]. Keys are few (error kinds, librdkafka facilities).
        self._keys: dict[Hashable, list[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> int | None:
        """Whether an event of ``key`` may be logged now.

        Returns None to drop it; otherwise the number of events of ``key`` dropped
        since the last one let through (0 mostly), to report with this one.
        """
        now = self._clock()
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = [now, 0, 0]
            elif now - state[0] >= self.interval_s:
                state[0], state[1] = now, 0
            if state[1] >= self.burst:
                state[2] += 1
                return None
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0
            return suppressed
