"""Alert state machine: k-of-m opening, n-normal closing, ids, attribution, persistence."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import ConfigError, DataError, StateError
from streamer.scoring.alerts import AlertBank, AlertEvent, AlertTracker, alert_id, open_flags

CHANNELS = ["temp", "pressure", "vibration", "flow"]


def feed(
    bank: AlertBank,
    flags: Sequence[bool | int],
    *,
    sensor: str = "s",
    start: int = 0,
    scores: Sequence[float] | None = None,
    errors: np.ndarray | None = None,
) -> tuple[list[AlertEvent], list[bool]]:
    """Feed one sensor's windows at positions start, start + 1, ... in one batch."""
    n = len(flags)
    idx = np.arange(start, start + n)
    flag_arr = np.array(flags, dtype=bool)
    sc = np.array(scores, dtype=np.float64) if scores is not None else np.where(flag_arr, 2.0, 0.1)
    errs = errors if errors is not None else np.ones((n, len(CHANNELS)))
    events, is_open = bank.update(
        [sensor] * n,
        [str(i) for i in idx],
        1000.0 + idx.astype(np.float64),
        sc,
        np.full(n, 1.0),
        flag_arr,
        errs,
    )
    return events, is_open.tolist()


def bank(**params: Any) -> AlertBank:
    return AlertBank(CHANNELS, **params)


class TestOpening:
    """An alert opens on the k-th anomalous window among the last m."""

    def test_opens_exactly_at_the_kth_anomalous_window(self) -> None:
        """With k=3, m=5 the pattern 1 0 1 0 1 opens on the fifth window, not before."""
        events, is_open = feed(bank(open_after=3, open_within=5), [1, 0, 1, 0, 1])
        assert is_open == [False, False, False, False, True]
        (ev,) = events
        assert ev.state == "open"
        assert ev.position == "4"
        assert ev.first_position == "0"
        assert ev.started == 1000.0
        assert ev.ended is None

    def test_first_window_is_the_earliest_anomalous_one_within_m(self) -> None:
        """An anomalous window that fell out of the last m is not the alert's first window."""
        events, _ = feed(bank(open_after=3, open_within=4), [1, 0, 0, 1, 1, 1])
        (ev,) = events
        assert ev.position == "5"
        assert ev.first_position == "3"
        assert ev.id == alert_id("s", "3")

    def test_sparse_anomalies_never_open(self) -> None:
        """k - 1 anomalous windows in every m never open an alert."""
        flags = [1, 1, 0, 0, 0] * 40
        events, is_open = feed(bank(open_after=3, open_within=5), flags)
        assert events == []
        assert not any(is_open)

    def test_k_equals_one_opens_on_the_first_anomalous_window(self) -> None:
        """With k=1 a single anomalous window opens the alert."""
        events, is_open = feed(bank(open_after=1, open_within=1), [0, 1])
        assert is_open == [False, True]
        assert [e.position for e in events] == ["1"]


class TestClosing:
    """An open alert closes after n consecutive normal windows."""

    def test_closes_after_exactly_n_normal_windows(self) -> None:
        """With n=3 the third consecutive normal window closes the alert."""
        events, is_open = feed(bank(open_after=1, open_within=1, close_after=3), [1, 1, 0, 0, 0, 0])
        assert is_open == [True, True, True, True, False, False]
        opened, closed = events
        assert closed.state == "closed"
        assert closed.position == "4"
        assert closed.ended == 1001.0  # window_end of the last anomalous window
        assert closed.id == opened.id

    def test_an_anomalous_window_resets_the_closing_run(self) -> None:
        """A single anomalous window inside the closing run restarts the count."""
        flags = [1, 0, 0, 1, 0, 0, 0]
        events, is_open = feed(bank(open_after=1, open_within=1, close_after=3), flags)
        assert is_open == [True, True, True, True, True, True, False]
        assert [e.state for e in events] == ["open", "closed"]
        assert events[1].ended == 1003.0

    def test_windows_of_a_closed_alert_do_not_count_towards_the_next(self) -> None:
        """After a close the k-of-m count starts afresh, so no alert reopens with an old id."""
        flags = [1, 1, 1, 0, 1]  # k=3, m=5, n=1: closes at 3; 4 alone must not reopen
        events, is_open = feed(bank(open_after=3, open_within=5, close_after=1), flags)
        assert [e.state for e in events] == ["open", "closed"]
        assert is_open == [False, False, True, False, False]


