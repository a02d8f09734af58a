"""Storage behind ``RingWindows``: the last ``window`` samples of every sensor slot.

``WindowStore`` holds preallocated arrays indexed by slot and knows their layout: where
a sample of a slot lives in its ring, which samples are window starts and where their
timestamps and positions are kept. It gathers the windows a push completes and writes
the pushed samples, both with fancy indexing over the whole push. Which samples are
accepted, and when a slot starts afresh, is ``RingWindows``'s policy: it hands the
accepted samples over as a ``SortedRun``.

This module imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

__all__ = ["RingCopy", "SortedRun", "WindowBatch", "WindowStore"]


@dataclass(frozen=True, slots=True)
class RingCopy:
    """Everything a slot holds, copied: loaded into a slot, it continues exactly."""

    count: int
    last_ts: float
    last_pos: int
    values: NDArray[np.float32]  # (window, channels), in ring order
    start_ts: NDArray[np.float64]  # (n_starts,)
    start_pos: NDArray[np.int64]  # (n_starts,)


class WindowBatch(NamedTuple):
    """Complete windows: ``data[i]`` is the window of sensor slot ``slots[i]``."""

    slots: NDArray[np.int64]
    data: NDArray[np.float32]  # (n, window, channels)
    start_ts: NDArray[np.float64]
    end_ts: NDArray[np.float64]
    start_pos: NDArray[np.int64]  # position of the window's first sample
    end_pos: NDArray[np.int64]  # position of the window's last sample

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def take(self, index: NDArray[np.int64] | slice) -> WindowBatch:
        """The sub-batch at ``index`` (views where numpy allows)."""
        return WindowBatch(
            self.slots[index],
            self.data[index],
            self.start_ts[index],
            self.end_ts[index],
            self.start_pos[index],
            self.end_pos[index],
        )


class SortedRun(NamedTuple):
    """The accepted samples of one push, sorted by slot (arrival order kept within a slot).

    ``ts``, ``values`` and ``positions`` are the pushed arrays, unsorted; row ``i`` of
    the sorted arrays is pushed sample ``order[i]``. A slot's rows form one group.
    """

    ts: NDArray[np.float64]
    values: NDArray[np.floating]  # (pushed, channels), float32
    positions: NDArray[np.int64]
    order: NDArray[np.int64]  # index into the pushed arrays of each row
    slots: NDArray[np.int64]
    sorted_ts: NDArray[np.float64]
    ranks: NDArray[np.int64]  # rank of the row within its group
    starts: NDArray[np.int64]  # first row of each group
    group_first: NDArray[np.int64]  # first row of the row's group
    base: NDArray[np.int64]  # the slot's count before the push
    count_after: NDArray[np.int64]  # the slot's count with the row (from 1 after a reset)


class WindowStore:
    """Ring buffers of the last ``window`` values of every slot, and their window starts.

    Arrays indexed by slot, grown by doubling when a slot beyond capacity appears: the
    last ``window`` values of every slot, and the timestamp and position of only those
    samples a window can start at (every ``stride``-th since the last reset): a window
    reports its first and last sample's, and the last is the sample that completes it.
    At window 64, stride 8 and 8 channels that is 2,048 + 128 bytes per sensor instead
    of 2,048 + 1,024.

    ``count`` is the samples accepted since the slot's last reset (the ring index of
    sample ``c`` is ``(c - 1) % window``), ``last_ts`` and ``last_pos`` the newest
    accepted sample's timestamp (-inf when none) and position.
    """

    __slots__ = (
        "channels",
        "count",
        "last_pos",
        "last_ts",
        "n_starts",
        "start_pos",
        "start_ts",
        "stride",
        "values",
        "window",
    )

    def __init__(self, channels: int, window: int, stride: int, capacity: int) -> None:
        self.channels = channels
        self.window = window
        self.stride = stride
        capacity = max(1, capacity)
        self.values = np.zeros((capacity, window, channels), dtype=np.float32)
        # Ring of window starts: sample i (0-based since the last reset) is a start when
        # i % stride == 0 and sits at (i // stride) % n_starts. The starts held at once
        # are consecutive multiples of stride within the last `window` samples: at most
        # ceil(window / stride) of them, so none overwrites another still needed.
        self.n_starts = -(-window // stride)
        self.start_ts = np.zeros((capacity, self.n_starts), dtype=np.float64)
        self.start_pos = np.zeros((capacity, self.n_starts), dtype=np.int64)
        self.last_pos = np.zeros(capacity, dtype=np.int64)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.last_ts = np.full(capacity, -np.inf, dtype=np.float64)

    @property
    def capacity(self) -> int:
        """Number of slots the arrays currently hold."""
        return int(self.count.shape[0])

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` slots (at least doubling, so growth is amortised)."""
        cap = self.capacity
        if needed <= cap:
            return
        new = max(needed, cap * 2)

        def grown(arr: NDArray[np.generic], fill: float) -> NDArray[np.generic]:
            # np.zeros maps fresh zero pages: the new slots cost memory only once used, so
            # the peak while growing is old + copied, not old + the whole doubled array.
            out = np.zeros((new, *arr.shape[1:]), dtype=arr.dtype)
            out[:cap] = arr
            if fill != 0.0:
                out[cap:] = fill
            return out

        self.values = grown(self.values, 0.0)  # type: ignore[assignment]
        self.start_ts = grown(self.start_ts, 0.0)  # type: ignore[assignment]
        self.start_pos = grown(self.start_pos, 0)  # type: ignore[assignment]
        self.count = grown(self.count, 0)  # type: ignore[assignment]
        self.last_ts = grown(self.last_ts, -np.inf)  # type: ignore[assignment]
        self.last_pos = grown(self.last_pos, 0)  # type: ignore[assignment]

    def forget(self, slots: NDArray[np.int64] | int) -> None:
        """Start ``slots`` afresh: no samples held, and their next one is their first."""
        self.count[slots] = 0
        self.last_ts[slots] = -np.inf

    def copy_slot(self, slot: int) -> RingCopy:
        """A copy of what ``slot`` holds (unaffected by later pushes)."""
        return RingCopy(
            int(self.count[slot]),
            float(self.last_ts[slot]),
            int(self.last_pos[slot]),
            self.values[slot].copy(),
            self.start_ts[slot].copy(),
            self.start_pos[slot].copy(),
        )

    def load_slot(self, slot: int, ring: RingCopy) -> None:
        """Make ``slot`` hold what ``ring`` copied; ValueError if it is shaped for another store."""
        shapes = (ring.values.shape, ring.start_ts.shape, ring.start_pos.shape)
        wanted = ((self.window, self.channels), (self.n_starts,), (self.n_starts,))
        if shapes != wanted:
            raise ValueError(
                f"a ring of window, channels and starts {shapes} does not fit this stream's "
                f"{wanted} (window {self.window}, stride {self.stride})"
            )
        if ring.count < 1:
            raise ValueError(f"a ring copy holds at least one sample, got count {ring.count}")
        self.grow(slot + 1)
        self.count[slot] = ring.count
        self.last_ts[slot] = ring.last_ts
        self.last_pos[slot] = ring.last_pos
        self.values[slot] = ring.values
        self.start_ts[slot] = ring.start_ts
        self.start_pos[slot] = ring.start_pos

    def empty(self) -> WindowBatch:
        """A batch of no windows, shaped like this store's."""
        w, c = self.window, self.channels
        return WindowBatch(
            np.empty(0, np.int64),
            np.empty((0, w, c), np.float32),
            np.empty(0, np.float64),
            np.empty(0, np.float64),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
        )

    def gather(self, run: SortedRun, e_idx: NDArray[np.int64]) -> WindowBatch:
        """The windows that the rows ``e_idx`` of ``run`` complete (before ``write(run)``)."""
        w, stride = self.window, self.stride
        ranks, base, order = run.ranks, run.base, run.order
        # Element j of the window ending at sorted sample e is the sample j-(w-1)
        # steps back. Steps inside the batch index the sorted arrays; steps before
        # the batch index the ring (only possible when no reset happened since).
        back = np.arange(-(w - 1), 1, dtype=np.int64)
        rel = ranks[e_idx, None] + back[None, :]  # rank within batch group
        in_batch = rel >= 0
        batch_src = np.where(in_batch, run.group_first[e_idx, None] + rel, 0)
        e_slots = run.slots[e_idx]
        ring_src = (base[e_idx, None] + rel) % w
        src_sorted = order[batch_src]
        # Gather from the ring, then overwrite the steps inside the batch: one
        # window-sized array instead of two gathers and their np.where.
        data = self.values[e_slots[:, None], ring_src]
        data[in_batch] = run.values[src_sorted[in_batch]]
        # Only the first and last samples' timestamps and positions are reported; the
        # last is the emitting sample itself, always in the batch.
        first_in, first_src = in_batch[:, 0], src_sorted[:, 0]
        # A first sample from before the batch is sample base + rel since the reset: a
        # multiple of stride (a window start), held in the ring of starts.
        first_ring = ((base[e_idx] + rel[:, 0]) // stride) % self.n_starts
        last_src = src_sorted[:, -1]
        ts, positions = run.ts, run.positions
        return WindowBatch(
            e_slots,
            np.ascontiguousarray(data, dtype=np.float32),
            np.where(first_in, ts[first_src], self.start_ts[e_slots, first_ring]),
            ts[last_src],
            np.where(first_in, positions[first_src], self.start_pos[e_slots, first_ring]),
            positions[last_src],
        )

    def write(self, run: SortedRun) -> None:
        """Hold the samples of ``run``: values, window starts, counts and newest samples."""
        w, stride = self.window, self.stride
        starts, ranks, count_after = run.starts, run.ranks, run.count_after
        order, s_slots = run.order, run.slots
        n = order.shape[0]
        # Store the last `window` samples per sensor (older ones would be overwritten
        # anyway; skipping them keeps the fancy assignment free of duplicate targets).
        group_len = np.empty(n, dtype=np.int64)
        ends = np.r_[starts[1:], n]
        group_len[:] = np.repeat(ends - starts, ends - starts)
        k_idx = np.flatnonzero(ranks >= group_len - w)
        k_slots = s_slots[k_idx]
        # Ring index of a sample is (its count after - 1) % w; after a reset the count
        # restarts so the ring index restarts at 0 too.
        ring_idx = (count_after[k_idx] - 1) % w
        src = order[k_idx]
        self.values[k_slots, ring_idx] = run.values[src]
        last = ends - 1
        # Timestamps and positions of window starts only, and only those after the
        # group's last reset (an earlier one could share a ring index with a later one).
        k_count = count_after[k_idx]
        k_last = run.group_first[k_idx] + group_len[k_idx] - 1  # the group's last sample
        current = k_count + (k_last - k_idx) == count_after[k_last]
        st = np.flatnonzero(current & ((k_count - 1) % stride == 0))
        st_ring = ((k_count[st] - 1) // stride) % self.n_starts
        self.start_ts[k_slots[st], st_ring] = run.ts[src[st]]
        self.start_pos[k_slots[st], st_ring] = run.positions[src[st]]
        self.last_pos[s_slots[last]] = run.positions[order[last]]
        self.count[s_slots[last]] = count_after[last]
        self.last_ts[s_slots[last]] = run.sorted_ts[last]
