"""The daemon as a real subprocess on the real broker: completeness, DLQ, restarts, backpressure.

Every record the daemon publishes is validated against the JSON schemas in
``streamer/schemas``. Each test bounds every wait with a ``Timeout``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from streamer.codec import DLQ_KINDS
from streamer.config import KafkaConfig, TopicsConfig, load_config
from streamer.daemon import Daemon
from streamer.kafka.admin import STATE_TOPIC_CONFIG, ensure_topics, state_topic_findings
from tests.conftest import NewTopicFactory
from tests.helpers import Timeout, consume_all, record_as_version_1
from tests.integration.helpers import (
    REPO,
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    train_tiny,
    validator,
    wait_for_ids,
    write_config,
)

pytestmark = pytest.mark.kafka

W, S = 16, 4


@pytest.fixture
def topics2(new_topic: NewTopicFactory) -> Topics:
    """Fresh input (2 partitions), scores, alerts, DLQ and state topics."""
    return make_topics(new_topic, 2)


def read_scores(
    bootstrap: str, topics: Topics, expected: int | None = None, timeout_s: float = 60.0
) -> list[Message]:
    """Score records (all of them, or until ``expected`` arrived), each schema-validated."""
    msgs = consume_all(bootstrap, topics.scores, expected=expected, timeout_s=timeout_s)
    check = validator("score")
    for m in msgs:
        rec = orjson.loads(m.value() or b"")
        check.validate(rec)
        assert m.key() == rec["sensor"].encode()
    return msgs


def read_alerts(bootstrap: str, topics: Topics) -> list[dict[str, object]]:
    """Every alert record so far, schema-validated."""
    check = validator("alert")
    out = []
    for m in consume_all(bootstrap, topics.alerts, timeout_s=30):
        rec = orjson.loads(m.value() or b"")
        check.validate(rec)
        assert m.key() == str(rec["sensor"]).encode()
        out.append(rec)
    return out


def ids_of(msgs: list[Message]) -> list[str]:
    return [orjson.loads(m.value() or b"")["id"] for m in msgs]


def run_without_broker(
    tmp_path: Path, model_dir: Path, **sections: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """``streamer run`` with nothing listening at its bootstrap address."""
    topics = Topics(*(f"unused-{i}" for i in range(5)), partitions=1)
    cfg = write_config(tmp_path / "c.yaml", "127.0.0.1:9", topics, "g", model_dir, **sections)
    return subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Scenario:
    """A fresh set of topics, a group and the tiny model: produce, then start a daemon."""

    bootstrap: str
    topics: Topics
    group: str
    model: Path
    tmp_path: Path
    started: list[DaemonProcess]

    def score(
        self,
        samples: list[Sample],
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> tuple[DaemonProcess, dict[str, tuple[str, int, int]]]:
        """Produce ``samples`` and start a daemon on them (config ``sections`` over the
        defaults, ``env`` added to its environment); returns it and the windows it must
        score."""
        produce(self.bootstrap, self.topics.input, samples)
        expected = expected_windows(self.topics.input, samples, W, S)
        cfg = write_config(
            self.tmp_path / "cfg.yaml",
            self.bootstrap,
            self.topics,
            self.group,
            self.model,
            **sections,
        )
        daemon = DaemonProcess(cfg, env=env or {}).start()
        self.started.append(daemon)
        return daemon, expected


@pytest.fixture
def scenario(
    kafka_bootstrap: str,
    topics2: Topics,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> Scenario:
    """The six fixtures of a daemon scenario as one."""
    return Scenario(kafka_bootstrap, topics2, group_id, model_dir, tmp_path, daemons)


class TestModelFitsTheStream:
    """A config whose window or channels differ from the model's stops start-up."""

    @pytest.mark.parametrize(
        ("stream", "named"),
        [
            ({"window": 32, "stride": 4}, "model window 16, stream.window 32"),
            ({"channels": ["a", "b"]}, "stream.channels ['a', 'b']"),
        ],
    )
    def test_start_up_names_every_difference(
        self, tmp_path: Path, model_dir: Path, stream: dict[str, Any], named: str
    ) -> None:
        run = run_without_broker(tmp_path, model_dir, stream=stream)
        assert run.returncode == 2, run.stdout + run.stderr
        assert named in run.stdout + run.stderr

    def test_another_stride_is_allowed_and_said(
        self, tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        topics = Topics(*(f"unused-{i}" for i in range(5)), partitions=1)
        cfg = write_config(
            tmp_path / "c.yaml", "127.0.0.1:9", topics, "g", model_dir, stream={"stride": 1}
        )
        daemon = Daemon(load_config(cfg))  # no Kafka contact before run()
        daemon.build()  # waits for the model, loaded on a thread of its own
        daemon.engine.close()
        out = capsys.readouterr().out
        assert "stride_differs_from_model" in out and "alerts.open_after" in out
        assert daemon.engine.windows.stride == 1


class TestUnreachableBroker:
    """Nothing listens at the address: one line on stderr, after the configured wait."""

    def test_one_clear_line_after_connect_timeout(self, tmp_path: Path, model_dir: Path) -> None:
        started = time.monotonic()
        run = run_without_broker(tmp_path, model_dir, kafka={"connect_timeout_s": 2.0})
        took = time.monotonic() - started
        assert run.returncode == 1, run.stdout + run.stderr
        assert run.stderr.startswith("streamer: cannot reach Kafka at 127.0.0.1:9"), run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
        # The 30 s default would show here; start-up (imports, model) takes a few seconds.
        assert took < 25, took


class TestScoring:
    """A clean stream is scored completely, once, with anomalies flagged."""

    def test_every_window_scored_once(self, scenario: Scenario) -> None:
        """Every window due is scored exactly once, ids unique, anomalies above threshold."""
        timeout = Timeout(120)
        anomalies = [(1, 300, 8), (4, 500, 8)]
        samples = plant_samples(6, 700, seed=3, anomalies=anomalies)
        # sensor-5 falls silent after 100 rows: it is evicted rather than pin the commit.
        samples = [s for s in samples if s.sensor != "sensor-5" or s.row < 100]
        daemon, expected = scenario.score(samples, stream={"max_gap_s": 60.0})

        msgs = read_scores(
            scenario.bootstrap, scenario.topics, expected=len(expected), timeout_s=timeout.remaining
        )
        assert len(msgs) == len(expected), daemon.tail()
        started = daemon.seen("daemon_started")
        assert daemon.stop() == 0, daemon.tail()

        msgs = read_scores(scenario.bootstrap, scenario.topics)  # everything, after the clean stop
        ids = ids_of(msgs)
        assert len(ids) == len(set(ids)), "duplicate window ids"
        assert set(ids) == set(expected)
        for m in msgs:
            rec = orjson.loads(m.value() or b"")
            sensor, partition, offset = expected[rec["id"]]
            assert (rec["sensor"], rec["partition"], rec["offset"]) == (sensor, partition, offset)

        # Windows holding a whole injected anomaly are flagged, and an alert opens for it.
        by_sensor = defaultdict(list)
        for m in msgs:
            rec = orjson.loads(m.value() or b"")
            by_sensor[rec["sensor"]].append(rec)
        for s, row, length in anomalies:
            t_lo, t_hi = 1_764_201_600.0 + row, 1_764_201_600.0 + row + length - 1
            covering = [
                r
                for r in by_sensor[f"sensor-{s}"]
                if r["window_start"] <= t_lo and r["window_end"] >= t_hi
            ]
            assert covering
            assert all(r["anomalous"] and r["score"] > r["threshold"] for r in covering)
        alerts = read_alerts(scenario.bootstrap, scenario.topics)
        opened = {a["sensor"] for a in alerts if a["state"] == "open"}
        assert {f"sensor-{s}" for s, _, _ in anomalies} <= opened
        # Throughput: first to last score record, by the daemon's produce timestamps.
        stamps = sorted(m.timestamp()[1] for m in msgs)
        rate = len(msgs) / max((stamps[-1] - stamps[0]) / 1000.0, 1e-3)
        print(f"\ndaemon published {rate:.0f} windows/s ({len(msgs)} windows)")
        evicted = daemon.seen("sensor_evicted")
        assert [(e["sensor"], e["reason"]) for e in evicted] == [("sensor-5", "silent")], (
            daemon.tail(60)
        )
        stats = daemon.seen("stats")
        assert started and stats
        print(f"\nscored {len(ids)} windows; last stats: {stats[-1]}")


class TestNovelty:
    """The daemon with ``novelty.enabled`` (what ``streamer eval nab`` reports)."""

    def test_scores_are_the_history_novelty(self, scenario: Scenario) -> None:
        """Scores lie in [0, 1], 0 while a sensor learns; a jump out of the range scores 1
        and opens an alert, and the sensors without one raise none."""
        timeout = Timeout(120)
        samples = plant_samples(3, 900, seed=5, anomalies=[(1, 700, 8)])
        novelty = {"enabled": True, "points": 8, "scales": [1, 4], "history": 400}
        daemon, expected = scenario.score(
            samples,
            novelty={**novelty, "refractory": 50, "learning_rows": 300},
            threshold={"method": "fixed", "value": 0.99},
            alerts={"open_after": 1, "open_within": 1, "close_after": 20},
        )
        msgs = read_scores(
            scenario.bootstrap, scenario.topics, expected=len(expected), timeout_s=timeout.remaining
        )
        assert daemon.stop() == 0, daemon.tail()
        assert set(ids_of(msgs)) == set(expected)
        recs = [orjson.loads(m.value() or b"") for m in msgs]
        assert all(0.0 <= r["score"] <= 1.0 for r in recs)
        row = {r["id"]: int(r["window_end"] - 1_764_201_600.0) for r in recs}
        assert all(r["score"] == 0.0 for r in recs if row[r["id"]] < 300)
        # The window whose new rows hold row 700 (rows 700 to 703) sees the jump.
        jump = [r for r in recs if r["sensor"] == "sensor-1" and row[r["id"]] == 703]
        assert len(jump) == 1 and jump[0]["score"] == 1.0 and jump[0]["anomalous"]
        opened = [
            a for a in read_alerts(scenario.bootstrap, scenario.topics) if a["state"] == "open"
        ]
        assert "sensor-1" in {a["sensor"] for a in opened}
        quiet = [r for r in recs if r["sensor"] != "sensor-1" and r["anomalous"]]
        assert len(quiet) <= 2, quiet


def bad_messages() -> list[Sample]:
    """One malformed message of each kind (out_of_order: older than its sensor's last sample)."""

    def doc(sensor: str = "sensor-0", ts: object = 1_764_300_000.0, values: object = None) -> bytes:
        vals = [1.0, 2.0, 3.0, 4.0, 5.0] if values is None else values
        return orjson.dumps({"sensor": sensor, "ts": ts, "values": vals})

    k = b"sensor-0"
    raw: list[tuple[bytes | None, bytes | None, str]] = [
        (b"{" + b" " * 70_000 + b"}", k, "oversized"),
        (None, k, "empty"),
        (b'{"sensor": "sensor-0", "ts": ', k, "bad_json"),
        (b"[1, 2, 3]", k, "not_object"),
        (b'{"sensor": "sensor-0", "values": [1, 2, 3, 4, 5]}', k, "missing_field"),
        (doc(sensor=""), b"", "bad_sensor"),
        (doc(sensor="sensor-1"), k, "key_mismatch"),
        (doc(ts="not a time"), k, "bad_timestamp"),
        (doc(values=[1.0, 2.0]), k, "wrong_channel_count"),
        (doc(values={"temp": 1, "nope": 2}), k, "unknown_channel"),
        (doc(values={"temp": 1}), k, "missing_channel"),
        (doc(values=[1, "2", 3, 4, 5]), k, "wrong_type"),
        (doc(values=[1, None, 3, 4, 5]), k, "null_value"),
        (b'{"sensor": "sensor-0", "ts": 1764300000, "values": [1, NaN, 3, 4, 5]}', k, "non_finite"),
        # Behind sensor-0's newest sample by less than max_gap_s: a straggler. (Further
        # back, it would be a clock set back, which restarts the sensor's window.)
        (doc(ts=1_764_201_610.0), k, "out_of_order"),
    ]
    return [Sample("sensor-0", key, value, False, kind) for value, key, kind in raw]


class TestDeadLetters:
    """Bad input lands in the DLQ with its reason; the good input around it is still scored."""

    def test_malformed_messages_go_to_dlq(self, scenario: Scenario) -> None:
        """15 kinds of bad message reach the DLQ with kind, reason, source; valid ones scored."""
        timeout = Timeout(120)
        good = plant_samples(4, 200, seed=5)
        bad = bad_messages()
        stream: list[Sample] = []
        step = len(good) // (len(bad) + 1)
        for i, s in enumerate(good):
            stream.append(s)
            if i % step == step - 1 and bad:
                # Interleave among sensor-0's samples so its windows span the bad ones.
                stream.append(bad.pop(0))
        assert not bad
        daemon, expected = scenario.score(stream)

        scores = read_scores(
            scenario.bootstrap, scenario.topics, expected=len(expected), timeout_s=timeout.remaining
        )
        invalid = [s for s in stream if not s.valid]
        dlq = consume_all(
            scenario.bootstrap,
            scenario.topics.dlq,
            expected=len(invalid),
            timeout_s=timeout.remaining,
        )
        assert daemon.stop() == 0, daemon.tail()
        assert set(ids_of(scores)) == set(expected)
        assert len(dlq) == len(invalid) >= 10

        check = validator("dlq")
        by_position = {(s.partition, s.offset): s for s in invalid}
        kinds = Counter()
        for m in dlq:
            headers = {k: v.decode() for k, v in (m.headers() or [])}
            check.validate(headers)
            assert headers["source.topic"] == scenario.topics.input
            src = by_position[(int(headers["source.partition"]), int(headers["source.offset"]))]
            assert headers["error.kind"] == src.kind, headers
            assert headers["error.reason"]
            assert m.value() == src.value and m.key() == src.key
            kinds[src.kind] += 1
        assert len(kinds) == len(bad_messages()) and set(kinds) <= set(DLQ_KINDS)
        stats = daemon.seen("stats")
        assert stats[-1]["dead_letters"] == len(invalid)


def restart_scenario(
    sig: int,
    scenario: Scenario,
    between: Callable[[str, Topics], None] | None = None,
    **kafka: Any,
) -> tuple[list[Message], dict[str, tuple[str, int, int]], int]:
    """Stream into a daemon, stop it with ``sig`` mid-stream, restart, read everything.

    ``between(bootstrap, topics)`` runs after the stop, before the restart; ``kafka``:
    more settings of the config's kafka section. Returns all score messages, the
    expected windows and the first run's exit code.
    """
    bootstrap, topics, started = scenario.bootstrap, scenario.topics, scenario.started
    group_id, model_dir, tmp_path = scenario.group, scenario.model, scenario.tmp_path
    timeout = Timeout(150)
    samples = plant_samples(6, 900, seed=7)
    head, tail = samples[:2000], samples[2000:]
    produce(bootstrap, topics.input, head)
    # A killed member holds its partitions until its session times out: keep that short
    # (the broker's minimum) so the restart is not kept waiting.
    cfg = write_config(
        tmp_path / "cfg.yaml",
        bootstrap,
        topics,
        group_id,
        model_dir,
        kafka={"commit_interval_s": 0.5, "client": {"session.timeout.ms": 6000}, **kafka},
    )
    first = DaemonProcess(cfg).start()
    started.append(first)
    read_scores(bootstrap, topics, expected=100, timeout_s=timeout.remaining)
    # The rest of the stream arrives while the daemon runs; stop it half way through.
    writer = threading.Thread(
        target=produce, args=(bootstrap, topics.input, tail), kwargs={"rate_per_s": 1500.0}
    )
    writer.start()
    while not timeout.expired and sum(s.offset >= 0 for s in tail) < len(tail) // 2:
        threading.Event().wait(0.05)
    code = first.stop(sig)
    writer.join(timeout.remaining)
    assert not writer.is_alive()
    expected = expected_windows(topics.input, samples, W, S)
    done_before = len(read_scores(bootstrap, topics))
    assert 0 < done_before < len(expected), "the stop must land mid-stream"
    if between is not None:
        between(bootstrap, topics)

    second = DaemonProcess(cfg).start()
    started.append(second)
    wait_for_ids(bootstrap, topics.scores, set(expected), timeout, second)
    assert second.stop() == 0, second.tail()
    restored = second.seen("state_restored")
    assert sum(e["sensors"] for e in restored) == 6, second.tail()
    assert sum(e["anchors"] for e in restored) == 6, second.tail()
    return read_scores(bootstrap, topics), expected, code


def assert_identical_repeats(msgs: list[Message], expected: Iterable[str]) -> int:
    """Every expected window is there and each repeat is byte-identical; returns the repeats."""
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for m in msgs:
        by_id[orjson.loads(m.value() or b"")["id"]].add(m.value() or b"")
    assert set(by_id) == set(expected)
    differing = [i for i, values in by_id.items() if len(values) > 1]
    assert not differing, f"{len(differing)} repeated windows differ"
    return len(msgs) - len(by_id)


class TestRestart:
    """Stopping and restarting mid-stream loses nothing; a clean stop repeats nothing."""

    def test_sigterm_then_restart_exactly_once(self, scenario: Scenario) -> None:
        """SIGTERM mid-stream exits 0; with the restart every window appears exactly once."""
        msgs, expected, code = restart_scenario(
            signal.SIGTERM,
            scenario,
        )
        assert code == 0, scenario.started[0].tail()
        assert scenario.started[0].seen("shutdown_complete")
        counts = Counter(ids_of(msgs))
        assert set(counts) == set(expected)
        repeated = {i: c for i, c in counts.items() if c > 1}
        assert not repeated, f"{len(repeated)} windows published twice"

    def test_sigterm_leaves_a_snapshot_that_the_restart_reads_instead_of_the_topic(
        self, scenario: Scenario
    ) -> None:
        """After a clean stop the restart restores from the local file: no state record read."""
        msgs, expected, code = restart_scenario(
            signal.SIGTERM, scenario, state_snapshot_dir="snapshots"
        )
        assert code == 0
        first, second = scenario.started
        written = first.seen("state_snapshot_written")
        assert written and sum(written[0]["records"].values()) == 6, first.tail()
        restored = second.seen("state_restored")
        assert sum(e["from_snapshot"] for e in restored) == 6, second.tail()
        assert sum(e["records"] for e in restored) == 0
        # The files were used once and removed; the second clean stop left its own.
        again = second.seen("state_snapshot_written")
        files = list((scenario.tmp_path / "snapshots").iterdir())
        assert again and len(files) == len(again[0]["records"]) == len(written[0]["records"])
        counts = Counter(ids_of(msgs))
        assert set(counts) == set(expected) and max(counts.values()) == 1

    def test_a_snapshot_older_than_the_state_topic_is_not_used(self, scenario: Scenario) -> None:
        """State written after the clean stop (another instance, say): the topic is read."""

        def write_state(bootstrap: str, topics: Topics) -> None:
            producer = Producer({"bootstrap.servers": bootstrap})
            producer.produce(topics.state, None, key=b"someone-else", partition=0)
            assert producer.flush(30) == 0

        msgs, expected, _ = restart_scenario(
            signal.SIGTERM, scenario, write_state, state_snapshot_dir="snapshots"
        )
        # Partition 0's state moved on: read from the topic. Any other is still its file's.
        restored = {e["partition"]: e for e in scenario.started[1].seen("state_restored")}
        assert restored[0]["from_snapshot"] == 0 and restored[0]["records"] > restored[0]["sensors"]
        for p, e in restored.items():
            if p != 0:
                assert e["from_snapshot"] == e["sensors"] and e["records"] == 0, e
        counts = Counter(ids_of(msgs))
        assert set(counts) == set(expected) and max(counts.values()) == 1

    def test_sigkill_then_restart_identical_repeats(self, scenario: Scenario) -> None:
        """After SIGKILL mid-stream and a restart all windows appear, repeats byte-identical."""
        msgs, expected, code = restart_scenario(
            signal.SIGKILL,
            scenario,
        )
        assert code == -signal.SIGKILL
        repeats = assert_identical_repeats(msgs, expected)
        print(f"\n{len(expected)} windows, {repeats} repeated byte-identically after SIGKILL")

    def test_version_1_state_records_restore_identically(self, scenario: Scenario) -> None:
        """State written by an older streamer (record and threshold version 1) restores exactly.

        After a SIGKILL every state record is written again as the first record version
        (parts versioned apart, float arrays as JSON lists) would have written it; the
        restart must repeat the windows after the commit byte for byte, so the
        thresholds it restored equal the ones the killed run had.
        """
        rewritten: list[str] = []  # sensors whose threshold was written as version 1

        def as_version_1(bootstrap: str, topics: Topics) -> None:
            records = consume_all(bootstrap, topics.state)
            producer = Producer({"bootstrap.servers": bootstrap})
            for m in records:
                rec = orjson.loads(m.value() or b"")
                if rec["threshold"] is not None:
                    rewritten.append(rec["sensor"])
                rec = record_as_version_1(rec)
                producer.produce(
                    topics.state, orjson.dumps(rec), key=m.key(), partition=m.partition()
                )
            assert producer.flush(30) == 0

        msgs, expected, code = restart_scenario(
            signal.SIGKILL,
            scenario,
            between=as_version_1,
        )
        assert code == -signal.SIGKILL
        assert len(set(rewritten)) == 6, rewritten
        second = scenario.started[1]
        assert not second.seen("state_corrupt"), second.tail(40)
        repeats = assert_identical_repeats(msgs, expected)
        assert repeats > 0, "the restart must repeat the windows after the commit"


class TestModelChangeAcrossRestart:
    """State written under one model, restored under another."""

    def test_thresholds_rewarm_and_nothing_else_is_lost(self, scenario: Scenario) -> None:
        """A retrained model's calibration differs: thresholds re-warm, windows stay whole."""
        timeout = Timeout(150)
        current = scenario.tmp_path / "current"
        shutil.copytree(scenario.model, current)
        retrained = train_tiny(scenario.tmp_path / "retrained", epochs=2)
        samples = plant_samples(6, 300, seed=5)
        head, tail = samples[:900], samples[900:]
        produce(scenario.bootstrap, scenario.topics.input, head)
        cfg = write_config(
            scenario.tmp_path / "cfg.yaml",
            scenario.bootstrap,
            scenario.topics,
            scenario.group,
            current,
        )
        first = DaemonProcess(cfg).start()
        scenario.started.append(first)
        wait_for_ids(
            scenario.bootstrap,
            scenario.topics.scores,
            set(expected_windows(scenario.topics.input, head, W, S)),
            timeout,
            first,
        )
        assert first.stop() == 0, first.tail()

        shutil.rmtree(current)
        shutil.copytree(retrained, current)
        produce(scenario.bootstrap, scenario.topics.input, tail)
        second = DaemonProcess(cfg).start()
        scenario.started.append(second)
        expected = expected_windows(scenario.topics.input, samples, W, S)
        wait_for_ids(scenario.bootstrap, scenario.topics.scores, set(expected), timeout, second)
        assert second.stop() == 0, second.tail()

        restored = second.seen("state_restored")
        assert sum(e["sensors"] for e in restored) == 6, second.tail()
        assert sum(e["stale_thresholds"] for e in restored) == 6, second.tail()
        assert sum(e["corrupt"] for e in restored) == 0, second.tail()
        assert sum(e["anchors"] for e in restored) == 6, second.tail()
        counts = Counter(ids_of(read_scores(scenario.bootstrap, scenario.topics)))
        assert set(counts) == set(expected)
        assert max(counts.values()) == 1, "a window was published twice"


class TestReplayBound:
    """A replay bound below window x sensors per partition is reported, not silently fatal."""

    def test_too_small_bound_is_named_in_an_error(self, scenario: Scenario) -> None:
        """Every sensor falls behind the bound: the daemon logs which key to raise."""
        timeout = Timeout(120)
        samples = plant_samples(6, 60, seed=3)
        daemon, _ = scenario.score(
            samples, stream={"max_replay_messages": 5}, kafka={"commit_interval_s": 0.2}
        )
        event = daemon.wait_event("replay_bound_too_small", timeout)
        assert event["max_replay_messages"] == 5
        assert event["needed_at_least"] >= W * event["sensors"]
        assert "stream.max_replay_messages" in event["hint"]
        assert daemon.stop() == 0, daemon.tail()


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger model (window 64) scored at stride 1: inference is far slower than decoding."""
    return train_tiny(
        tmp_path_factory.mktemp("model") / "slow",
        window=64,
        hidden=32,
        latent=8,
        epochs=1,
        stride=1,
        rows=300,
    )


class TestBackpressure:
    """A model slower than the input pauses consumption instead of buffering without bound."""

    @pytest.mark.parametrize(
        ("bound", "pause_after_s"),
        [
            ({"queue_size": 1}, 5.0),
            ({"queue_size": 64, "max_queued_windows": 300}, 5.0),
            ({"queue_size": 1}, 0.0),
        ],
        ids=["batches", "windows", "client-pause"],
    )
    def test_pauses_resumes_and_loses_nothing(
        self,
        kafka_bootstrap: str,
        topics2: Topics,
        group_id: str,
        slow_model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
        bound: dict[str, int],
        pause_after_s: float,
    ) -> None:
        """A backlog and a queue bounded to one batch, or to fewer windows than a batch holds:
        pauses, resumes, every window once, bounded peak RSS. Consumption is held while
        the queue drains; partitions are paused in the client only after pause_after_s
        (at once with 0, whose discarded prefetch must be fetched again, losing nothing)."""
        timeout = Timeout(150)
        samples = plant_samples(8, 1500, seed=9)
        produce(kafka_bootstrap, topics2.input, samples)
        window, stride = 64, 1
        expected = expected_windows(topics2.input, samples, window, stride)
        cfg = write_config(
            tmp_path / "cfg.yaml",
            kafka_bootstrap,
            topics2,
            group_id,
            slow_model_dir,
            stream={"window": window, "stride": stride},
            inference={**bound, "max_batch": 256, "chunk": 64},
            kafka={"consume_batch": 500, "pause_after_s": pause_after_s},
        )
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        watcher = threading.Thread(
            target=wait_for_ids,
            args=(kafka_bootstrap, topics2.scores, set(expected), timeout, daemon),
        )
        watcher.start()
        while watcher.is_alive():
            daemon.sample_rss()
            watcher.join(0.2)
        paused = daemon.wait_event("consumption_paused", timeout)
        daemon.wait_event("consumption_resumed", timeout)
        if "max_queued_windows" in bound:
            # Paused by windows (a batch of up to 500), with batches far below queue_size.
            assert paused["queued_windows"] >= bound["max_queued_windows"]
            assert paused["queue_depth"] < bound["queue_size"]
        peak_mb = daemon.sample_rss() / 1024
        assert daemon.stop() == 0, daemon.tail()
        counts = Counter(ids_of(read_scores(kafka_bootstrap, topics2)))
        assert set(counts) == set(expected)
        assert max(counts.values()) == 1
        pauses = len(daemon.seen("consumption_paused"))
        client_pauses = daemon.seen("partitions_paused")
        if pause_after_s == 0:
            assert len(client_pauses) == pauses, "every pause must reach the client at once"
        else:
            # The slow model drains one batch in well under pause_after_s: held, never paused.
            assert not client_pauses, client_pauses[0]
        print(f"\n{len(expected)} windows, {pauses} pauses, peak RSS {peak_mb:.0f} MB")
        # torch alone is ~300 MB; unbounded buffering of this backlog would show far above.
        assert peak_mb < 1200


class TestTopics:
    """Topics are checked at start: created when configured, otherwise a clear error."""

    def test_missing_topics_exit_one_naming_them(
        self,
        kafka_bootstrap: str,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """Without kafka.create_topics the daemon exits 1 naming every missing topic."""
        names = [f"missing-{uuid.uuid4().hex}" for _ in range(5)]
        topics = Topics(*names, partitions=1)
        cfg = write_config(tmp_path / "cfg.yaml", kafka_bootstrap, topics, group_id, model_dir)
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        assert daemon.proc.wait(60) == 1, daemon.tail()
        daemon.stop()
        failure = daemon.seen("daemon_failed")
        assert failure, daemon.tail()
        assert all(n in failure[0]["error"] for n in names)

    def test_create_topics(self, kafka_bootstrap: str, kafka_admin: AdminClient) -> None:
        """create_topics makes missing topics; state is compacted, partitioned like the input."""
        names = [f"created-{uuid.uuid4().hex}" for _ in range(5)]
        cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, create_topics=True, topic_partitions=3)
        topics = TopicsConfig(
            input=names[0], scores=names[1], alerts=names[2], dlq=names[3], state=names[4]
        )
        try:
            assert ensure_topics(cfg, topics) == 3
            assert ensure_topics(cfg, topics) == 3  # idempotent
            meta = kafka_admin.list_topics(timeout=10).topics
            assert all(len(meta[n].partitions) == 3 for n in names)
            res = ConfigResource(ConfigResource.Type.TOPIC, names[4])
            state_cfg = kafka_admin.describe_configs([res])[res].result(timeout=10)
            assert state_cfg["cleanup.policy"].value == "compact"
            # Its uncompacted tail is bounded: compacted after a minute, segments rolled.
            for key, value in STATE_TOPIC_CONFIG.items():
                assert state_cfg[key].value == value, key
            assert state_topic_findings(cfg, names[4]) == []
        finally:
            kafka_admin.delete_topics(names, operation_timeout=0)

    def test_unbounded_state_topic_is_named_at_start(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A state topic made with the broker's defaults: the settings and the command, said."""
        names = [new_topic() for _ in range(4)] + [new_topic(config={"cleanup.policy": "compact"})]
        topics = Topics(*names, partitions=1)
        cfg = write_config(tmp_path / "cfg.yaml", kafka_bootstrap, topics, group_id, model_dir)
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        said = daemon.wait_event("state_topic_unbounded", Timeout(60))
        assert said["topic"] == names[4]
        assert said["settings"] == {
            "max.compaction.lag.ms": {"now": "9223372036854775807", "wanted": "60000"},
            "segment.ms": {"now": "604800000", "wanted": "60000"},
        }
        assert (
            f"--alter --entity-type topics --entity-name {names[4]} "
            "--add-config max.compaction.lag.ms=60000,segment.ms=60000" in said["command"]
        )
        daemon.wait_event("daemon_ready", Timeout(60))  # a warning, not a failure
        assert daemon.stop() == 0, daemon.tail()


class TestStateTopicFindings:
    """What makes a state topic's tail unbounded, and that the advised settings bound it."""

    def test_the_advised_command_clears_the_findings(
        self, kafka_bootstrap: str, kafka_admin: AdminClient, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic(config={"cleanup.policy": "compact", "segment.ms": "86400000"})
        cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
        found = state_topic_findings(cfg, topic)
        assert found is not None
        assert [f.name for f in found] == ["max.compaction.lag.ms", "segment.ms"]
        assert "24.0 h" in found[0].why
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        for f in found:
            res.add_incremental_config(
                ConfigEntry(f.name, f.wanted, incremental_operation=AlterConfigOpType.SET)
            )
        kafka_admin.incremental_alter_configs([res])[res].result(timeout=30)
        timeout = Timeout(30)
        while state_topic_findings(cfg, topic):
            assert not timeout.expired
            time.sleep(0.2)

    def test_a_delete_policy_is_named(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic(config={"max.compaction.lag.ms": "60000"})
        found = state_topic_findings(KafkaConfig(bootstrap_servers=kafka_bootstrap), topic)
        assert found is not None and [f.name for f in found] == ["cleanup.policy"]
        assert (found[0].value, found[0].wanted) == ("delete", "compact")

    def test_check_access_reports_them(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
    ) -> None:
        names = [new_topic() for _ in range(4)] + [new_topic(config={"cleanup.policy": "compact"})]
        topics = Topics(*names, partitions=1)
        cfg = write_config(tmp_path / "cfg.yaml", kafka_bootstrap, topics, group_id, model_dir)
        shown = subprocess.run(
            [sys.executable, "-m", "streamer", "check-access", "--config", str(cfg)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr  # a warning, not a grant
        assert f"WARNING  max.compaction.lag.ms=9223372036854775807 on state topic {names[4]}" in (
            shown.stdout
        )
        assert "kafka-configs.sh" in shown.stdout and "segment.ms=60000" in shown.stdout


class TestIntervalCommits:
    """Interval rounds send their commit and go on; the coordinator's answer books it."""

    def test_answer_is_logged_and_the_commit_visible_to_the_group(self, scenario: Scenario) -> None:
        timeout = Timeout(120)
        daemon, _ = scenario.score(
            plant_samples(3, 120, seed=5), env={"STREAMER_LOG_LEVEL": "debug"}
        )
        done = daemon.wait_event("offsets_committed", timeout)
        assert done["reason"] == "interval", daemon.tail()
        assert 0 <= done["commit_s"] <= done["seconds"], done
        probe = Consumer({"bootstrap.servers": scenario.bootstrap, "group.id": scenario.group})
        try:
            tps = [TopicPartition(scenario.topics.input, int(p)) for p in done["offsets"]]
            got = {tp.partition: tp.offset for tp in probe.committed(tps, timeout=10)}
        finally:
            probe.close()
        # Later rounds may have committed further since; never less than the answer.
        assert all(got[int(p)] >= off for p, off in done["offsets"].items()), (got, done)
        assert daemon.stop() == 0, daemon.tail()
