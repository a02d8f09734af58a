"""Ring-buffer windows against a naive per-sample reference."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from streamer.errors import ConfigError, DataError
from streamer.windows import RingWindows, SensorIndex


class NaiveWindows:
    """The obvious per-sample implementation of the documented policy."""

    def __init__(self, window: int, stride: int, max_gap_s: float) -> None:
        self.window, self.stride, self.max_gap_s = window, stride, max_gap_s
        self.buf: dict[int, list[tuple[float, int, np.ndarray]]] = defaultdict(list)
        self.count: dict[int, int] = defaultdict(int)
        self.last: dict[int, float] = {}

    def push(self, slot: int, ts: float, pos: int, vals: np.ndarray) -> tuple[str, object]:
        last = self.last.get(slot)
        if last is not None and ts <= last and last - ts <= self.max_gap_s:
            return ("rejected", None)
        # A gap forward, or a clock set back by more than the gap: start afresh.
        reset = last is not None and abs(ts - last) > self.max_gap_s
        if reset:
            self.buf[slot].clear()
            self.count[slot] = 0
        self.last[slot] = ts
        self.buf[slot].append((ts, pos, vals))
        self.buf[slot] = self.buf[slot][-self.window :]
        self.count[slot] += 1
        c = self.count[slot]
        if c >= self.window and (c - self.window) % self.stride == 0:
            return ("window", list(self.buf[slot]))
        return ("reset" if reset else "ok", None)


samples = st.lists(
    st.tuples(
        st.integers(0, 3),  # slot
        # Timestamp increment (<= 0: out of order / duplicate; -20: a clock set back).
        st.one_of(st.integers(-2, 9), st.just(-20)),
    ),
    min_size=0,
    max_size=120,
)


class TestRingWindowsAgainstReference:
    """Every batch split gives exactly the reference's windows, rejections and resets."""

    @settings(max_examples=150, deadline=None)
    @given(
        data=samples,
        window=st.integers(2, 6),
        stride_frac=st.integers(1, 6),
        cuts=st.lists(st.integers(0, 120), max_size=6),
        max_gap=st.sampled_from([5.0, 8.0, 1e9]),
    )
    def test_matches_naive(
        self,
        data: list[tuple[int, int]],
        window: int,
        stride_frac: int,
        cuts: list[int],
        max_gap: float,
    ) -> None:
        """Windows, timestamps, positions, rejections and resets equal the naive loop."""
        stride = min(stride_frac, window)
        rng = np.random.default_rng(len(data))
        clock = defaultdict(float)
        slots, ts = [], []
        for slot, inc in data:
            clock[slot] += inc
            slots.append(slot)
            ts.append(clock[slot])
        n = len(slots)
        vals = rng.normal(size=(n, 2)).astype(np.float32)
        pos = np.arange(n, dtype=np.int64) * 10

        naive = NaiveWindows(window, stride, max_gap)
        exp_windows, exp_rejected, exp_resets = [], [], []
        for i in range(n):
            kind, payload = naive.push(slots[i], ts[i], int(pos[i]), vals[i])
            if kind == "rejected":
                exp_rejected.append(i)
            if kind == "window":
                exp_windows.append((slots[i], payload))
        # Resets from the reference: recompute by replaying the gap rule.
        last: dict[int, float] = {}
        for i in range(n):
            s = slots[i]
            if s in last and ts[i] <= last[s]:
                if last[s] - ts[i] > max_gap:
                    exp_resets.append(i)  # a clock set back
                    last[s] = ts[i]
                continue
            if s in last and ts[i] - last[s] > max_gap:
                exp_resets.append(i)
            last[s] = ts[i]

        ring = RingWindows(channels=2, window=window, stride=stride, max_gap_s=max_gap, capacity=1)
        bounds = sorted({0, n, *[min(c, n) for c in cuts]})
        got_windows, got_rejected, got_resets = [], [], []
        for lo, hi in itertools.pairwise(bounds):
            res = ring.push(
                np.array(slots[lo:hi], dtype=np.int64),
                np.array(ts[lo:hi]),
                vals[lo:hi],
                pos[lo:hi],
            )
            got_rejected += [lo + int(i) for i in res.rejected]
            got_resets += [lo + int(i) for i in res.resets]
            wb = res.windows
            # Batch output is grouped by slot; order windows by their last position.
            for k in np.argsort(wb.end_pos, kind="stable"):
                got_windows.append((int(wb.slots[k]), wb, int(k)))

        assert got_rejected == exp_rejected
        assert got_resets == exp_resets
        exp_windows.sort(key=lambda item: item[1][-1][1])
        assert len(got_windows) == len(exp_windows)
        for (slot, wb, k), (eslot, payload) in zip(got_windows, exp_windows, strict=True):
            assert slot == eslot
            np.testing.assert_array_equal(wb.data[k], np.stack([p[2] for p in payload]))
            assert wb.start_ts[k] == payload[0][0]
            assert wb.end_ts[k] == payload[-1][0]
            assert wb.start_pos[k] == payload[0][1]
            assert wb.end_pos[k] == payload[-1][1]


