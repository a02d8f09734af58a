"""Which sensors a commit round evicts, and why: a pure, vectorised decision.

A sensor is evicted when it is *silent* (its latest sample is more than
``stream.max_gap_s`` behind the partition's clock), *idle* (no message for
``stream.max_idle_s`` of wall-clock time, whatever its timestamps say), or when its
ring anchor pins the replay more than ``stream.max_replay_messages`` behind H.

A sensor silent for ``stream.park_after_s`` (by either clock) and not evicted is
*parked*: its partial window is saved with its state instead of anchored in the
input topic, so it stops holding the commit back (``PartitionTable.snapshot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.codec import offset_of
from streamer.config import StreamConfig

__all__ = ["EVICTIONS_LOGGED", "Eviction", "choose_evictions", "log_evictions"]

log = structlog.get_logger("streamer.daemon")

# Per-sensor eviction warnings per partition and round; the rest are summed in one line.
EVICTIONS_LOGGED = 20


@dataclass(frozen=True, slots=True)
class Eviction:
    """Per sensor (one row each): whether and why it is evicted, and the figures why."""

    out: NDArray[np.bool_]  # evicted, for any reason
    silent: NDArray[np.bool_]  # silent or idle
    idle: NDArray[np.bool_]
    replay_bound: NDArray[np.bool_]  # behind, and neither silent nor idle
    silent_s: NDArray[np.float64]  # the partition's clock minus the sensor's latest sample
    idle_s: NDArray[np.float64]  # wall-clock seconds since its last message
    behind_by: NDArray[np.int64]  # messages between its anchor and H
    park: NDArray[np.bool_]  # silent for stream.park_after_s, not evicted: save its ring

    @property
    def any(self) -> bool:
        """Whether any sensor is evicted."""
        return bool(self.out.any())

    def order(self, names: list[str]) -> list[int]:
        """The evicted rows, in the order of their sensor names (stable logs and records)."""
        return sorted(np.flatnonzero(self.out).tolist(), key=names.__getitem__)

    def reason(self, i: int) -> str:
        """Why row ``i`` is evicted: idle, silent or replay_bound."""
        return "idle" if self.idle[i] else "silent" if self.silent[i] else "replay_bound"


def choose_evictions(
    *,
    h: int,
    oldest_pos: NDArray[np.int64],
    written: NDArray[np.int64],
    last_ts: NDArray[np.float64],
    filled: NDArray[np.bool_],
    idle_s: NDArray[np.float64],
    stream: StreamConfig,
) -> Eviction:
    """Decide a partition's evictions at H = ``h``.

    Per sensor: the position of the oldest sample its next window needs (-1: none),
    the anchor offset last written (-1: none), its latest timestamp (-inf: no sample),
    whether its ring has filled a window, and the seconds since its last message.
    """
    held = np.where(oldest_pos >= 0, offset_of(oldest_pos), h)
    anchor = np.where(written >= 0, written, held)
    has_samples = np.isfinite(last_ts)
    # The partition's clock: the (upper) median of the latest timestamps of its sensors
    # that filled a window (of all, while none has), so neither one sensor with a clock
    # far ahead nor a handful of new ids can make the others look silent.
    filled = has_samples & filled
    latest = np.sort(last_ts[filled if filled.any() else has_samples])
    now_ts = float(latest[latest.size // 2]) if latest.size else float("-inf")
    silent = has_samples & (now_ts - last_ts > stream.max_gap_s)
    # Wall-clock idleness: ids that sent a message or two and never again do not pin
    # the commit, whatever their timestamps say.
    idle = ~silent & (idle_s > stream.max_idle_s)
    silent |= idle
    behind_by = h - anchor
    behind = behind_by > stream.max_replay_messages
    out = silent | behind
    park_s = stream.park_after_s
    quiet = (now_ts - last_ts > park_s) | (idle_s > park_s)
    park = has_samples & ~out & quiet if park_s > 0 else np.zeros_like(out)
    return Eviction(
        out=out,
        silent=silent,
        idle=idle,
        replay_bound=behind & ~silent,
        silent_s=now_ts - last_ts,
        idle_s=idle_s,
        behind_by=behind_by,
        park=park,
    )


def log_evictions(
    partition: int,
    names: list[str],
    unscored: list[int],
    ev: Eviction,
    order: list[int],
    stream: StreamConfig,
) -> None:
    """One warning per evicted sensor (the first few), a summary, and a bound too small.

    ``order``: the evicted rows (``Eviction.order``); ``unscored``: the samples each of
    the first ``EVICTIONS_LOGGED`` of them held that no window covered (what is lost).
    """
    for i, dropped in zip(order[:EVICTIONS_LOGGED], unscored, strict=True):
        log.warning(
            "sensor_evicted",
            sensor=names[i],
            partition=partition,
            reason=ev.reason(i),
            samples_dropped=dropped,
            silent_s=round(float(ev.silent_s[i]), 3),
            idle_s=round(float(ev.idle_s[i]), 3),
            messages_behind=int(ev.behind_by[i]),
        )
    if len(order) > EVICTIONS_LOGGED:
        log.warning(
            "sensors_evicted",
            partition=partition,
            silent=int((ev.silent & ~ev.idle).sum()),
            idle=int(ev.idle.sum()),
            replay_bound=int(ev.replay_bound.sum()),
            logged=EVICTIONS_LOGGED,
        )
    if ev.replay_bound.sum() > len(names) // 2:
        # Most of the partition's sensors: the bound is too small for the fleet, since
        # a window spans `window` samples of every sensor in the partition.
        log.error(
            "replay_bound_too_small",
            partition=partition,
            max_replay_messages=stream.max_replay_messages,
            sensors=len(names),
            needed_at_least=stream.window * len(names),
            hint="raise stream.max_replay_messages above window x sensors per partition",
        )
