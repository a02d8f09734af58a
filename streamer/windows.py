"""Per-sensor ring buffers on preallocated numpy arrays, emitting batches of windows.

Samples arrive as arrays (sensor slot, timestamp, values, position) covering many
sensors at once. ``RingWindows.push`` processes a whole batch without a Python loop
over samples: it sorts the batch by sensor (stably, so arrival order within a
sensor is kept), works out for every sample how many samples its sensor holds
after it, and gathers every window that completes inside the batch with one
fancy-indexing operation.

Policy for irregular input (documented in the README):

* **Out-of-order and duplicate timestamps.** A sample whose timestamp is not
  strictly greater than the newest accepted timestamp of its sensor is rejected:
  it is not added to the buffer and is reported in ``PushResult.rejected`` so the
  caller can dead-letter it. Windows therefore always hold strictly increasing
  timestamps.
* **Long gaps.** When a sample arrives more than ``max_gap_s`` after its sensor's
  previous accepted sample, that sensor's buffer is reset first: the sample starts
  a fresh window. A window never spans an outage.
* **Clock jumps back.** A sample more than ``max_gap_s`` *before* its sensor's
  newest accepted timestamp is not an out-of-order straggler but a clock that was
  set back (a device's clock reset, a wrong time corrected): it resets the buffer
  like a gap and starts a fresh window, so the sensor is not locked out until its
  clock catches up with the old time. It is reported in ``PushResult.resets``.
* A window is emitted when a sensor has at least ``window`` samples since its last
  reset and ``(count - window) % stride == 0``.
* **Replays.** After a restart the daemon replays a partition from its committed
  offset, which may start in the middle of a sensor's history, so counting from the
  first replayed sample would shift the stride phase. ``set_anchor`` names one
  sample (by position) and the count it had in the original run; when that sample
  is pushed the count is set to it and the ring rotated to match, so every window
  after it is exactly the one the original run emitted.

This module imports numpy only.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
from numpy.typing import NDArray

from streamer.errors import ConfigError, DataError
from streamer.windows_store import RingCopy, SortedRun, WindowBatch, WindowStore

__all__ = ["PushResult", "RingCopy", "RingWindows", "SensorIndex", "WindowBatch"]


@dataclass(frozen=True, slots=True)
class PushResult:
    """What one ``push`` produced."""

    windows: WindowBatch
    rejected: NDArray[np.int64]  # indices into the pushed arrays of rejected samples
    resets: NDArray[np.int64]  # indices of samples that reset their sensor (gap)


class SensorIndex:
    """Maps sensor keys to dense integer slots, reusing slots that were released.

    Lookups are one dict lookup per sample (see ``slots``).
    """

    __slots__ = ("_free", "_keys", "_slots")

    def __init__(self) -> None:
        self._slots: dict[Hashable, int] = {}
        self._keys: list[Hashable | None] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    @property
    def capacity(self) -> int:
        """Number of slots ever allocated (the size arrays indexed by slot need)."""
        return len(self._keys)

    def slot(self, key: Hashable) -> int:
        """The slot of ``key``, allocating one if it is new."""
        found = self._slots.get(key)
        if found is not None:
            return found
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = key
        else:
            slot = len(self._keys)
            self._keys.append(key)
        self._slots[key] = slot
        return slot

    def slots(self, keys: Sequence[Hashable] | NDArray[np.object_]) -> NDArray[np.int64]:
        """Slots for a sequence of keys, allocating for new ones in order of appearance.

        One dict lookup per key: for 2,000 keys that is 6x faster than finding the
        distinct keys first (``np.unique`` on objects sorts them with Python
        comparisons), with 100 distinct keys as with 2,000.
        """
        seq = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        if len(seq) > 1:
            try:
                # Every key known (the usual case): itemgetter does the lookups in C,
                # 2-5x faster than a comprehension of get() calls at 25,000 keys.
                found = itemgetter(*seq)(self._slots)
                return np.fromiter(found, dtype=np.int64, count=len(found))
            except KeyError:
                pass
        return np.fromiter(map(self.slot, seq), dtype=np.int64, count=len(seq))

    def key(self, slot: int) -> Hashable:
        """The key held by ``slot``."""
        key = self._keys[slot]
        if key is None:
            raise KeyError(slot)
        return key

    def keys_of(self, slots: NDArray[np.int64]) -> list[Hashable]:
        """Keys for an array of slots."""
        keys = self._keys
        return [keys[int(s)] for s in slots]

    def release(self, keys: Iterable[Hashable]) -> list[int]:
        """Forget ``keys``; their slots are reused by later keys. Returns the freed slots."""
        freed = []
        for key in keys:
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._keys[slot] = None
                self._free.append(slot)
                freed.append(slot)
        return freed

    def items(self) -> list[tuple[Hashable, int]]:
        """(key, slot) pairs of every live key."""
        return list(self._slots.items())


def _joined(parts: list[PushResult], offsets: list[int]) -> PushResult:
    """The results of consecutive pushes of one batch's pieces (starting at ``offsets``)."""
    if len(parts) == 1 and offsets[0] == 0:
        return parts[0]
    return PushResult(
        WindowBatch(*(np.concatenate(f) for f in zip(*(p.windows for p in parts), strict=True))),
        np.concatenate([p.rejected + lo for p, lo in zip(parts, offsets, strict=True)]),
        np.concatenate([p.resets + lo for p, lo in zip(parts, offsets, strict=True)]),
    )