class TestRingWindowsBasics:
    """Shape, policy and validation behaviour."""

    def test_window_count_for_regular_stream(self) -> None:
        """N samples give floor((N - W) / S) + 1 windows per sensor."""
        w, s, n = 8, 3, 50
        ring = RingWindows(channels=3, window=w, stride=s)
        slots = np.repeat(np.arange(4), n)
        ts = np.tile(np.arange(n, dtype=float), 4)
        res = ring.push(slots, ts, np.zeros((4 * n, 3)), np.arange(4 * n))
        assert len(res.windows) == 4 * ((n - w) // s + 1)
        assert res.windows.data.shape[1:] == (w, 3)

    @pytest.mark.parametrize("n", [0, 5, 8, 9, 10, 11, 12, 50])
    def test_unscored_counts_samples_in_no_window_emitted(self, n: int) -> None:
        """What a reset would lose: the samples after the last window emitted's end."""
        w, s = 8, 3
        ring = RingWindows(channels=1, window=w, stride=s)
        res = ring.push(
            np.zeros(n, np.int64), np.arange(n, dtype=float), np.zeros((n, 1)), np.arange(n)
        )
        last_end = int(res.windows.end_pos.max()) if len(res.windows) else -1
        assert ring.unscored(0) == n - 1 - last_end
        assert ring.unscored(0) <= max(s - 1, 0) or len(res.windows) == 0

    def test_gap_resets_buffer(self) -> None:
        """After a gap longer than max_gap_s the next window starts after the gap."""
        ring = RingWindows(channels=1, window=4, stride=4, max_gap_s=10)
        ts = np.array([0, 1, 2, 100, 101, 102, 103], dtype=float)
        res = ring.push(np.zeros(7, np.int64), ts, np.arange(7.0)[:, None], np.arange(7))
        assert list(res.resets) == [3]
        assert len(res.windows) == 1
        assert res.windows.start_ts[0] == 100

    def test_oldest_position_rebuilds(self) -> None:
        """oldest_position is the first sample of the next window (-1 for an empty slot)."""
        ring = RingWindows(channels=1, window=4, stride=1)
        ring.push(np.zeros(10, np.int64), np.arange(10.0), np.zeros((10, 1)), np.arange(100, 110))
        # The next window ends at the 11th sample and starts at the 8th (position 107).
        assert ring.oldest_position(np.array([0, 5]))[0] == 107
        assert ring.oldest_position(np.array([0, 5]))[1] == -1

    @pytest.mark.parametrize(
        ("stride", "n", "expected"),
        [
            (2, 10, (108, 9)),  # windows end at counts 4, 6, 8, 10; the next starts at 9
            (4, 10, (108, 9)),  # windows end at 4, 8; the next (12) starts at 9, held
            (4, 8, (107, 8)),  # the next window starts after the newest sample
            (2, 3, (100, 1)),  # no window yet: the first starts at the first sample
        ],
    )
    def test_oldest_is_next_window_start(
        self, stride: int, n: int, expected: tuple[int, int]
    ) -> None:
        """oldest gives the next window's first sample if held, else the newest sample."""
        ring = RingWindows(channels=1, window=4, stride=stride)
        ring.push(
            np.zeros(n, np.int64), np.arange(float(n)), np.zeros((n, 1)), np.arange(100, 100 + n)
        )
        pos, count = ring.oldest(np.array([0], dtype=np.int64))
        assert (int(pos[0]), int(count[0])) == expected

    def test_last_ts_of_matches_last_ts(self) -> None:
        """The array form gives each slot's newest timestamp, -inf where none is held."""
        ring = RingWindows(channels=1, window=4, stride=1, capacity=4)
        slots = np.array([0, 2, 0, 2, 2], dtype=np.int64)
        ring.push(slots, np.array([1.0, 5.0, 2.0, 6.0, 7.5]), np.zeros((5, 1)), np.arange(5))
        ring.reset([2])
        ring.push(np.array([2], np.int64), np.array([9.0]), np.zeros((1, 1)), np.array([5]))
        query = np.array([0, 1, 2, 3, 1_000], dtype=np.int64)
        got = ring.last_ts_of(query)
        assert got.tolist() == [2.0, -np.inf, 9.0, -np.inf, -np.inf]
        assert got.tolist() == [ring.last_ts(int(q)) for q in query]

    def test_bad_arguments(self) -> None:
        """Invalid construction and mismatched arrays raise errors naming the value."""
        with pytest.raises(ConfigError, match="stride"):
            RingWindows(channels=1, window=4, stride=5)
        with pytest.raises(ConfigError, match="window"):
            RingWindows(channels=1, window=1, stride=1)
        ring = RingWindows(channels=2, window=4, stride=1)
        with pytest.raises(DataError, match="values"):
            ring.push(np.zeros(3, np.int64), np.arange(3.0), np.zeros((3, 5)), np.arange(3))


class TestSensorIndex:
    """Key-to-slot mapping."""

    def test_slots_are_stable_and_reused(self) -> None:
        """The same key keeps its slot; released slots are handed to new keys."""
        idx = SensorIndex()
        first = idx.slots(np.array(["a", "b", "a", "c"], dtype=object))
        assert list(first) == [first[0], first[1], first[0], first[3]]
        assert len(set(first.tolist())) == 3
        freed = idx.release(["b"])
        assert idx.slot("d") == freed[0]
        assert idx.key(int(first[0])) == "a"

    def test_new_keys_in_a_batch_take_slots_in_order_of_appearance(self) -> None:
        """Known keys keep their slots; new ones (repeated or not) are allocated once each."""
        idx = SensorIndex()
        assert idx.slots(np.array(["k", "j"], dtype=object)).tolist() == [0, 1]
        idx.release(["k"])
        got = idx.slots(np.array(["x", "j", "y", "x", "j", "y", "z"], dtype=object))
        assert got.tolist() == [0, 1, 2, 0, 1, 2, 3]  # "x" reuses k's slot
        assert [idx.key(s) for s in got.tolist()] == ["x", "j", "y", "x", "j", "y", "z"]
        assert idx.slots([]).tolist() == []


def timeline(
    data: list[tuple[int, int]], channels: int, first_position: int
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float32], NDArray[np.int64]]:
    """Slots, timestamps (each slot's clock moved on by its increments), values, positions."""
    clock: dict[int, float] = defaultdict(float)
    ts_l = []
    for slot, inc in data:
        clock[slot] += inc
        ts_l.append(clock[slot])
    n = len(data)
    return (
        np.array([slot for slot, _ in data], dtype=np.int64),
        np.array(ts_l, dtype=np.float64),
        np.random.default_rng(n).normal(size=(n, channels)).astype(np.float32),
        np.arange(n, dtype=np.int64) + first_position,
    )


