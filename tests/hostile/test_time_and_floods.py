"""Timestamps from the future, clocks set back, and floods of new sensor ids.

Rows 3 to 5 of the hostile-input table, against the real broker: one far-future
sample used to lock its sensor out; six new ids stamped far ahead used to make every
real sensor of the partition look silent; 200,000 new ids grew memory without bound.
"""

from __future__ import annotations

import dataclasses
import time
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
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    wait_for_ids,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4


def sample(sensor: str, ts: float, valid: bool = True, kind: str = "") -> Sample:
    """One sample message of ``sensor`` at ``ts`` with ordinary values."""
    doc = {"sensor": sensor, "ts": ts, "values": [0.5, 1.0, 1.5, 2.0, 2.5]}
    return Sample(sensor, sensor.encode(), orjson.dumps(doc), valid, kind)


def dlq_kinds(bootstrap: str, topic: str, expected: int) -> list[str]:
    """The error.kind header of every dead letter (read until ``expected`` arrived)."""
    out = []
    for m in consume_all(bootstrap, topic, expected=expected, timeout_s=30):
        out.append(dict(m.headers() or [])["error.kind"].decode())
    return out


def test_future_timestamps_are_dead_lettered_and_lock_nobody_out(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    score_all: ScoreAll,
) -> None:
    """Year 9999 and 1e308 go to the DLQ as bad_timestamp; the sensor scores on."""
    topics = make_topics(new_topic, 1)
    good = plant_samples(2, 120, seed=6)
    poison = [
        sample("sensor-0", 253402300799.0, False, "bad_timestamp"),  # 9999-12-31
        sample("sensor-0", 1e308, False, "bad_timestamp"),
        sample("sensor-1", time.time() + 3600, False, "bad_timestamp"),
    ]
    stream = [*good[:100], *poison, *good[100:]]
    produce(kafka_bootstrap, topics.input, stream)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    daemon = score_all(cfg, topics, stream)
    assert dlq_kinds(kafka_bootstrap, topics.dlq, 3) == ["bad_timestamp"] * 3
    assert daemon.stop() == 0, daemon.tail()
    assert daemon.seen("stats")[-1]["dead_by_kind"] == {"bad_timestamp": 3}


def test_clock_set_back_restarts_the_window(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    score_all: ScoreAll,
) -> None:
    """A device clock reset to a day earlier: its windows start afresh, none is refused."""
    topics = make_topics(new_topic, 1)
    before = [sample("pump", T0 + r) for r in range(40)]
    # Grouped apart for the expectation: the ring restarts at the jump.
    after = [
        dataclasses.replace(sample("pump", T0 - 86400 + r), sensor="pump-after") for r in range(40)
    ]
    stream = [*before, *after]
    produce(kafka_bootstrap, topics.input, stream)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    daemon = score_all(cfg, topics, stream)
    assert daemon.stop() == 0, daemon.tail()
    assert daemon.seen("stats")[-1]["dead_letters"] == 0


def test_new_ids_far_ahead_do_not_make_real_sensors_silent(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    score_all: ScoreAll,
) -> None:
    """Six new ids a year ahead of the fleet (within max_future_s of the wall clock)."""
    topics = make_topics(new_topic, 1)
    good = plant_samples(3, 200, seed=7)  # timestamps of 2025-11-27, a year behind
    ahead = time.time() + 200
    intruders = [sample(f"intruder-{i}", ahead + i) for i in range(6)]
    stream = [*good[:150], *intruders, *good[150:]]
    produce(kafka_bootstrap, topics.input, stream)
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        topics,
        group_id,
        model_dir,
        stream={"max_gap_s": 30},
        kafka={"commit_interval_s": 0.3, "consume_batch": 50},
    )
    due = expected_windows(topics.input, stream, W, S)
    daemon = score_all(cfg, topics, stream, windows=[k for k, v in due.items() if "sensor" in v[0]])
    assert daemon.stop() == 0, daemon.tail()
    evicted = [e for e in daemon.seen("sensor_evicted") if e["sensor"].startswith("sensor-")]
    assert not evicted, evicted


def test_a_flood_of_new_ids_is_bounded_and_real_sensors_score_on(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    """200,000 new ids x 2 samples with max_sensors 2,000: flat memory, every real window."""
    topics = make_topics(new_topic, 1)
    real = plant_samples(3, 300, seed=8)
    flood_ids = 200_000
    flood = [sample(f"flood-{i}", T0 + 20 + rep) for rep in range(2) for i in range(flood_ids)]
    # Real sensors fill their first windows, then the flood, with real samples all through.
    head, rest = real[:60], real[60:]
    step = len(flood) // len(rest)
    stream = list(head)
    for j, s in enumerate(rest):
        stream += flood[j * step : (j + 1) * step]
        stream.append(s)
    stream += flood[len(rest) * step :]
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        topics,
        group_id,
        model_dir,
        stream={"max_sensors": 2000},
        metrics={"enabled": False, "stats_interval_s": 1.0},
    )
    daemon = DaemonProcess(cfg).start()
    daemons.append(daemon)
    daemon.wait_event("daemon_ready", Timeout(60))
    time.sleep(1.0)
    ready_kb = daemon.sample_rss()
    produce(kafka_bootstrap, topics.input, stream, timeout_s=300)
    wanted = set(expected_windows(topics.input, real, W, S))
    deadline = Timeout(240)
    seen: set[str] = set()
    while not deadline.expired and not wanted <= seen:
        daemon.sample_rss()
        seen = wait_for_ids(kafka_bootstrap, topics.scores, wanted, Timeout(5), daemon)
    # Until the input is all consumed: the peak includes the whole flood.
    while not deadline.expired:
        daemon.sample_rss()
        stats = daemon.seen("stats")
        if stats and stats[-1]["messages"] >= len(stream) and stats[-1]["lag"] == 0:
            break
        time.sleep(0.5)
    peak_kb = daemon.sample_rss()
    assert wanted <= seen, f"{len(wanted - seen)} real windows missing\n{daemon.tail()}"
    assert daemon.stop() == 0, daemon.tail()
    stats = daemon.seen("stats")[-1]
    assert stats["sensors"] <= 2000, stats
    grown_mb = (peak_kb - ready_kb) / 1024
    print(f"flood: RSS at ready {ready_kb / 1024:.0f} MiB, peak {peak_kb / 1024:.0f} MiB")
    # Unbounded, 200,000 ids grew the heap by about 400 MB (2 KB each).
    assert grown_mb < 200, f"RSS grew {grown_mb:.0f} MiB during the flood"
    limit_lines = daemon.seen("sensor_limit_reached")
    assert 1 <= len(limit_lines) < 200, len(limit_lines)  # once per interval, not per id
    refused = sum(line["refused_samples"] for line in limit_lines)
    evicted_for_room = sum(line["evicted"] for line in limit_lines)
    assert refused + evicted_for_room > 0
    assert not [e for e in daemon.seen("sensor_evicted") if e["sensor"].startswith("sensor-")]
