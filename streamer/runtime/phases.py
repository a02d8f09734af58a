"""Start-up phases: where the seconds before the first score go, as one line and metrics.

The daemon marks each event once (imports done, model loaded, cluster checked,
subscribed, first assignment, its state restored, first message fetched, first score
published); at the first score, one ``startup`` line gives each event's time since the
process started and each phase's length, and ``streamer_startup_seconds{phase}`` holds
them. The model loads while the cluster is checked and the group joined, so the phases
overlap: their lengths need not add up to the total.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from streamer.metrics import Metrics

__all__ = ["EVENTS", "StartupPhases", "process_age_s"]

log = structlog.get_logger("streamer.daemon")

# In the order they normally happen.
EVENTS = (
    "imported",
    "model_loaded",
    "checked",
    "subscribed",
    "assigned",
    "restored",
    "fetched",
    "scored",
)
# Each phase: (name, from event, to event); None means the process start.
_PHASES = (
    ("imports", None, "imported"),
    ("model_load", "imported", "model_loaded"),
    ("cluster_checks", "imported", "checked"),
    ("group_join", "subscribed", "assigned"),
    ("state_restore", "assigned", "restored"),
    ("first_fetch", "restored", "fetched"),
    ("first_score", "fetched", "scored"),
)


def process_age_s() -> float | None:
    """Seconds since this process started (10 ms resolution), or None off Linux."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    # The command name may hold spaces or parentheses: the fields follow the last ")".
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class StartupPhases:
    """The start-up's events, marked once each, reported at the first score."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        age = process_age_s()
        self._start = time.monotonic() - (age if age is not None else 0.0)
        self._at: dict[str, float] = {}
        self._metrics = metrics
        self.reported = False

    def mark(self, event: str) -> None:
        """Note ``event`` now, unless it happened already."""
        if event not in self._at:
            self._at[event] = time.monotonic() - self._start

    def at(self, event: str) -> float | None:
        """Seconds from the process start to ``event``, or None before it happened."""
        return self._at.get(event)

    def phases(self) -> dict[str, float]:
        """Each phase whose ends are both marked, in seconds."""
        out = {}
        for name, begin, end in _PHASES:
            b = 0.0 if begin is None else self._at.get(begin)
            e = self._at.get(end)
            if b is not None and e is not None:
                out[name] = round(max(0.0, e - b), 3)
        return out

    def scored(self, **extra: object) -> None:
        """The first score was published: log the ``startup`` line and set the metrics once."""
        if self.reported:
            return
        self.mark("scored")
        self.reported = True
        phases = self.phases()
        total = round(self._at["scored"], 3)
        log.info(
            "startup",
            seconds=total,
            phases=phases,
            since_start={e: round(self._at[e], 3) for e in EVENTS if e in self._at},
            **extra,
        )
        if self._metrics is not None:
            for name, seconds in {**phases, "total": total}.items():
                self._metrics.startup_seconds.labels(phase=name).set(seconds)