class TestRingWindowsAnchor:
    """A replay from a commit point, anchored, emits exactly the original run's later windows."""

    @settings(max_examples=150, deadline=None)
    @given(
        data=samples,
        window=st.integers(2, 6),
        stride_frac=st.integers(1, 6),
        commit_frac=st.floats(0.0, 1.0),
        start_frac=st.floats(0.0, 1.0),
        cuts=st.lists(st.integers(0, 120), max_size=4),
        max_gap=st.sampled_from([5.0, 8.0, 1e9]),
    )
    def test_replay_matches_original(
        self,
        data: list[tuple[int, int]],
        window: int,
        stride_frac: int,
        commit_frac: float,
        start_frac: float,
        cuts: list[int],
        max_gap: float,
    ) -> None:
        """Windows after the commit match the original run wherever before it the replay starts."""
        stride = min(stride_frac, window)
        slots, ts, vals, pos = timeline(data, channels=2, first_position=1000)
        slots_l, n = slots.tolist(), len(slots)

        def run(
            ring: RingWindows, lo: int, hi: int, bounds: list[int]
        ) -> list[tuple[int, int, bytes]]:
            out = []
            edges = sorted({lo, hi, *[min(max(c, lo), hi) for c in bounds]})
            for a, b in itertools.pairwise(edges):
                wb = ring.push(slots[a:b], ts[a:b], vals[a:b], pos[a:b]).windows
                out += [
                    (
                        int(wb.slots[k]),
                        int(wb.end_pos[k]),
                        wb.data[k].tobytes() + wb.start_ts[k].tobytes() + wb.start_pos[k].tobytes(),
                    )
                    for k in range(len(wb))
                ]
            return out

        original = RingWindows(channels=2, window=window, stride=stride, max_gap_s=max_gap)
        commit = int(commit_frac * n)  # samples [0, commit) were processed before the "crash"
        before = run(original, 0, commit, [])
        live = sorted(set(slots_l[:commit]))
        oldest_pos, oldest_count = original.oldest(np.array(live, dtype=np.int64))
        held = [
            (s, int(p), int(c))
            for s, p, c in zip(live, oldest_pos, oldest_count, strict=True)
            if c > 0
        ]
        after = run(original, commit, n, [])
        del before

        # The replay may start anywhere at or before the oldest held sample of every slot.
        start_max = min([p - 1000 for _, p, _ in held], default=commit)
        start = int(start_frac * start_max)
        replay = RingWindows(channels=2, window=window, stride=stride, max_gap_s=max_gap)
        for s, p, c in held:
            replay.set_anchor(s, p, c)
        got = [w for w in run(replay, start, n, cuts) if w[1] >= commit + 1000]
        assert sorted(got, key=lambda w: w[1]) == sorted(after, key=lambda w: w[1])

    def test_anchor_sets_count(self) -> None:
        """The anchored sample takes the given count, so the stride phase follows it."""
        ring = RingWindows(channels=1, window=4, stride=2)
        ring.set_anchor(0, 105, 3)
        res = ring.push(
            np.zeros(6, np.int64), np.arange(6.0), np.zeros((6, 1)), np.arange(100, 106)
        )
        # Before the anchor the replay counts from its own start (window at its 4th sample).
        assert list(res.windows.end_pos) == [103]
        assert ring.count(0) == 3
        assert ring.anchors == {}
        res = ring.push(
            np.zeros(3, np.int64), np.arange(6.0, 9.0), np.zeros((3, 1)), np.arange(106, 109)
        )
        # Counts 4, 5, 6: windows at counts 4 and 6 ((count - 4) % 2 == 0).
        assert list(res.windows.end_pos) == [106, 108]

    def test_bad_anchor(self) -> None:
        """A count below one is refused."""
        ring = RingWindows(channels=1, window=4, stride=2)
        with pytest.raises(DataError, match="count"):
            ring.set_anchor(0, 5, 0)


