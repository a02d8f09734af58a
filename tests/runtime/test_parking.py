"""Parked sensors: a silent sensor's partial window is saved with its state, not anchored.

Over the runtime rig (real stores and partition table, fake producer and committer):
a sensor quiet for ``stream.park_after_s`` stops holding the commit back, its record
carries the samples of its partial window, a restore from that record continues the
window exactly, and once the sensor's next window needs nothing the commit covered it
is anchored again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from streamer.codec import to_position
from streamer.config import StreamConfig
from streamer.metrics import Metrics
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.sensors import parse_record
from tests.runtime.conftest import CHANNELS, STATE_TOPIC, Rig, new_store


def feed(rig: Rig, sensor: str, ts: list[float], offset: int) -> int:
    """One sample of ``sensor`` per timestamp at consecutive offsets of partition 0."""
    for i, t in enumerate(ts):
        rig.consume(0, [sensor], first_offset=offset + i, ts=t)
    return offset + len(ts)


def records(rig: Rig) -> dict[str, dict[str, Any]]:
    """The latest state record per sensor, as the compacted topic would keep it."""
    out = {}
    for topic, value, key, _ in rig.producer.records:
        if topic == STATE_TOPIC and value is not None:
            out[key] = orjson.loads(value)
    return out


def quiet_and_busy(rig: Rig) -> int:
    """q sends two samples (a partial window) and falls silent; b runs on 100 s past it."""
    rig.assign(0)
    nxt = feed(rig, "q", [0.0, 1.0], 0)
    return feed(rig, "b", [float(t) for t in range(100)], nxt)


def test_a_quiet_sensor_is_parked_and_no_longer_holds_the_commit(rig: Rig) -> None:
    h = quiet_and_busy(rig) - 1
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    rec = records(rig)["q"]
    assert rec["version"] == 3 and rec["upto"] == h
    saved = rec["ring"]["saved"]
    assert (saved["count"], saved["last_ts"], saved["last_pos"]) == (2, 1.0, to_position(0, 1))
    # b's record is anchored as before, and written as version 2.
    assert records(rig)["b"]["version"] == 2 and "anchor_offset" in records(rig)["b"]["ring"]
    committed = rig.committer.sync[-1][0][0]
    assert committed == records(rig)["b"]["ring"]["anchor_offset"] > 1
    assert "q" in rig.table.parked and "q" not in rig.table.anchor_offset


def test_parking_is_off_at_zero_and_the_commit_stays_at_the_partial_window(rig: Rig) -> None:
    rig.table.stream = StreamConfig(channels=CHANNELS, park_after_s=0.0)
    quiet_and_busy(rig)
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    assert records(rig)["q"]["ring"] == {"anchor_offset": 0, "anchor_count": 1}
    assert rig.committer.sync[-1][0][0] == 0


def test_a_restored_parked_sensor_continues_its_window_and_skips_what_it_holds(rig: Rig) -> None:
    h = quiet_and_busy(rig) - 1
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    value = orjson.dumps(records(rig)["q"])

    stores = new_store()
    table = PartitionTable(stores, StreamConfig(channels=CHANNELS), Metrics(), Counters())
    part = table.parts[0] = Partition(partition=0, committed_h=h, restored_h=h)
    table.apply(part, parse_record(b"q", value, 0), start=rig.committer.sync[-1][0][0])
    assert table.sensor_part["q"] == 0 and "q" in part.sensors
    assert table.parked.resume == {"q": to_position(0, 1)} and "q" in table.parked
    # Two more samples complete q's first window: its first two rows are the saved ones.
    values = np.array([[1, 2], [3, 4]], dtype=np.float32)
    pushed = stores.windows.push(
        stores.index.slots(["q", "q"]),
        np.array([200.0, 201.0]),
        values,
        to_position(np.zeros(2, np.int64), np.array([h + 1, h + 2])),
    )
    (window,) = pushed.windows.data
    assert window[2:].tolist() == values.tolist() and window[:2].tolist() == [[0, 0], [0, 0]]
    assert pushed.windows.start_pos.tolist() == [to_position(0, 0)]
    # A replay from the commit meets q's saved samples again: they are dropped, not pushed.
    keys = np.array(["q", "q", "b"], dtype=object)
    held = table.parked.held(keys, to_position(np.zeros(3, np.int64), np.array([0, 2, 1])))
    assert held.tolist() == [True, False, False]
    # The replay went past the saved samples: the resume mark is done with.
    part.consumed = h + 2
    table.snapshot(0)
    assert table.parked.resume == {}


def test_a_returning_sensor_is_saved_again_then_anchored_past_the_commit(rig: Rig) -> None:
    nxt = quiet_and_busy(rig)
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    h = rig.table.parts[0].committed_h
    assert h == nxt - 1
    # One sample back: its next window still starts at its first sample (offset 0, which
    # the commit covered), so it stays parked and its saved ring grows.
    nxt = feed(rig, "q", [101.0], nxt)
    rig.producer.records.clear()
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    assert records(rig)["q"]["ring"]["saved"]["count"] == 3
    # Two more: a window out (counts 1-4), the next one starts at count 3, after the commit.
    third = nxt
    nxt = feed(rig, "q", [102.0, 103.0], nxt)
    rig.producer.records.clear()
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    assert records(rig)["q"]["ring"] == {"anchor_offset": third - 1, "anchor_count": 3}
    assert "q" not in rig.table.parked and rig.table.anchor_offset["q"] == third - 1


def test_an_unchanged_parked_sensor_writes_no_record_again(rig: Rig) -> None:
    nxt = quiet_and_busy(rig)
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    feed(rig, "b", [100.0], nxt)
    rig.producer.records.clear()
    rig.score("b")
    rig.rounds.run([0], "shutdown", drain=lambda: None)
    assert rig.producer.state_keys() == ["b"]
