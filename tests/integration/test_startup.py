"""Start-up on the real broker: the ``startup`` line, the overlapped model load, a bad model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from tests.conftest import NewTopicFactory
from tests.helpers import Timeout, consume_all
from tests.integration.helpers import (
    REPO,
    DaemonProcess,
    Topics,
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    wait_for_ids,
    write_config,
)

pytestmark = pytest.mark.kafka

W, S = 16, 4


@pytest.fixture
def topics(new_topic: NewTopicFactory) -> Topics:
    return make_topics(new_topic, 2)


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offsets on ``topic`` (-1001: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 10)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_waiting_window_is_scored_and_the_phases_are_logged(
    kafka_bootstrap: str,
    topics: Topics,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    backend: str,
) -> None:
    """Input waiting at start: every window scored once, one ``startup`` line, in order.

    With torch the model takes seconds to load (its import): the group is joined
    meanwhile, and nothing fetched around the load is lost.
    """
    samples = plant_samples(6, 60, seed=11)
    produce(kafka_bootstrap, topics.input, samples)
    expected = expected_windows(topics.input, samples, W, S)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["backend"] = backend
    cfg.write_text(yaml.safe_dump(data))
    daemon = DaemonProcess(cfg).start()
    daemons.append(daemon)
    line = daemon.wait_event("startup", Timeout(90))
    assert line["backend"] == backend
    at = line["since_start"]
    assert set(at) == {
        "imported",
        "model_loaded",
        "checked",
        "subscribed",
        "assigned",
        "restored",
        "fetched",
        "scored",
    }
    # The group is joined while the model loads, never after it.
    if backend == "torch":
        assert at["subscribed"] < at["model_loaded"]
    assert at["assigned"] <= at["restored"] <= at["fetched"] <= at["scored"] == line["seconds"]
    assert set(line["phases"]) == {
        "imports",
        "model_load",
        "cluster_checks",
        "group_join",
        "state_restore",
        "first_fetch",
        "first_score",
    }
    seen = wait_for_ids(kafka_bootstrap, topics.scores, set(expected), Timeout(60), daemon)
    assert seen >= set(expected)
    assert daemon.stop() == 0
    scores = [orjson.loads(m) for m in _read_values(kafka_bootstrap, topics.scores)]
    ids = [s["id"] for s in scores]
    assert len(ids) == len(set(ids)) == len(expected)


def _read_values(bootstrap: str, topic: str) -> list[bytes]:
    return [m.value() or b"" for m in consume_all(bootstrap, topic, timeout_s=20)]


def test_a_model_that_fails_to_load_stops_start_up_and_commits_nothing(
    kafka_bootstrap: str, topics: Topics, group_id: str, model_dir: Path, tmp_path: Path
) -> None:
    """A tampered graph: exit 2, the file and the reason named, no offset committed."""
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    blob = bytearray((bad / "model.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(blob))
    produce(kafka_bootstrap, topics.input, plant_samples(3, 30, seed=12))
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, bad)
    run = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "model.onnx" in run.stderr and "SHA-256 does not match" in run.stderr, run.stderr
    assert set(_committed(kafka_bootstrap, group_id, topics.input, 2)) == {-1001}
    assert _read_values(kafka_bootstrap, topics.scores) == []
