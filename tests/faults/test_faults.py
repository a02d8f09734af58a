"""Fault injection against the real broker: instances dying and joining, the broker
restarting, poison input, overload, silent sensors. Every test checks the output for
completeness by window id.

These tests are slow (each starts one or more daemon processes); they run in CI.
Run only them with ``.venv/bin/python -m pytest tests/faults``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from streamer.dev.broker import LocalBroker
from tests.conftest import NewTopicFactory
from tests.helpers import Timeout
from tests.integration.helpers import (
    T0,
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    validator,
    write_config,
)
from tests.integration.test_daemon import bad_messages

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4
# Short sessions so a killed member's partitions move within seconds, not 45 s.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
# DSPOT moves its threshold with every normal window: a re-warmed sensor is visible.
DSPOT = {"method": "dspot", "risk": 1e-3, "level": 0.95, "depth": 20}


def from_start(bootstrap: str, topic: str) -> Consumer:
    """A consumer in a throwaway group, assigned to every partition of ``topic`` from offset 0."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


def read_messages(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[Message]:
    """Every record of a topic, from the beginning (stops when nothing new comes)."""
    consumer = from_start(bootstrap, topic)
    out: list[Message] = []
    try:
        deadline = Timeout(timeout_s)
        idle = 0
        while not deadline.expired and idle < 3:
            batch = consumer.consume(5000, 0.5)
            idle = 0 if batch else idle + 1
            out += [m for m in batch if m.error() is None]
    finally:
        consumer.close()
    return out


def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[bytes]:
    """Every record value of a topic, from the beginning (stops when nothing new comes)."""
    return [m.value() or b"" for m in read_messages(bootstrap, topic, timeout_s)]


def wait_scores(
    bootstrap: str, topic: str, wanted: set[str], timeout: Timeout, daemons: list[DaemonProcess]
) -> dict[str, list[bytes]]:
    """Score record bytes by id, read until every wanted id arrived (or time runs out)."""
    consumer = from_start(bootstrap, topic)
    by_id: dict[str, list[bytes]] = defaultdict(list)
    try:
        while not timeout.expired and not wanted <= by_id.keys():
            if daemons and all(d.proc.poll() is not None for d in daemons):
                break
            for m in consumer.consume(5000, min(0.5, max(timeout.remaining, 0.01))):
                if m.error() is None:
                    value = m.value() or b""
                    by_id[orjson.loads(value)["id"]].append(value)
    finally:
        consumer.close()
    return by_id


def owned(d: DaemonProcess) -> set[int]:
    """Partitions a daemon owns now, from its latest assignment or revocation event."""
    evs = [
        e for e in list(d.events) if e.get("event") in ("partitions_assigned", "partitions_revoked")
    ]
    return set(evs[-1]["owned"]) if evs else set()


def wait_balanced(daemons: list[DaemonProcess], partitions: int, timeout: Timeout) -> None:
    """Wait until every daemon owns a partition and together they own all of them."""
    while not timeout.expired:
        sets = [owned(d) for d in daemons]
        if all(sets) and set().union(*sets) == set(range(partitions)):
            return
        time.sleep(0.1)
    raise AssertionError("group never balanced\n" + logs(daemons))


def logs(daemons: list[DaemonProcess]) -> str:
    return "\n\n".join(f"--- daemon {i}\n{d.tail(30)}" for i, d in enumerate(daemons))


def assert_complete(
    by_id: dict[str, list[bytes]], expected: set[str], daemons: list[DaemonProcess]
) -> None:
    """Every expected window present; repeats (after a crash) byte-identical; nothing else."""
    missing = expected - by_id.keys()
    assert not missing, f"{len(missing)} windows missing\n{logs(daemons)}"
    assert by_id.keys() <= expected
    check = validator("score")
    for values in by_id.values():
        assert len(set(values)) == 1, "a repeated window differs"
        check.validate(orjson.loads(values[0]))


def group_config(
    tmp: Path, name: str, bootstrap: str, topics: Topics, group: str, model: Path, **extra: Any
) -> Path:
    kafka = {"client": dict(FAST_GROUP)}
    kafka.update(extra.pop("kafka", {}))
    return write_config(tmp / f"{name}.yaml", bootstrap, topics, group, model, kafka=kafka, **extra)


class TestPartitionMove:
    """State moves with a partition: thresholds continue; the new owner closes open alerts."""

    def test_move_keeps_thresholds_and_alerts(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A partition moving A -> B mid-alert publishes exactly the single-instance bytes."""
        timeout = Timeout(240)
        topics = make_topics(new_topic, 2)
        # Every sensor has an anomaly spanning the move, so whichever partition moves
        # carries an alert that opens on A and must close on B.
        anomalies = [(s, 110, 60) for s in range(6)]
        samples = plant_samples(6, 320, seed=5, anomalies=anomalies)
        first = [s for s in samples if s.row < 140]
        rest = [s for s in samples if s.row >= 140]
        sections: dict[str, Any] = {"threshold": DSPOT, "alerts": {"close_after": 6}}

        a = DaemonProcess(
            group_config(tmp_path, "a", kafka_bootstrap, topics, group_id, model_dir, **sections)
        )
        daemons.append(a.start())
        produce(kafka_bootstrap, topics.input, first)
        exp_first = set(expected_windows(topics.input, first, W, S))
        got = wait_scores(kafka_bootstrap, topics.scores, exp_first, timeout, daemons)
        assert exp_first <= got.keys(), logs(daemons)
        open_before = [orjson.loads(v) for v in read_topic(kafka_bootstrap, topics.alerts)]
        assert any(r["state"] == "open" for r in open_before), "no alert open before the move"

        b = DaemonProcess(
            group_config(tmp_path, "b", kafka_bootstrap, topics, group_id, model_dir, **sections)
        )
        daemons.append(b.start())
        moved = b.wait_event("partitions_assigned", timeout)["partitions"]
        assert len(moved) == 1, logs(daemons)
        a.wait_event("partitions_revoked", timeout)
        produce(kafka_bootstrap, topics.input, rest)
        expected = set(expected_windows(topics.input, samples, W, S))
        got = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        assert a.stop() == 0 and b.stop() == 0, logs(daemons)
        moved_run = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, [])
        moved_alerts = read_topic(kafka_bootstrap, topics.alerts)

        # The reference: one instance, same input topic (same ids), its own outputs.
        ref_topics = Topics(
            topics.input,
            new_topic(1),
            new_topic(1),
            new_topic(1),
            new_topic(2, config={"cleanup.policy": "compact"}),
            2,
        )
        ref = DaemonProcess(
            group_config(
                tmp_path,
                "ref",
                kafka_bootstrap,
                ref_topics,
                group_id + "-ref",
                model_dir,
                **sections,
            )
        )
        daemons.append(ref.start())
        ref_run = wait_scores(kafka_bootstrap, ref_topics.scores, expected, timeout, [ref])
        assert ref.stop() == 0, ref.tail()
        ref_alerts = read_topic(kafka_bootstrap, ref_topics.alerts)

        assert_complete(moved_run, expected, daemons)
        assert all(len(v) == 1 for v in moved_run.values()), "a window was published twice"
        assert {k: v[0] for k, v in moved_run.items()} == {k: v[0] for k, v in ref_run.items()}
        assert Counter(moved_alerts) == Counter(ref_alerts)

        # The moved sensors' first window on B has an adapted threshold, not a re-warmed one.
        moved_sensors = {s.sensor for s in samples if s.partition in moved}
        recs = [orjson.loads(v[0]) for v in ref_run.values()]
        for sensor in moved_sensors:
            mine = sorted((r for r in recs if r["sensor"] == sensor), key=lambda r: r["offset"])
            fresh = mine[0]["threshold"]
            first_on_b = next(r for r in mine if r["window_end"] >= 1_764_201_600.0 + 140)
            assert first_on_b["threshold"] != fresh
        # An alert opened on A (before B existed) is closed once, after the move, never reopened.
        alerts = [orjson.loads(v) for v in moved_alerts]
        for rec in open_before:
            if rec["state"] == "open" and rec["sensor"] in moved_sensors:
                same = [r for r in alerts if r["id"] == rec["id"]]
                assert [r["state"] for r in same] == ["open", "closed"]

    def test_the_kept_partition_scores_while_a_taken_one_restores(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A takes B's partition back: while A reads its long state tail, A's own scores go on."""
        timeout = Timeout(300)
        topics = make_topics(new_topic, 2)
        # An uncompacted state tail in both partitions (whichever moves): seconds to read.
        fill_state_tail(kafka_bootstrap, topics.state, records_per_partition=600_000)
        a = DaemonProcess(group_config(tmp_path, "a", kafka_bootstrap, topics, group_id, model_dir))
        daemons.append(a.start())
        a.wait_event("partitions_restored", timeout)
        b = DaemonProcess(group_config(tmp_path, "b", kafka_bootstrap, topics, group_id, model_dir))
        daemons.append(b.start())
        (moved,) = b.wait_event("partitions_restored", timeout)["partitions"]
        samples = plant_samples(6, 400, seed=17)
        writer = threading.Thread(
            target=produce,
            args=(kafka_bootstrap, topics.input, samples),
            kwargs={"rate_per_s": 600.0},
        )
        writer.start()
        time.sleep(1.0)
        assert b.stop() == 0, b.tail()
        while not timeout.expired and len(a.seen("partitions_restored")) < 2:
            time.sleep(0.1)
        writer.join(timeout.remaining)
        expected = set(expected_windows(topics.input, samples, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, [a])
        assert a.stop() == 0, a.tail()
        assert_complete(by_id, expected, daemons)
        assert all(len(v) == 1 for v in by_id.values()), "a clean handover repeats nothing"

        taken = [e for e in a.seen("partitions_assigned") if e["partitions"] == [moved]][-1]
        restored = a.seen("partitions_restored")[-1]
        assert restored["partitions"] == [moved], a.tail(40)
        began, ended = (
            datetime.fromisoformat(e["timestamp"]).timestamp() for e in (taken, restored)
        )
        assert ended - began > 1.0, f"the restore took {ended - began:.2f} s: no tail to read"
        kept = {s.sensor for s in samples if s.partition != moved}
        during = [r for r in score_times(kafka_bootstrap, topics.scores) if began < r[1] < ended]
        assert any(sensor in kept for sensor, _ in during), (
            f"no score of the kept partition in the {ended - began:.1f} s restore\n{a.tail(40)}"
        )
        assert not any(sensor not in kept for sensor, _ in during)


def fill_state_tail(bootstrap: str, topic: str, records_per_partition: int) -> None:
    """Tombstones of ten keys in every partition of a state topic: read through, install nothing."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.size": 1_000_000})
    parts = producer.list_topics(topic, timeout=10).topics[topic].partitions
    for p in parts:
        for i in range(records_per_partition):
            while True:
                try:
                    producer.produce(topic, None, key=b"tail-%d" % (i % 10), partition=p)
                    break
                except BufferError:
                    producer.poll(0.05)
    assert producer.flush(60) == 0


def score_times(bootstrap: str, topic: str) -> list[tuple[str, float]]:
    """(sensor, broker timestamp in epoch seconds) of every score record."""
    return [
        (orjson.loads(m.value() or b"")["sensor"], m.timestamp()[1] / 1000)
        for m in read_messages(bootstrap, topic, timeout_s=60)
    ]


class TestInstanceFailures:
    """Instances dying and joining mid-stream."""

    def test_three_instances_one_killed(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """SIGKILL one of three instances mid-stream: the others take over; every window present."""
        timeout = Timeout(240)
        topics = make_topics(new_topic, 6)
        samples = plant_samples(12, 300, seed=6)
        for i in range(3):
            cfg = group_config(tmp_path, f"i{i}", kafka_bootstrap, topics, group_id, model_dir)
            daemons.append(DaemonProcess(cfg).start())
        wait_balanced(daemons, 6, timeout)
        half = len(samples) // 2
        produce(kafka_bootstrap, topics.input, samples[:half])
        victim = daemons[0]
        lost = owned(victim)
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivors = [d for d in daemons if d is not victim]
        marks = [len(d.events) for d in survivors]
        taken: set[int] = set()
        while not timeout.expired and not lost <= taken:
            for d, mark in zip(survivors, marks, strict=True):
                for ev in list(d.events)[mark:]:
                    if ev.get("event") == "partitions_assigned":
                        taken |= set(ev["partitions"])
            time.sleep(0.05)
        takeover_s = time.monotonic() - killed_at
        assert lost <= taken, logs(daemons)
        print(f"\ntakeover of partitions {sorted(lost)} after SIGKILL: {takeover_s:.1f} s")
        produce(kafka_bootstrap, topics.input, samples[half:])
        expected = set(expected_windows(topics.input, samples, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, survivors)
        for d in survivors:
            assert d.stop() == 0, d.tail()
        assert_complete(by_id, expected, daemons)

    def test_fourth_instance_joins(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A fourth instance joining mid-stream takes partitions; nothing is lost or duplicated."""
        timeout = Timeout(240)
        topics = make_topics(new_topic, 6)
        samples = plant_samples(12, 300, seed=7)
        for i in range(3):
            cfg = group_config(tmp_path, f"i{i}", kafka_bootstrap, topics, group_id, model_dir)
            daemons.append(DaemonProcess(cfg).start())
        third = len(samples) // 3
        produce(kafka_bootstrap, topics.input, samples[:third])
        cfg = group_config(tmp_path, "i3", kafka_bootstrap, topics, group_id, model_dir)
        late = DaemonProcess(cfg)
        daemons.append(late.start())
        produce(kafka_bootstrap, topics.input, samples[third:], rate_per_s=4000)
        assert late.wait_event("partitions_assigned", timeout)["partitions"], logs(daemons)
        expected = set(expected_windows(topics.input, samples, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        for d in daemons:
            assert d.stop() == 0, d.tail()
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, [])
        assert_complete(by_id, expected, daemons)
        dupes = [k for k, v in by_id.items() if len(v) > 1]
        assert not dupes, f"{len(dupes)} windows published twice\n{logs(daemons)}"


class TestBrokerRestart:
    """The broker goes away and comes back on the same data directory."""

    def test_daemon_reconnects_and_loses_nothing(
        self, model_dir: Path, tmp_path: Path, daemons: list[DaemonProcess]
    ) -> None:
        """Stopping and restarting the broker mid-stream loses no window."""
        from confluent_kafka.admin import AdminClient, NewTopic

        timeout = Timeout(300)
        broker = LocalBroker(run_dir=tmp_path / "broker")
        bootstrap = broker.start()
        try:
            admin = AdminClient({"bootstrap.servers": bootstrap})
            names = {
                k: f"{k}-{time.time_ns()}" for k in ("input", "scores", "alerts", "dlq", "state")
            }
            specs = [
                NewTopic(
                    n,
                    num_partitions=2 if k in ("input", "state") else 1,
                    replication_factor=1,
                    config={"cleanup.policy": "compact"} if k == "state" else {},
                )
                for k, n in names.items()
            ]
            for f in admin.create_topics(specs).values():
                f.result(30)
            topics = Topics(**names, partitions=2)
            samples = plant_samples(6, 300, seed=8)
            cfg = write_config(tmp_path / "c.yaml", bootstrap, topics, "g-restart", model_dir)
            daemon = DaemonProcess(cfg)
            daemons.append(daemon.start())
            half = len(samples) // 2
            produce(bootstrap, topics.input, samples[:half])
            first = set(expected_windows(topics.input, samples[:half], W, S))
            got = wait_scores(bootstrap, topics.scores, first, timeout, daemons)
            assert first <= got.keys(), daemon.tail()
            broker.stop(keep_data=True)
            time.sleep(3)
            assert daemon.proc.poll() is None, "the daemon died with the broker:\n" + daemon.tail()
            broker.start()
            produce(bootstrap, topics.input, samples[half:])
            expected = set(expected_windows(topics.input, samples, W, S))
            by_id = wait_scores(bootstrap, topics.scores, expected, timeout, daemons)
            assert daemon.stop() == 0, daemon.tail()
            assert_complete(by_id, expected, daemons)
        finally:
            broker.stop()


class TestPoisonAndOverload:
    """Bad input spread through a long stream, and input far faster than scoring."""

    def test_poison_load(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """One message in a hundred malformed: each lands in the DLQ, every good one is scored."""
        timeout = Timeout(240)
        topics = make_topics(new_topic, 2)
        good = plant_samples(8, 1500, seed=9)
        kinds = [b for b in bad_messages() if b.kind != "out_of_order"]
        mixed: list[Sample] = []
        bad: list[Sample] = []
        for i, s in enumerate(good):
            mixed.append(s)
            if i % 100 == 99:
                proto = kinds[len(bad) % len(kinds)]
                poison = Sample(proto.sensor, proto.key, proto.value, False, proto.kind)
                bad.append(poison)
                mixed.append(poison)
        assert len({b.kind for b in bad}) >= 10
        produce(kafka_bootstrap, topics.input, mixed)
        expected = set(expected_windows(topics.input, mixed, W, S))
        daemon = DaemonProcess(
            write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
        )
        daemons.append(daemon.start())
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        assert daemon.stop() == 0, daemon.tail()
        assert_complete(by_id, expected, daemons)
        dlq = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": f"dlq-{time.time_ns()}",
                "enable.auto.commit": False,
            }
        )
        dlq.assign([TopicPartition(topics.dlq, 0, OFFSET_BEGINNING)])
        letters: list[tuple[int, int, str]] = []
        wait = Timeout(30)
        while not wait.expired and len(letters) < len(bad):
            for m in dlq.consume(1000, 0.5):
                h = {k: v.decode() for k, v in (m.headers() or [])}
                letters.append(
                    (int(h["source.partition"]), int(h["source.offset"]), h["error.kind"])
                )
        dlq.close()
        want = {(b.partition, b.offset, b.kind) for b in bad}
        assert want <= set(letters), f"missing dead letters: {sorted(want - set(letters))[:5]}"
        print(
            f"\npoison load: {len(mixed)} messages, {len(bad)} dead letters, "
            f"{len({b.kind for b in bad})} kinds"
        )

    def test_overload_bounded_memory_and_drains(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A backlog far larger than the daemon scores per second: RSS stays bounded, lag drains."""
        timeout = Timeout(300)
        topics = make_topics(new_topic, 2)
        samples = plant_samples(50, 1200, seed=10)  # 60,000 messages produced at full speed
        cfg = write_config(
            tmp_path / "c.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            model_dir,
            stream={"stride": 1},
            # A consumed batch completes more windows than may wait for the worker, so the
            # daemon must hold consumption however fast the model scores.
            inference={"queue_size": 2, "max_batch": 256, "threads": 1, "max_queued_windows": 256},
            metrics={"enabled": False, "stats_interval_s": 1.0},
        )
        daemon = DaemonProcess(cfg)
        daemons.append(daemon.start())
        daemon.wait_event("partitions_assigned", timeout)
        produce(kafka_bootstrap, topics.input, samples)
        expected = set(expected_windows(topics.input, samples, W, 1))
        by_id: dict[str, list[bytes]] = {}
        while not timeout.expired:
            daemon.sample_rss()
            by_id = wait_scores(kafka_bootstrap, topics.scores, expected, Timeout(5), daemons)
            if expected <= by_id.keys() or daemon.proc.poll() is not None:
                break
        peak_mb = daemon.sample_rss() / 1024
        assert daemon.stop() == 0, daemon.tail()
        assert_complete(by_id, expected, daemons)
        lags = [
            ev.get("lag") for ev in daemon.seen("stats") if isinstance(ev.get("lag"), int | float)
        ]
        print(
            f"\noverload: {len(expected)} windows, peak RSS {peak_mb:.0f} MiB, lag over time {lags}"
        )
        assert daemon.seen("consumption_paused"), "the daemon never applied backpressure"
        assert peak_mb < 1500
        if lags:
            assert max(lags) > 0
            assert lags[-1] <= max(lags)


class TestSilentSensors:
    """Sensors that fall silent do not pin the commit; a returning sensor starts afresh."""

    def test_commit_not_pinned_and_fresh_window_after_gap(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A silent sensor is evicted (the commit moves on); on return its window starts afresh."""
        timeout = Timeout(180)
        topics = make_topics(new_topic, 1)
        samples = plant_samples(4, 600, seed=11)
        # sensor-3 is silent from row 100 to row 400 (300 s > max_gap_s of 60 s).
        samples = [s for s in samples if not (s.sensor == "sensor-3" and 100 <= s.row < 400)]
        phase1 = [s for s in samples if s.row < 400]
        phase2 = [s for s in samples if s.row >= 400]
        # The gap resets sensor-3's window: its windows restart at its return.
        before = [s for s in samples if s.sensor != "sensor-3" or s.row < 100]
        after = [s for s in samples if s.sensor == "sensor-3" and s.row >= 400]
        cfg = write_config(
            tmp_path / "c.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            model_dir,
            stream={"max_gap_s": 60.0},
        )
        daemon = DaemonProcess(cfg)
        daemons.append(daemon.start())
        produce(kafka_bootstrap, topics.input, phase1)
        evicted = daemon.wait_event("sensor_evicted", timeout)
        assert evicted["sensor"] == "sensor-3", daemon.tail(60)

        # While sensor-3 is silent the commit moves past its last sample.
        last_before = max(s.offset for s in samples if s.sensor == "sensor-3" and s.row < 100)
        probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
        committed = -1
        while not timeout.expired and committed <= last_before + 500:
            tp = probe.committed([TopicPartition(topics.input, 0)], timeout=10)[0]
            committed = tp.offset
            time.sleep(0.5)
        probe.close()
        assert committed > last_before + 500, f"commit pinned at {committed}\n{daemon.tail(40)}"

        produce(kafka_bootstrap, topics.input, phase2)
        expected = set(expected_windows(topics.input, before, W, S))
        expected |= set(expected_windows(topics.input, after, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        assert daemon.stop() == 0, daemon.tail()
        assert_complete(by_id, expected, daemons)

        recs = [orjson.loads(v[0]) for v in by_id.values()]
        back = sorted(
            (
                r
                for r in recs
                if r["sensor"] == "sensor-3" and r["window_end"] >= 1_764_201_600.0 + 400
            ),
            key=lambda r: r["window_end"],
        )
        assert back[0]["window_start"] == 1_764_201_600.0 + 400
        assert back[0]["window_end"] == 1_764_201_600.0 + 400 + W - 1

    def test_a_parked_window_survives_a_restart_and_completes_on_return(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """Silent past park_after_s, a sensor stops pinning the commit; its partial window,
        saved with its state, outlives a restart and completes when the sensor speaks again.
        """
        timeout = Timeout(180)
        topics = make_topics(new_topic, 1)
        samples = plant_samples(4, 600, seed=13)
        # sensor-3 is silent from row 102 to row 399: 298 s, under max_gap_s, so its window
        # continues across the silence (rows 88-101 and 400-401 make its next window).
        samples = [s for s in samples if not (s.sensor == "sensor-3" and 102 <= s.row < 400)]
        phase1 = [s for s in samples if s.row < 400]
        phase2 = [s for s in samples if s.row >= 400]
        cfg = write_config(
            tmp_path / "c.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            model_dir,
            stream={"max_gap_s": 400.0, "park_after_s": 30.0},
        )
        first = DaemonProcess(cfg)
        daemons.append(first.start())
        produce(kafka_bootstrap, topics.input, phase1)
        parked = first.wait_event("sensors_parked", timeout)
        assert parked["sensors"] == 1, first.tail(40)
        # Not evicted, yet the commit moves past its last sample: it no longer pins it.
        last_before = max(s.offset for s in samples if s.sensor == "sensor-3" and s.row < 102)
        probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
        committed = -1
        while not timeout.expired and committed <= last_before + 500:
            committed = probe.committed([TopicPartition(topics.input, 0)], timeout=10)[0].offset
            time.sleep(0.5)
        probe.close()
        assert committed > last_before + 500, f"commit pinned at {committed}\n{first.tail(40)}"
        assert first.stop() == 0, first.tail()
        assert not first.seen("sensor_evicted")
        states = [orjson.loads(v) for v in read_topic(kafka_bootstrap, topics.state) if v]
        saved = [r for r in states if r["sensor"] == "sensor-3"][-1]
        assert saved["version"] == 3 and saved["ring"]["saved"]["count"] == 102

        second = DaemonProcess(cfg)
        daemons.append(second.start())
        produce(kafka_bootstrap, topics.input, phase2)
        expected = set(expected_windows(topics.input, samples, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        assert second.stop() == 0, second.tail()
        assert_complete(by_id, expected, daemons)
        assert all(len(v) == 1 for v in by_id.values()), "a clean stop repeats nothing"
        recs = [orjson.loads(v[0]) for v in by_id.values()]
        across = sorted(
            (
                (r["window_start"] - T0, r["window_end"] - T0)
                for r in recs
                if r["sensor"] == "sensor-3"
                and r["window_start"] < T0 + 102 < T0 + 400 <= r["window_end"]
            ),
        )
        assert across == [(88, 401), (92, 405), (96, 409), (100, 413)], second.tail(40)
        assert not read_topic(kafka_bootstrap, topics.dlq, timeout_s=3)


class TestCorruptState:
    """Unknown or corrupt state records are reported; those sensors re-warm from calibration."""

    def test_corrupt_and_unknown_state_records(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """A garbage record and a future-version record are logged; every window is still scored."""
        from confluent_kafka import Producer

        timeout = Timeout(120)
        topics = make_topics(new_topic, 1)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topics.state, b"\x00not json", key=b"sensor-0", partition=0)
        future = {"version": 99, "sensor": "sensor-1", "partition": 0, "upto": 5}
        producer.produce(topics.state, orjson.dumps(future), key=b"sensor-1", partition=0)
        assert producer.flush(30) == 0
        samples = plant_samples(3, 200, seed=12)
        produce(kafka_bootstrap, topics.input, samples)
        expected = set(expected_windows(topics.input, samples, W, S))
        cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir)
        daemon = DaemonProcess(cfg)
        daemons.append(daemon.start())
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, daemons)
        assert daemon.stop() == 0, daemon.tail()
        assert_complete(by_id, expected, daemons)
        corrupt = {e["sensor"] for e in daemon.seen("state_corrupt")}
        assert corrupt == {"sensor-0", "sensor-1"}, daemon.tail(40)
        # Re-warmed from calibration: their first threshold is a fresh sensor's first one.
        recs = [orjson.loads(v[0]) for v in by_id.values()]
        first = {
            s: min((r for r in recs if r["sensor"] == s), key=lambda r: r["offset"])["threshold"]
            for s in ("sensor-0", "sensor-1", "sensor-2")
        }
        assert first["sensor-0"] == first["sensor-2"] == first["sensor-1"]