class TestAttribution:
    """Ids, peaks and top channels."""

    def test_alert_id_is_blake2b_of_sensor_nul_position(self) -> None:
        """alert_id is the 16-byte blake2b hex of sensor + NUL + position."""
        expected = hashlib.blake2b(b"pump-7\x0042:17", digest_size=16).hexdigest()
        assert alert_id("pump-7", "42:17") == expected
        assert alert_id("pump-7", "42:17") != alert_id("pump-8", "42:17")

    def test_id_is_deterministic_across_banks(self) -> None:
        """Two banks fed the same windows give the same alert ids."""
        flags = [0, 1, 1, 1, 0]
        a, _ = feed(bank(), flags, start=100)
        b, _ = feed(bank(), flags, start=100)
        assert a == b
        assert a[0].id == alert_id("s", "101")

    def test_peak_and_its_threshold(self) -> None:
        """The peak is the highest anomalous score (first of equals), with its threshold."""
        b = bank(open_after=2, open_within=2, close_after=1)
        n = 6
        idx = np.arange(n)
        events, _ = b.update(
            ["s"] * n,
            [str(i) for i in idx],
            idx.astype(np.float64),
            np.array([3.0, 5.0, 9.0, 9.0, 4.0, 100.0]),
            np.array([1.0, 1.5, 2.0, 2.5, 3.0, 200.0]),
            np.array([True, True, True, True, True, False]),
            np.zeros((n, len(CHANNELS))),
        )
        opened, closed = events
        assert (opened.peak_score, opened.threshold) == (5.0, 1.5)
        assert (closed.peak_score, closed.threshold) == (9.0, 2.0)

    def test_top_channels_sum_over_the_anomalous_windows(self) -> None:
        """Top channels are the summed per-channel errors of anomalous windows, highest first."""
        errors = np.array(
            [
                [1.0, 0.0, 5.0, 2.0],  # anomalous, before the alert opens: counted
                [9.0, 9.0, 9.0, 9.0],  # normal: not counted
                [1.0, 3.0, 0.0, 2.0],  # anomalous: opens
                [0.0, 4.0, 1.0, 0.5],  # anomalous
                [9.0, 9.0, 9.0, 9.0],  # normal: closes
            ]
        )
        b = bank(open_after=2, open_within=3, close_after=1, top_k=2)
        events, _ = feed(b, [1, 0, 1, 1, 0], errors=errors)
        opened, closed = events
        assert opened.top_channels == (("vibration", 5.0), ("flow", 4.0))
        assert closed.top_channels == (("pressure", 7.0), ("vibration", 6.0))


