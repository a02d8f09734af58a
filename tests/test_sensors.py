"""SensorStore: every sensor's ring, threshold and alert tracker, kept and dropped together."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamer.codec import to_position
from streamer.errors import StateError
from streamer.scoring.alerts import AlertBank
from streamer.scoring.thresholds import ThresholdBank, make_threshold
from streamer.sensors import SensorStore
from streamer.windows import RingWindows, SensorIndex

CHANNELS = ["a", "b"]


def store(calibration_seed: int = 1) -> SensorStore:
    proto = make_threshold("spot", risk=1e-3, level=0.95)
    proto.calibrate(np.random.default_rng(calibration_seed).exponential(size=500))
    return SensorStore(
        SensorIndex(),
        RingWindows(len(CHANNELS), 4, 2, max_gap_s=300.0),
        ThresholdBank(proto),
        AlertBank(CHANNELS, 1, 1, 1, 1),
    )


def feed(s: SensorStore, sensor: str, n: int, first_offset: int = 0) -> None:
    slots = s.index.slots([sensor] * n)
    s.windows.push(
        slots,
        np.arange(n, dtype=np.float64),
        np.zeros((n, len(CHANNELS)), np.float32),
        to_position(np.zeros(n, dtype=np.int64), np.arange(first_offset, first_offset + n)),
    )


def test_forget_drops_ring_threshold_and_alerts_in_one_call() -> None:
    s = store()
    feed(s, "x", 3)
    s.thresholds.step(["x"], np.array([0.1]))
    s.alerts.restore("x", s.alerts.export("x"))
    assert s.learned("x") and "x" in s.index
    s.forget(["x", "never-seen"])
    assert not s.learned("x") and "x" not in s.index
    assert s.snapshot("x", copy=True).threshold is None


def test_release_rings_keeps_what_the_sensor_learned() -> None:
    s = store()
    feed(s, "x", 3)
    s.thresholds.step(["x"], np.array([0.1]))
    s.release_rings(["x"])
    assert "x" not in s.index and s.learned("x")


def test_a_snapshot_copy_does_not_move_with_later_scores() -> None:
    s = store()
    s.thresholds.step(["x"], np.array([0.1]))
    copied, live = s.snapshot("x", copy=True), s.snapshot("x", copy=False)
    before = s.export(copied)
    s.thresholds.step(["x"] * 200, np.random.default_rng(2).exponential(size=200) + 2.0)
    assert s.export(copied) == before
    assert s.export(live) != before


def test_a_snapshot_copy_settles_an_owed_refit_once_for_sensor_and_copy() -> None:
    """A threshold owing a refit from a batch step refits before it is copied, so that
    neither the copy's export nor the sensor's next step does it again."""
    s = store()
    proto = s.thresholds.prototype
    names = [f"s{i}" for i in range(20)]
    # Between t (the 0.95 quantile) and z_q: a peak for every sensor, each refit owed.
    peak = float(np.quantile(np.random.default_rng(1).exponential(size=500), 0.97))
    assert not s.thresholds.step(names, np.full(20, peak)).anomalous.any()
    owing = s.thresholds.get("s0")
    assert owing is not None and owing.unsettled
    copied = s.snapshot("s0", copy=True).threshold
    assert copied is not None and not copied.unsettled and not owing.unsettled
    alone = proto.clone()
    alone.step(np.array([peak]))
    assert s.export(s.snapshot("s0", copy=False)) == s.thresholds.export("s0", of=alone)


def test_restore_is_all_or_nothing_and_reports_a_stale_threshold() -> None:
    s = store()
    s.thresholds.step(["x"], np.array([0.1]))
    state = s.snapshot("x", copy=True)
    threshold, alerts = s.export(state), state.alerts
    other = store(calibration_seed=2)  # another model's calibration
    assert other.restore("x", threshold, alerts) is True
    assert store().restore("x", threshold, alerts) is False
    broken = store()
    with pytest.raises(StateError):
        broken.restore("x", threshold, {"kind": "alert_tracker", "version": 99})
    assert not broken.learned("x")  # no threshold left without its alerts


def test_missed_anchors_are_voided_and_say_whether_the_ring_is_empty() -> None:
    s = store()
    s.anchor("gone", to_position(0, 5), 1)
    feed(s, "held", 1, first_offset=3)
    s.anchor("held", to_position(0, 9), 1)
    s.anchor("later", to_position(0, 50), 1)
    missed = s.missed_anchors(lambda pos: int(pos) & ((1 << 40) - 1) <= 10)
    assert sorted(missed) == [("gone", to_position(0, 5), True), ("held", to_position(0, 9), False)]
    assert list(s.windows.anchors.values()) == [(to_position(0, 50), 1)]


def test_a_saved_ring_goes_through_json_and_continues_in_another_store() -> None:
    s = store()
    feed(s, "x", 3, first_offset=40)
    saved = orjson.loads(orjson.dumps(s.saved_ring("x")))
    other = store()
    other.load_ring("x", other.ring_copy(saved))
    assert other.rings(["x"]).oldest_pos.tolist() == s.rings(["x"]).oldest_pos.tolist()
    slot = other.index.slot("x")
    assert other.windows.copy_ring(slot).values.tobytes() == (
        s.windows.copy_ring(s.index.slot("x")).values.tobytes()
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"count": 0}, "count 0"),
        ({"last_pos": -1}, "last_pos -1"),
        ({"last_ts": None}, "last_ts must be a finite number"),
        ({"start_pos": ["a"]}, "start_pos must be a list of integers"),
        ({"values": "%%"}, "not base64"),
        ({"values": "AAAAAA=="}, "holds 1 values, this stream's window x channels is 4 x 2"),
        ({"start_ts": "AAAAAAAAAAA="}, "holds 1 window starts"),
    ],
)
def test_a_bad_saved_ring_says_what_is_wrong(change: dict[str, object], why: str) -> None:
    s = store()
    feed(s, "x", 3)
    saved = {**s.saved_ring("x"), **change}
    with pytest.raises(StateError, match=why):
        s.ring_copy(saved)
