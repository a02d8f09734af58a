"""Running totals of one daemon, for its ``stats`` log line and shutdown summary."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Counters"]


@dataclass(slots=True)
class Counters:
    """What the daemon did since it started (the Prometheus counters' log-line twin)."""

    messages: int = 0
    samples: int = 0
    windows: int = 0
    skipped_windows: int = 0
    alerts: int = 0
    dead_letters: int = 0
    dead_by_kind: dict[str, int] = field(default_factory=dict)
    state_written: int = 0
    state_corrupt: int = 0
    evicted: int = 0
    pauses: int = 0

    def count_pause(self) -> None:
        """One pause of consumption (backpressure)."""
        self.pauses += 1
