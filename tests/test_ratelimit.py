"""The per-key rate limit behind the metrics server's and the Kafka clients' log lines."""

from __future__ import annotations

import pytest

from streamer.ratelimit import RateLimiter


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestRateLimiter:
    def test_burst_per_window_then_the_count_of_those_dropped(self) -> None:
        """``burst`` events pass per window; the next one let through carries the dropped count."""
        clock = _Clock()
        limit = RateLimiter(burst=3, interval_s=10.0, clock=clock)
        assert [limit.allow("FAIL") for _ in range(7)] == [0, 0, 0, None, None, None, None]
        clock.now += 9.9
        assert limit.allow("FAIL") is None
        clock.now += 0.1
        assert limit.allow("FAIL") == 5
        assert limit.allow("FAIL") == 0

    def test_keys_are_limited_apart(self) -> None:
        """A flood of one kind does not silence another."""
        limit = RateLimiter(burst=1, interval_s=60.0, clock=_Clock())
        assert limit.allow("FAIL") == 0
        assert limit.allow("FAIL") is None
        assert limit.allow("REQTMOUT") == 0

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="burst"):
            RateLimiter(burst=0)
        with pytest.raises(ValueError, match="interval_s"):
            RateLimiter(interval_s=0)
