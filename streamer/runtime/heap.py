"""Keeping the cyclic garbage collector off the loop's path: heap settles at rare events."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["SensorGrowth", "settle_heap", "trim_heap"]

log = structlog.get_logger("streamer.daemon")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, where the C library is glibc; else None."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc), after a restore or a drop.

    A restore reads its records on a thread of its own, so glibc serves it from another
    arena; freed, those pages stay with the process, and each takeover raised the
    resident size by the restore's peak for good. Trimming returns them (a few ms).
    """
    if _TRIM is not None:
        started = time.perf_counter()
        released = _TRIM(0)
        log.debug(
            "heap_trimmed", released=bool(released), seconds=round(time.perf_counter() - started, 4)
        )


def settle_heap(reason: str, *, rethaw: bool = True, **fields: Any) -> None:
    """Collect every cycle, then move what is alive out of the cyclic collector's reach.

    The imports (torch above all) leave some 200,000 tracked objects that live as long
    as the process. A full collection walks them all: 90-150 ms on a 2-core machine,
    every few seconds under load, with the loop and so every score in flight stalled.
    Frozen (``gc.freeze``), they are skipped, and a full collection costs what the loop
    itself allocates. Run after start-up, an assignment's restore and a model swap:
    rare events that create long-lived objects. Unfreezing first (``rethaw``)
    re-examines what an earlier call froze, so a frozen cycle dropped since (a replaced
    model, a revoked partition's state) is still collected here. Without it, the call
    walks only what was made since the last one (``SensorGrowth``'s settles).
    """
    started = time.perf_counter()
    if rethaw:
        gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    log.debug(
        "heap_settled",
        reason=reason,
        frozen=gc.get_freeze_count(),
        collected=collected,
        seconds=round(time.perf_counter() - started, 4),
        **fields,
    )


class SensorGrowth:
    """When the sensors' long-lived objects call for another heap settle.

    Each sensor's threshold and alert state are a few tracked objects made at its first
    score, long after start-up's settle. At 100,000 sensors they are some 200,000 objects
    that every full collection walked (50-80 ms, about every second while scoring, each
    freeing nothing). Settling each time the count has doubled (from ``minimum``) keeps
    them frozen, and walks each object about twice in all.
    """

    __slots__ = ("minimum", "settled")

    def __init__(self, minimum: int = 1000) -> None:
        self.minimum = minimum
        self.settled = 0

    def due(self, sensors: int) -> bool:
        """Whether ``sensors`` is at least double (and ``minimum`` above) the last settle's."""
        return sensors - self.settled >= max(self.minimum, self.settled)