class TestClockJumps:
    """A clock set back by more than max_gap_s restarts the sensor instead of locking it out."""

    def test_jump_back_resets_and_small_disorder_is_still_rejected(self) -> None:
        ring = RingWindows(channels=1, window=3, stride=1, max_gap_s=10.0)
        ts = np.array([100.0, 101.0, 102.0, 101.5, 5.0, 6.0, 7.0, 8.0])
        vals = np.arange(8, dtype=np.float32).reshape(-1, 1)
        res = ring.push(np.zeros(8, dtype=np.int64), ts, vals, np.arange(8, dtype=np.int64))
        assert res.rejected.tolist() == [3]  # 0.5 s back: a straggler, rejected
        assert res.resets.tolist() == [4]  # 97 s back: the clock was set back
        # Windows: [100, 101, 102], then after the reset [5, 6, 7] and [6, 7, 8].
        assert res.windows.end_ts.tolist() == [102.0, 7.0, 8.0]
        assert res.windows.start_ts.tolist() == [100.0, 5.0, 6.0]
        assert ring.last_ts(0) == 8.0

    def test_far_future_sample_does_not_lock_the_sensor_out(self) -> None:
        ring = RingWindows(channels=1, window=2, stride=1, max_gap_s=60.0)
        one = np.zeros(1, dtype=np.int64)
        vals = np.ones((1, 1), dtype=np.float32)
        ring.push(one, np.array([1000.0]), vals, np.array([0]))
        ring.push(one, np.array([253402300799.0]), vals, np.array([1]))  # year 9999
        res = ring.push(one, np.array([1001.0]), vals, np.array([2]))
        assert res.rejected.size == 0 and res.resets.tolist() == [0]
        res = ring.push(one, np.array([1002.0]), vals, np.array([3]))
        assert res.windows.end_ts.tolist() == [1002.0]


