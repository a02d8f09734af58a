"""State records: those written by earlier builds restore; one version covers a record.

``data/state_record_v1.json`` was written by the daemon as it was before the
runtime split (record v1, SPOT threshold state v2, alert state v1): a sensor with 50
scores, a threshold of 8.834337272919663 and a ring anchor at offset 4650.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from streamer.config import StreamConfig
from streamer.errors import StateError
from streamer.metrics import Metrics
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.state import commit_head, commit_metadata
from streamer.scoring.alerts import AlertBank
from streamer.scoring.thresholds import ThresholdBank, make_threshold
from streamer.sensors import RECORD_VERSION, SensorStore, encode_record, parse_record
from streamer.windows import RingWindows, SensorIndex

STORED = Path(__file__).parent / "data" / "state_record_v1.json"


def stores_of_that_build() -> SensorStore:
    """The stores as that daemon had them: the same calibration, channels and window."""
    proto = make_threshold("spot", risk=1e-3, level=0.98, max_peaks=1000)
    proto.calibrate(np.random.default_rng(7).gamma(2.0, 1.0, 2000))
    return SensorStore(
        SensorIndex(),
        RingWindows(2, 16, 4, max_gap_s=300.0),
        ThresholdBank(proto),
        AlertBank(["temp", "pressure"], 2, 3, 2, 1),
    )


def test_a_stored_record_restores_threshold_alerts_anchor_and_replay_mark() -> None:
    stores = stores_of_that_build()
    table = PartitionTable(
        stores, StreamConfig(channels=["temp", "pressure"]), Metrics(), Counters()
    )
    part = table.parts[2] = Partition(partition=2, committed_h=4700, restored_h=4700)
    rec = parse_record(b"pump-7", STORED.read_bytes(), 2)
    table.apply(part, rec, start=4600)
    th = stores.thresholds.get("pump-7")
    assert th is not None and th.value == 8.834337272919663
    assert table.anchor_offset["pump-7"] == 4650 and table.sensor_part["pump-7"] == 2
    slot = stores.index.slot("pump-7")
    assert stores.windows.anchors[slot] == ((2 << 40) | 4650, 129)
    # Its windows up to 4711 were published: the replay skips them.
    assert part.skip == {"pump-7": 4711} and part.replay_until == 4711


def rewritten(stores: SensorStore, rec_bytes: bytes) -> tuple[bytes, float]:
    """Restore a record, write it again as today's build does; and the threshold."""
    rec = parse_record(b"pump-7", rec_bytes, 2)
    assert not stores.restore("pump-7", rec.threshold, rec.alerts)
    state = stores.snapshot("pump-7", copy=False)
    th = stores.thresholds.get("pump-7")
    assert th is not None
    again = encode_record("pump-7", 2, rec.upto, rec.ring, stores.export(state), state.alerts)
    return again, th.value


def test_a_stored_record_is_written_again_as_one_version_and_reads_back_the_same() -> None:
    again, value = rewritten(stores_of_that_build(), STORED.read_bytes())
    rec = orjson.loads(again)
    # Anchored (no saved ring): version 2, which the releases before version 3 read too.
    assert rec["version"] == 2 and RECORD_VERSION == 3
    # One version for the whole record: the parts carry none of their own.
    assert "version" not in rec["threshold"] and "version" not in rec["alerts"]
    stored = orjson.loads(STORED.read_bytes())
    for part in ("threshold", "alerts"):
        assert {k: v for k, v in stored[part].items() if k != "version"} == rec[part]
    assert (rec["upto"], rec["ring"]) == (stored["upto"], stored["ring"])
    # And a version 2 record restores to the same threshold, and writes the same bytes.
    twice, value_2 = rewritten(stores_of_that_build(), again)
    assert value_2 == value == 8.834337272919663
    assert twice == again


def test_a_version_2_part_with_a_version_of_its_own_is_refused() -> None:
    again, _ = rewritten(stores_of_that_build(), STORED.read_bytes())
    rec = orjson.loads(again)
    rec["alerts"]["version"] = 7
    with pytest.raises(StateError, match="carries version 7"):
        parse_record(b"pump-7", orjson.dumps(rec), 2)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"{", "not JSON"),
        (b'{"version": 9}', "unknown state record version 9"),
        (b'{"version": true}', "unknown state record version True"),
        (b'{"version": 1, "sensor": "other"}', "does not match its key"),
        (b'{"version": 1, "sensor": "s", "partition": 3}', "found in 2"),
        (b'{"version": 1, "sensor": "s", "partition": 2, "upto": true}', "upto must be"),
        (
            b'{"version": 1, "sensor": "s", "partition": 2, "upto": 1, '
            b'"ring": {"anchor_offset": 1}}',
            "bad ring anchor",
        ),
        (b'{"version": 1, "sensor": "s", "partition": 2, "upto": 1, "alerts": [1]}', "alerts must"),
    ],
)
def test_a_bad_record_says_what_is_wrong(value: bytes, why: str) -> None:
    with pytest.raises(StateError, match=why):
        parse_record(b"s", value, 2)


def test_commit_metadata_round_trips_and_foreign_commits_fall_back() -> None:
    assert commit_head(commit_metadata(41), 30) == 41
    assert commit_head(None, 30) == 29  # committed by another tool: offset - 1
    assert commit_head('{"v": 7, "h": 3}', 30) == 29
    assert commit_head("not json", -1) == -1
