"""Messages crafted against the batch parser, and values at the edge of float32.

Rows 6 and 9 of the hostile-input table, against the real broker: neighbours that
were invalid alone but valid when a batch was parsed as one joined array used to
swap fates (a valid sample dead-lettered, an invalid one accepted); a sensor whose
values reached 3e38 used to lose its state on restart (``state_corrupt``).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import NewTopicFactory
from tests.helpers import Timeout, consume_all
from tests.hostile.conftest import ScoreAll
from tests.integration.helpers import (
    T0,
    DaemonProcess,
    Sample,
    make_topics,
    plant_samples,
    produce,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4


def test_crafted_neighbours_keep_their_own_fate(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    score_all: ScoreAll,
) -> None:
    """Two values in one message, an array closed by the next message: each judged alone."""
    topics = make_topics(new_topic, 1)
    good = plant_samples(2, 100, seed=9)
    k = b"sensor-0"
    two_values = Sample("sensor-0", k, good[1].value + b'\n,{"note": 1}', False, "bad_json")  # type: ignore[operator]
    opens = Sample(
        "sensor-0", k, b'{"sensor": "sensor-0", "ts": 1, "values": [1, 2', False, "bad_json"
    )
    closes = Sample("sensor-0", k, b"3, 4, 5]}", False, "bad_json")
    # The valid sample right after the two-value message used to be judged as its tail.
    stream = [*good[:80], two_values, *good[80:82], opens, closes, *good[82:]]
    produce(kafka_bootstrap, topics.input, stream)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    daemon = score_all(cfg, topics, stream)
    dead = consume_all(kafka_bootstrap, topics.dlq, expected=3, timeout_s=30)
    assert daemon.stop() == 0, daemon.tail()
    got = sorted((int(dict(m.headers() or [])["source.offset"]), m.value()) for m in dead)
    assert got == sorted((s.offset, s.value) for s in (two_values, opens, closes))
    assert daemon.seen("stats")[-1]["dead_by_kind"] == {"bad_json": 3}


def test_values_at_the_float32_limit_keep_their_state_across_a_restart(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    score_all: ScoreAll,
) -> None:
    """A sensor scored as null (3e38 values) restores its state: no state_corrupt."""
    topics = make_topics(new_topic, 1)
    good = plant_samples(2, 60, seed=10)
    huge = [
        Sample(
            "sensor-0",
            b"sensor-0",
            orjson.dumps({"sensor": "sensor-0", "ts": T0 + 60 + r, "values": [3e38] * 5}),
            True,
        )
        for r in range(8)
    ]
    stream = [*good, *huge]
    produce(kafka_bootstrap, topics.input, stream)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    first = score_all(cfg, topics, stream)
    assert first.stop() == 0, first.tail()
    scores = [orjson.loads(m.value() or b"") for m in consume_all(kafka_bootstrap, topics.scores)]
    extreme = [r for r in scores if r["sensor"] == "sensor-0" and r["score"] is None]
    assert extreme and all(r["anomalous"] for r in extreme)

    second = DaemonProcess(cfg).start()
    daemons.append(second)
    restored = second.wait_event("state_restored", Timeout(60))
    assert restored["corrupt"] == 0 and restored["sensors"] == 2, restored
    assert not second.seen("state_corrupt"), second.tail()
    assert second.stop() == 0, second.tail()