def _group_ranks(sorted_slots: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """For slots already sorted: the rank of each sample within its slot and the group starts."""
    n = sorted_slots.shape[0]
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    idx = np.arange(n, dtype=np.int64)
    group_start_of = np.maximum.accumulate(np.where(is_start, idx, 0))
    return idx - group_start_of, starts


def _newest_before(
    s_slots: NDArray[np.int64], s_ts: NDArray[np.float64], starts: NDArray[np.int64]
) -> NDArray[np.float64]:
    """For samples sorted by slot: the newest timestamp among the earlier samples of the
    same slot in the batch (-inf for none).

    Timestamps are replaced by their global ranks so a per-group running maximum is
    one exact integer accumulate.
    """
    n = s_slots.shape[0]
    ts_order = np.argsort(s_ts, kind="stable")
    ts_rank = np.empty(n, dtype=np.int64)
    ts_rank[ts_order] = np.arange(n, dtype=np.int64)
    group_id = np.cumsum(np.r_[0, (s_slots[1:] != s_slots[:-1]).astype(np.int64)])
    keyed = group_id * (n + 1) + ts_rank + 1
    running = np.maximum.accumulate(keyed)
    prev_keyed = np.empty(n, dtype=np.int64)
    prev_keyed[1:] = running[:-1]
    prev_keyed[starts] = 0
    prev_in_batch = prev_keyed - group_id * (n + 1) - 1  # -1: nothing earlier in batch
    sorted_ts = s_ts[ts_order]
    return np.where(prev_in_batch >= 0, sorted_ts[np.maximum(prev_in_batch, 0)], -np.inf)


def _gap_resets(
    ts: NDArray[np.float64], starts: NDArray[np.int64], held: NDArray[np.float64], max_gap_s: float
) -> NDArray[np.bool_]:
    """For accepted samples sorted by slot: whether each comes more than ``max_gap_s``
    after the previous sample of its slot.

    That is the sample before it in its group, or for a group's first (``starts``) the
    newest one held before the batch, ``held`` (-inf: none, which is never a gap).
    """
    n = ts.shape[0]
    prev = np.empty(n, dtype=np.float64)
    prev[1:] = ts[:-1]
    prev[starts] = held
    is_reset = (ts - prev) > max_gap_s  # -inf prev (fresh sensor) gives +inf: fine
    fresh = np.isneginf(prev)
    is_reset &= ~fresh
    return is_reset


def _counts_after(
    is_reset: NDArray[np.bool_], ranks: NDArray[np.int64], base: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """For accepted samples sorted by slot: the first sample of each one's group, and its
    slot's count with it (counting on from ``base``, or from 1 at its group's last reset).
    """
    n = ranks.shape[0]
    idx = np.arange(n, dtype=np.int64)
    group_first = idx - ranks
    # Index of the latest reset at or before each sample within its group (-1: none).
    reset_mark = np.where(is_reset, idx, -1)
    latest_reset = np.maximum.accumulate(reset_mark)
    latest_reset = np.where(latest_reset >= group_first, latest_reset, -1)
    count_after = np.where(latest_reset >= 0, idx - latest_reset + 1, base + ranks + 1)
    return group_first, count_after


class RingWindows:
    """Ring buffers of the last ``window`` samples of every sensor slot.

    The samples are held in a ``WindowStore`` (preallocated arrays indexed by slot,
    grown by doubling); this class decides which pushed samples it takes, when a slot
    starts afresh and which windows complete.
    """

    def __init__(
        self,
        channels: int,
        window: int,
        stride: int,
        max_gap_s: float = float("inf"),
        capacity: int = 64,
    ) -> None:
        if channels < 1:
            raise ConfigError(f"channels must be >= 1, got {channels}")
        if window < 2:
            raise ConfigError(f"window must be >= 2, got {window}")
        if not 1 <= stride <= window:
            raise ConfigError(f"stride must be in [1, window={window}], got {stride}")
        if not max_gap_s > 0:
            raise ConfigError(f"max_gap_s must be > 0, got {max_gap_s}")
        self.channels = channels
        self.window = window
        self.stride = stride
        self.max_gap_s = float(max_gap_s)
        self._store = WindowStore(channels, window, stride, capacity)
        # slot -> (position, count) of a pending anchor (see set_anchor); replays only.
        self._anchors: dict[int, tuple[int, int]] = {}

    @property
    def capacity(self) -> int:
        """Number of slots the arrays currently hold."""
        return self._store.capacity

    def count(self, slot: int) -> int:
        """Samples held for ``slot`` since its last reset."""
        return int(self._store.count[slot]) if slot < self.capacity else 0

    def unscored(self, slot: int) -> int:
        """Samples of ``slot`` that no window emitted so far holds (lost if it is reset now).

        Before the first window fills, every sample held; after, those since the end of
        the last window emitted (fewer than ``stride``).
        """
        count = self.count(slot)
        return count if count < self.window else (count - self.window) % self.stride

    def counts_of(self, slots: NDArray[np.int64]) -> NDArray[np.int64]:
        """Samples held for each of ``slots`` since its last reset (0 beyond capacity)."""
        slots = np.asarray(slots, dtype=np.int64)
        inside = slots < self.capacity
        return np.where(inside, self._store.count[np.where(inside, slots, 0)], 0)

    def last_ts(self, slot: int) -> float:
        """Timestamp of the newest accepted sample of ``slot`` (-inf if none)."""
        return float(self._store.last_ts[slot]) if slot < self.capacity else float("-inf")

    def last_ts_of(self, slots: NDArray[np.int64]) -> NDArray[np.float64]:
        """``last_ts`` for an array of slots."""
        out = np.full(len(slots), -np.inf)
        inside = slots < self.capacity
        out[inside] = self._store.last_ts[slots[inside]]
        return out

    def oldest_position(self, slots: NDArray[np.int64] | None = None) -> NDArray[np.int64]:
        """Position of the oldest sample a future window of each slot needs (-1: none held).

        Replaying from the minimum of these rebuilds every later window exactly.
        """
        return self.oldest(slots)[0]

    def oldest(
        self, slots: NDArray[np.int64] | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The oldest sample per slot that a future window needs: its position and count.

        That is the first sample of the slot's next window when it is already held,
        else the newest sample (with stride == window the next window starts after
        it). The count is the sample's count since the last reset. Both are -1 / 0
        where a slot holds nothing. The pair is what ``set_anchor`` needs to continue
        the slot exactly from a replay that starts at that position.
        """
        store = self._store
        if slots is None:
            slots = np.arange(self.capacity, dtype=np.int64)
        count = store.count[slots]
        w, stride = self.window, self.stride
        # A window ending at count c > count starts at sample c - w >= count - w + 1, on
        # a multiple of stride: the first such multiple is the next window's start.
        lo = np.maximum(count - w + 1, 0)
        nxt = -(-lo // stride) * stride
        held = nxt <= count - 1
        pos = np.where(
            held, store.start_pos[slots, (nxt // stride) % store.n_starts], store.last_pos[slots]
        )
        cnt = np.where(held, nxt + 1, count)
        return np.where(count > 0, pos, -1), np.where(count > 0, cnt, 0)

    def set_anchor(self, slot: int, position: int, count: int) -> None:
        """When the sample at ``position`` is next pushed for ``slot``, make it sample ``count``.

        ``count`` is the sample's count since its sensor's last reset in the original
        run (see ``oldest``). The slot's ring is rotated so the samples before it keep
        their places relative to it, and the sample is accepted as a continuation (no
        gap reset, no out-of-order check: the original run accepted it). One anchor per
        slot; a new one replaces the old. Used by replays only, so a push that meets an
        anchor is split there, at the cost of one extra push per anchor.
        """
        if slot < 0:
            raise DataError(f"slot must be >= 0, got {slot}")
        if count < 1:
            raise DataError(f"anchor count must be >= 1, got {count}")
        self._store.grow(slot + 1)
        self._anchors[slot] = (int(position), int(count))

    def clear_anchors(self, slots: Iterable[int] | None = None) -> None:
        """Drop pending anchors (all, or those of ``slots``)."""
        if slots is None:
            self._anchors.clear()
        else:
            for slot in slots:
                self._anchors.pop(int(slot), None)

    @property
    def anchors(self) -> dict[int, tuple[int, int]]:
        """Pending anchors: slot -> (position, count)."""
        return dict(self._anchors)

    def copy_ring(self, slot: int) -> RingCopy:
        """A copy of what ``slot`` holds: ``load_ring`` continues it exactly, anywhere."""
        if self.count(slot) == 0:
            raise DataError(f"slot {slot} holds no samples")
        return self._store.copy_slot(slot)

    def load_ring(self, slot: int, ring: RingCopy) -> None:
        """Make ``slot`` hold a ring copied before (a restart); DataError if it does not fit.

        Unlike an anchor this needs no replay: the samples are in the copy. The slot's
        next sample continues it (gap and order checks against the copy's newest).
        """
        if slot < 0:
            raise DataError(f"slot must be >= 0, got {slot}")
        try:
            self._store.load_slot(slot, ring)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self._anchors.pop(slot, None)

    def reset(self, slots: NDArray[np.int64] | Sequence[int]) -> None:
        """Forget everything held for ``slots`` (released or evicted sensors)."""
        idx = np.asarray(slots, dtype=np.int64)
        idx = idx[idx < self.capacity]
        self._store.forget(idx)
        self.clear_anchors(idx.tolist())

    def push(
        self,
        slots: NDArray[np.int64],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
    ) -> PushResult:
        """Add a batch of samples (any mix of sensors, arrival order) and emit complete windows.

        Windows are returned grouped by slot, in order within each slot (with a
        pending anchor in the batch: in order within each slot).
        """
        if not self._anchors:
            return self._push(slots, ts, values, positions)
        slots = np.asarray(slots, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.float64)
        values = np.asarray(values)
        positions = np.asarray(positions, dtype=np.int64)
        a_pos = np.fromiter((p for p, _ in self._anchors.values()), dtype=np.int64)
        cand = np.flatnonzero(np.isin(positions, a_pos))
        # Only the first sample carrying an anchor's position and slot is the anchor.
        hits: list[int] = []
        seen: set[int] = set()
        for i in cand.tolist():
            slot = int(slots[i])
            anchor = self._anchors.get(slot)
            if anchor is not None and anchor[0] == int(positions[i]) and slot not in seen:
                seen.add(slot)
                hits.append(i)
        if not hits:
            return self._push(slots, ts, values, positions)
        bounds = sorted({0, *hits, slots.shape[0]})
        hit_set = set(hits)
        parts: list[PushResult] = []
        for lo, hi in itertools.pairwise(bounds):
            if lo in hit_set:
                self._apply_anchor(int(slots[lo]))
            parts.append(self._push(slots[lo:hi], ts[lo:hi], values[lo:hi], positions[lo:hi]))
        return _joined(parts, bounds[:-1])

    def _apply_anchor(self, slot: int) -> None:
        """Make the next sample of ``slot`` its anchor's count (see set_anchor)."""
        _, count = self._anchors.pop(slot)
        store, w = self._store, self.window
        base = int(store.count[slot])
        # Without the anchor the sample would land at ring index base % w; it belongs at
        # (count - 1) % w. Rolling keeps the replayed samples before it in sequence. The
        # ring of window starts is not rolled: every window after the anchor starts at
        # or after it (the anchor is the oldest sample still needed), so its starts are
        # written with the anchored counts.
        shift = (count - 1 - base) % w
        if shift:
            store.values[slot] = np.roll(store.values[slot], shift, axis=0)
        store.count[slot] = count - 1
        # The original run accepted this sample as a continuation: no gap reset here.
        store.last_ts[slot] = -np.inf

    def _push(
        self,
        slots: NDArray[np.int64],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
    ) -> PushResult:
        """Push, split at each clock jump back (rare: one more push per jump)."""
        out = self._push_run(slots, ts, values, positions)
        if isinstance(out, PushResult):
            return out
        slots = np.asarray(slots, dtype=np.int64)
        parts: list[PushResult] = []
        offsets: list[int] = []
        jumps: list[int] = []
        lo, jump = 0, out
        while True:
            if jump > 0:
                # Nothing before the first jump is a jump itself: it pushes in one go.
                head = self._push_run(
                    slots[lo : lo + jump],
                    ts[lo : lo + jump],
                    values[lo : lo + jump],
                    positions[lo : lo + jump],
                )
                assert isinstance(head, PushResult)
                parts.append(head)
                offsets.append(lo)
            lo += jump
            jumps.append(lo)
            self._store.forget(int(slots[lo]))  # the jump's sample is this sensor's first
            rest = self._push_run(slots[lo:], ts[lo:], values[lo:], positions[lo:])
            if isinstance(rest, PushResult):
                parts.append(rest)
                offsets.append(lo)
                break
            jump = rest
        res = _joined(parts, offsets)
        resets = np.sort(np.concatenate([res.resets, np.asarray(jumps, dtype=np.int64)]))
        return PushResult(res.windows, res.rejected, resets)

    def _push_run(
        self,
        slots: NDArray[np.int64],
        ts: NDArray[np.float64],
        values: NDArray[np.floating],
        positions: NDArray[np.int64],
    ) -> PushResult | int:
        """Push samples with no clock jump back; else change nothing and return the index
        (in the pushed arrays) of the first one."""
        slots = np.asarray(slots, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.float64)
        positions = np.asarray(positions, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        n = slots.shape[0]
        store = self._store
        none = np.empty(0, np.int64)
        if n == 0:
            return PushResult(store.empty(), none, none)
        if values.shape != (n, self.channels) or ts.shape != (n,) or positions.shape != (n,):
            raise DataError(
                f"push expects values ({n}, {self.channels}), ts ({n},), positions ({n},); "
                f"got {values.shape}, {ts.shape}, {positions.shape}"
            )
        if slots.min() < 0:
            raise DataError(f"slots must be >= 0, got {int(slots.min())}")
        store.grow(int(slots.max()) + 1)

        order = np.argsort(slots, kind="stable")
        s_slots = slots[order]
        s_ts = ts[order]

        # Accept a sample only if its timestamp is above every earlier timestamp of its
        # sensor (buffer or batch).
        ranks, starts = _group_ranks(s_slots)
        prev_ts = np.maximum(_newest_before(s_slots, s_ts, starts), store.last_ts[s_slots])
        accept = s_ts > prev_ts
        if not np.all(accept):
            jump = ~accept & (prev_ts - s_ts > self.max_gap_s)
            if jump.any():
                return int(order[jump].min())
            rejected = np.sort(order[~accept])
            keep = np.flatnonzero(accept)
            order = order[keep]
            s_slots = s_slots[keep]
            s_ts = s_ts[keep]
            if s_slots.shape[0] == 0:
                return PushResult(store.empty(), rejected, none)
            ranks, starts = _group_ranks(s_slots)
        else:
            rejected = none

        base = store.count[s_slots]
        # Gap detection against the previous accepted sample of the same sensor.
        is_reset = _gap_resets(s_ts, starts, store.last_ts[s_slots[starts]], self.max_gap_s)
        group_first, counts = _counts_after(is_reset, ranks, base)
        run = SortedRun(
            ts, values, positions, order, s_slots, s_ts, ranks, starts, group_first, base, counts
        )
        w, stride = self.window, self.stride
        # A window ends at every stride-th sample from the window-th on since the last reset.
        emit = (counts >= w) & ((counts - w) % stride == 0)
        e_idx = np.flatnonzero(emit)
        windows = store.gather(run, e_idx) if e_idx.size else store.empty()
        store.write(run)
        resets = np.sort(order[np.flatnonzero(is_reset)])
        return PushResult(windows, rejected, resets)