class TestRingCopy:
    """A slot's ring copied and loaded elsewhere (a parked sensor's restart) continues exactly."""

    @settings(max_examples=150, deadline=None)
    @given(
        data=samples,
        window=st.integers(2, 6),
        stride_frac=st.integers(1, 6),
        cut_frac=st.floats(0.0, 1.0),
        max_gap=st.sampled_from([5.0, 8.0, 1e9]),
    )
    def test_loaded_copy_emits_the_original_windows(
        self,
        data: list[tuple[int, int]],
        window: int,
        stride_frac: int,
        cut_frac: float,
        max_gap: float,
    ) -> None:
        """After the cut, a ring loaded from copies emits what the original emits, bytes and all."""
        stride = min(stride_frac, window)
        slots, ts, vals, pos = timeline(data, channels=3, first_position=500)
        slots_l, n = slots.tolist(), len(slots)
        cut = int(cut_frac * n)

        def emitted(ring: RingWindows, lo: int, hi: int, moved: int = 0) -> list[tuple[Any, ...]]:
            wb = ring.push(slots[lo:hi] + moved, ts[lo:hi], vals[lo:hi], pos[lo:hi]).windows
            return [
                (
                    int(wb.slots[k]) - moved,
                    wb.data[k].tobytes(),
                    float(wb.start_ts[k]),
                    float(wb.end_ts[k]),
                    int(wb.start_pos[k]),
                    int(wb.end_pos[k]),
                )
                for k in range(len(wb))
            ]

        original = RingWindows(channels=3, window=window, stride=stride, max_gap_s=max_gap)
        emitted(original, 0, cut)
        # Loaded into other slots of a fresh ring, as a restart's slot numbering would.
        loaded = RingWindows(channels=3, window=window, stride=stride, max_gap_s=max_gap)
        for slot in sorted(set(slots_l[:cut])):
            loaded.load_ring(slot + 7, original.copy_ring(slot))
        assert emitted(loaded, cut, n, moved=7) == emitted(original, cut, n)

    def test_a_copy_for_another_shape_is_refused_and_an_empty_slot_has_none(self) -> None:
        ring = RingWindows(channels=2, window=4, stride=2)
        ring.push(np.zeros(3, np.int64), np.arange(3.0), np.ones((3, 2)), np.arange(3))
        copy = ring.copy_ring(0)
        assert copy.count == 3 and copy.last_pos == 2 and copy.last_ts == 2.0
        with pytest.raises(DataError, match=r"does not fit .*window 5, stride 2"):
            RingWindows(channels=2, window=5, stride=2).load_ring(0, copy)
        with pytest.raises(DataError, match="holds no samples"):
            ring.copy_ring(1)