class TestBank:
    """Many sensors in one batch."""

    def test_interleaved_sensors_are_independent(self) -> None:
        """Interleaving two sensors' windows gives each the events it gets alone."""
        fa = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        fb = [0, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
        params: dict[str, Any] = {"open_after": 2, "open_within": 3, "close_after": 4}
        alone_a, open_a = feed(bank(**params), fa, sensor="a")
        alone_b, open_b = feed(bank(**params), fb, sensor="b")
        mixed = bank(**params)
        n = len(fa)
        rows = [("a", i, fa[i]) for i in range(n)] + [("b", i, fb[i]) for i in range(n)]
        rows.sort(key=lambda r: (r[1], r[0]))
        flags = np.array([r[2] for r in rows], dtype=bool)
        events, is_open = mixed.update(
            [r[0] for r in rows],
            [str(r[1]) for r in rows],
            np.array([1000.0 + r[1] for r in rows]),
            np.where(flags, 2.0, 0.1),
            np.ones(len(rows)),
            flags,
            np.ones((len(rows), len(CHANNELS))),
        )
        assert [e for e in events if e.sensor == "a"] == alone_a
        assert [e for e in events if e.sensor == "b"] == alone_b
        assert [o for r, o in zip(rows, is_open, strict=True) if r[0] == "a"] == open_a
        assert [o for r, o in zip(rows, is_open, strict=True) if r[0] == "b"] == open_b

    def test_open_alerts_snapshot(self) -> None:
        """open_alerts lists each open alert at its latest window, and only open ones."""
        b = bank(open_after=1, open_within=1, close_after=2)
        feed(b, [1, 0], sensor="x")
        feed(b, [1, 0, 0], sensor="y")
        (snap,) = b.open_alerts()
        assert snap.sensor == "x"
        assert snap.state == "open"
        assert snap.position == "1"
        assert snap.first_position == "0"
        assert b.is_open("x")
        assert not b.is_open("y")

    def test_quiet_sensors_keep_no_state(self) -> None:
        """Sensors with no pending anomaly and no open alert hold no state."""
        b = bank()
        feed(b, [0] * 10, sensor="q")
        feed(b, [1, 0, 0, 0, 0, 0], sensor="r")  # the lone anomaly expires after m windows
        assert len(b) == 0

    def test_shape_mismatch_raises_data_error(self) -> None:
        """channel_errors with the wrong number of channels raise DataError."""
        with pytest.raises(DataError, match="channel_errors"):
            bank().update(
                ["s"], ["0"], np.zeros(1), np.ones(1), np.ones(1), np.ones(1, bool), np.ones((1, 3))
            )

    @pytest.mark.parametrize(
        ("params", "message"),
        [
            ({"open_after": 0}, "open_after must be an integer >= 1, got 0"),
            ({"open_after": 4, "open_within": 3}, "open_within must be >= open_after (4), got 3"),
            ({"close_after": 0}, "close_after must be an integer >= 1, got 0"),
            ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
            ({"open_after": 2.5}, "open_after must be an integer >= 1, got 2.5"),
        ],
    )
    def test_bad_parameters_raise_config_error(self, params: dict[str, Any], message: str) -> None:
        """Invalid debounce parameters raise ConfigError naming the argument and the value."""
        with pytest.raises(ConfigError) as info:
            AlertBank(CHANNELS, **params)
        assert message in str(info.value)


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(state, allow_nan=False))
    return out


class TestPersistence:
    """export/restore carries a sensor's alert state across a restart."""

    def test_restored_open_alert_closes_and_is_not_reopened(self) -> None:
        """An alert open at export is closed (same id) after restore, never opened again."""
        params: dict[str, Any] = {"open_after": 2, "open_within": 3, "close_after": 3}
        before = bank(**params)
        (opened,), _ = feed(before, [1, 1, 0])
        after = bank(**params)
        after.restore("s", round_trip(before.export("s")))
        assert after.open_alerts() == before.open_alerts()
        events, is_open = feed(after, [1, 0, 0, 0], start=3)
        assert [e.state for e in events] == ["closed"]
        assert events[0].id == opened.id
        assert events[0].ended == 1003.0
        assert is_open == [True, True, True, False]

    def test_restore_continues_identically(self) -> None:
        """Export/restore at any row gives the same events as an uninterrupted run."""
        flags = [0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0]
        errors = np.random.default_rng(0).random((len(flags), len(CHANNELS)))
        params: dict[str, Any] = {"open_after": 2, "open_within": 3, "close_after": 3}
        whole, _ = feed(bank(**params), flags, errors=errors)
        for cut in range(len(flags) + 1):
            first = bank(**params)
            ev1, _ = feed(first, flags[:cut], errors=errors[:cut])
            second = bank(**params)
            second.restore("s", round_trip(first.export("s")))
            ev2, _ = feed(second, flags[cut:], start=cut, errors=errors[cut:])
            assert ev1 + ev2 == whole

    def test_non_finite_windows_round_trip_and_continue_identically(self) -> None:
        """Windows scored inf or NaN, with overflowed channel errors, survive export, orjson
        and restore at any row: the run continues as an uninterrupted one."""
        inf, nan = math.inf, math.nan
        flags = [1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0]
        scores = [inf, nan, 0.1, 2.0, 0.1, 0.1, 0.1, nan, 3e38, inf, 0.1, 2.0, 0.1, 0.1, 0.1]
        scores += [nan, 2.0, 0.1]
        errors = np.random.default_rng(1).random((len(flags), len(CHANNELS)))
        errors[0, 1], errors[1, 2], errors[7] = inf, nan, nan
        errors[9, 0] = -inf
        params: dict[str, Any] = {"open_after": 2, "open_within": 3, "close_after": 3}
        whole, _ = feed(bank(**params), flags, scores=scores, errors=errors)
        assert [e.state for e in whole] == ["open", "closed", "open", "closed", "open"]
        assert all(e.peak_score == inf for e in whole)
        for cut in range(len(flags) + 1):
            first = bank(**params)
            ev1, _ = feed(first, flags[:cut], scores=scores[:cut], errors=errors[:cut])
            state = first.export("s")
            json.dumps(state, allow_nan=False)  # only finite numbers (and null)
            second = bank(**params)
            second.restore("s", orjson.loads(orjson.dumps(state)))
            assert second.export("s") == state
            ev2, _ = feed(second, flags[cut:], start=cut, scores=scores[cut:], errors=errors[cut:])
            assert ev1 + ev2 == whole

    def test_non_finite_counts_as_inf(self) -> None:
        """A NaN score is the highest peak and a NaN channel error tops the attribution."""
        errors = np.array([[0.5, np.nan, 0.1, 0.2], [0.5, 0.1, np.inf, 0.2]])
        (opened,), _ = feed(
            bank(open_after=1, open_within=1), [1, 1], scores=[math.nan, 5.0], errors=errors
        )
        assert opened.peak_score == math.inf
        assert opened.top_channels[0] == ("pressure", math.inf)
        (snap,) = self.snapshots([1, 1], [math.nan, 5.0], errors)
        assert snap.peak_score == math.inf
        assert [c for c, _ in snap.top_channels[:2]] == ["pressure", "vibration"]

    @staticmethod
    def snapshots(flags: list[int], scores: list[float], errors: np.ndarray) -> list[AlertEvent]:
        b = bank(open_after=1, open_within=1)
        feed(b, flags, scores=scores, errors=errors)
        return b.open_alerts()

    def test_state_written_with_nulls_restores(self) -> None:
        """A state whose inf peak and sums orjson wrote as null (before the fix) restores."""
        b = bank(open_after=1, open_within=1)
        feed(b, [1], scores=[2.0])
        state = b.export("s")
        state["open"] = {**state["open"], "peak_score": None, "sums": [None, 1.0, 1.0, 1.0]}
        restored = bank(open_after=1, open_within=1)
        restored.restore("s", state)
        (snap,) = restored.open_alerts()
        assert snap.peak_score == math.inf and snap.top_channels[0] == ("temp", math.inf)

    @pytest.mark.parametrize(
        "corrupt",
        [
            pytest.param(lambda s: {**s, "kind": "threshold"}, id="wrong-kind"),
            pytest.param(lambda s: {**s, "version": 2}, id="wrong-version"),
            pytest.param(lambda s: {**s, "sensor": "other"}, id="wrong-sensor"),
            pytest.param(lambda s: {**s, "channels": ["a"]}, id="other-channels"),
            pytest.param(lambda s: {**s, "recent": "garbage"}, id="garbage-history"),
            pytest.param(lambda s: {**s, "recent": [[1, 2]]}, id="short-entry"),
            pytest.param(lambda s: {**s, "open": {**s["open"], "sums": [1.0]}}, id="short-sums"),
            pytest.param(lambda s: {**s, "open": {**s["open"], "normal_run": 99}}, id="bad-run"),
            pytest.param(lambda s: {**s, "open": {**s["open"], "started": None}}, id="null-time"),
            pytest.param(lambda s: {k: v for k, v in s.items() if k != "open"}, id="missing-key"),
            pytest.param(lambda s: 42, id="not-a-mapping"),
        ],
    )
    def test_restore_rejects_unusable_state(self, corrupt: Any) -> None:
        """Unusable states raise StateError and leave the sensor as it was."""
        b = bank(open_after=1, open_within=1)
        feed(b, [1])
        state = b.export("s")
        with pytest.raises(StateError):
            b.restore("s", corrupt(state))
        assert b.export("s") == state

    def test_export_of_an_unknown_sensor_is_idle(self) -> None:
        """Exporting a sensor with no state gives an idle state that restores to nothing."""
        b = bank()
        state = b.export("nobody")
        assert state["open"] is None
        assert state["recent"] == []
        assert state["sensor"] == "nobody"
        other = b.export("else")
        assert other["sensor"] == "else" and other["channels"] is not state["channels"]
        assert state == AlertTracker("nobody", CHANNELS).export()
        b.restore("nobody", state)
        assert len(b) == 0

    def test_drop_forgets_sensors(self) -> None:
        """drop removes the named sensors' state; unknown names are ignored."""
        b = bank(open_after=1, open_within=1)
        feed(b, [1], sensor="a")
        feed(b, [1], sensor="b")
        b.drop(["a", "zzz"])
        assert [e.sensor for e in b.open_alerts()] == ["b"]


def reference(flags: Sequence[bool], k: int, m: int, n: int) -> list[tuple[str, int, int]]:
    """The rules written out naively: (state, row, first row) per event."""
    events: list[tuple[str, int, int]] = []
    is_open, since, run, first = False, 0, 0, -1
    for i, flag in enumerate(flags):
        if is_open:
            run = 0 if flag else run + 1
            if run == n:
                events.append(("closed", i, first))
                is_open, since = False, i + 1
        else:
            hits = [j for j in range(max(since, i - m + 1), i + 1) if flags[j]]
            if len(hits) >= k:
                first = hits[0]
                events.append(("open", i, first))
                is_open, run = True, 0
    return events


class TestAgainstReference:
    """The tracker matches the naive reference on random flag sequences and batch cuts."""

    @settings(max_examples=200, deadline=None)
    @given(
        flags=st.lists(st.booleans(), max_size=80),
        k=st.integers(1, 4),
        extra=st.integers(0, 3),
        n=st.integers(1, 5),
        cuts=st.lists(st.integers(0, 80), max_size=4),
    )
    def test_matches_reference(
        self, flags: list[bool], k: int, extra: int, n: int, cuts: list[int]
    ) -> None:
        """Events (state, position, first position) equal the reference's, whatever the batching."""
        b = bank(open_after=k, open_within=k + extra, close_after=n)
        got: list[AlertEvent] = []
        bounds = [0, *sorted(c for c in cuts if c <= len(flags)), len(flags)]
        for lo, hi in itertools.pairwise(bounds):
            if hi > lo:
                ev, _ = feed(b, flags[lo:hi], start=lo)
                got += ev
        expected = reference(flags, k, k + extra, n)
        assert [(e.state, int(e.position), int(e.first_position)) for e in got] == expected

    @settings(max_examples=50, deadline=None)
    @given(flags=st.lists(st.booleans(), max_size=60))
    def test_single_tracker_matches_the_bank(self, flags: list[bool]) -> None:
        """An AlertTracker fed row by row emits what the bank emits for the same sensor."""
        tracker = AlertTracker("s", CHANNELS, 2, 4, 3, 3)
        one = [
            tracker.update(str(i), 1000.0 + i, 2.0 if f else 0.1, 1.0, f, np.ones(len(CHANNELS)))
            for i, f in enumerate(flags)
        ]
        events, _ = feed(bank(open_after=2, open_within=4, close_after=3), flags)
        assert [e for e in one if e is not None] == events


class TestOpenFlags:
    """``open_flags`` replays the tracker's open and close rule alone."""

    @settings(max_examples=300, deadline=None)
    @given(
        flags=st.lists(st.booleans(), max_size=200),
        rule=st.tuples(st.integers(1, 6), st.integers(0, 6), st.integers(1, 8)),
    )
    def test_equals_the_tracker(self, flags: list[bool], rule: tuple[int, int, int]) -> None:
        k, extra, n = rule
        m = k + extra
        tracker = AlertTracker("s", ["c"], k, m, n, top_k=1)
        want = []
        for i, hit in enumerate(flags):
            tracker.update(str(i), float(i), 2.0 if hit else 0.0, 1.0, hit, np.ones(1))
            want.append(tracker.is_open)
        np.testing.assert_array_equal(open_flags(flags, k, m, n), np.array(want, dtype=bool))
