"""Broker reachability: one line per outage, readiness that follows it.

The tracker is fed librdkafka's own error objects and statistics JSON with a fake
clock; then real clients meet a closed port, and (slow) a broker that dies and
comes back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.config import KafkaConfig
from streamer.dev.broker import LocalBroker
from streamer.kafka.reachability import Reachability
from streamer.kafka.sink import Sink
from streamer.kafka.source import Source
from streamer.metrics import Health
from tests.helpers import CapturedLog, Timeout

ALL_DOWN = RdKafkaError(RdKafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
TRANSPORT = RdKafkaError(RdKafkaError._TRANSPORT, "127.0.0.1:1/bootstrap: Connect failed")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _stats(*states: tuple[str, str]) -> str:
    """librdkafka statistics with brokers in (state, source), as its stats_cb passes them."""
    brokers = {
        f"b{i}": {"name": f"b{i}", "state": st, "source": src} for i, (st, src) in enumerate(states)
    }
    return orjson.dumps(
        {"name": "rdkafka#consumer-1", "type": "consumer", "brokers": brokers}
    ).decode()


UP = _stats(("UP", "learned"), ("INIT", "logical"))
DOWN = _stats(("INIT", "configured"), ("INIT", "logical"))


class _Tracked:
    def __init__(self) -> None:
        self.clock = _Clock()
        self.captured = CapturedLog()
        self.changes: list[float | None] = []
        self.tracker = Reachability(
            self.changes.append, announce_after_s=2.0, logger=self.captured.logger, clock=self.clock
        )

    def lines(self) -> list[str]:
        return [e["event"] for e in self.captured.events()]


@pytest.fixture
def t() -> _Tracked:
    return _Tracked()


class TestReachability:
    def test_one_warning_when_an_outage_starts_and_one_line_when_it_ends(self, t: _Tracked) -> None:
        """Hundreds of errors in an outage make two lines: unreachable, reachable again."""
        t.tracker.on_error("consumer", ALL_DOWN)
        assert t.changes == [100.0] and t.tracker.down_since == 100.0
        for _ in range(100):
            t.tracker.on_error("consumer", TRANSPORT)
        assert t.lines() == []  # not yet announce_after_s
        t.clock.now = 102.5
        for _ in range(100):
            t.tracker.on_error("consumer", TRANSPORT)
            t.tracker.on_error("consumer", ALL_DOWN)
            t.tracker.on_stats("consumer", DOWN)
        (warning,) = t.captured.events()
        assert warning["event"] == "kafka_unreachable" and warning["level"] == "warning"
        assert warning["down_s"] == 2.5 and warning["clients"] == ["consumer"]
        assert "1/1 brokers are down" in warning["reason"] and warning["since"].endswith("+00:00")
        t.clock.now = 130.0
        t.tracker.on_stats("consumer", UP)
        assert t.lines() == ["kafka_unreachable", "kafka_reachable_again"]
        again = t.captured.events()[-1]
        assert again["level"] == "info" and again["down_s"] == 30.0
        assert t.changes == [100.0, None] and t.tracker.down_since is None

    def test_a_blip_shorter_than_announce_after_s_logs_nothing(self, t: _Tracked) -> None:
        """librdkafka's instant all-down while it swaps broker addresses is no outage."""
        t.tracker.on_error("producer", ALL_DOWN)
        t.clock.now = 101.0
        t.tracker.on_stats("producer", UP)
        assert t.lines() == [] and t.changes == [100.0, None]

    def test_clients_sharing_a_tracker_make_one_outage(self, t: _Tracked) -> None:
        """It ends when every client is up again, and starts when the first went down."""
        t.tracker.on_error("consumer", ALL_DOWN)
        t.clock.now = 101.0
        t.tracker.on_error("producer", ALL_DOWN)
        t.clock.now = 103.0
        t.tracker.on_error("producer", TRANSPORT)
        t.tracker.on_error("consumer", TRANSPORT)
        t.clock.now = 110.0
        t.tracker.on_stats("consumer", UP)
        assert t.lines() == ["kafka_unreachable"] and t.tracker.down_since == 100.0
        t.tracker.on_stats("producer", DOWN)
        t.clock.now = 112.0
        t.tracker.on_stats("producer", UP)
        assert t.lines() == ["kafka_unreachable", "kafka_reachable_again"]
        assert t.captured.events()[-1]["down_s"] == 12.0
        assert t.changes == [100.0, None]

    def test_only_a_connected_broker_ends_it(self, t: _Tracked) -> None:
        """The internal pseudo-broker, and statistics that do not parse, keep the outage."""
        t.tracker.on_error("consumer", ALL_DOWN)
        for stats in (
            _stats(("UP", "internal")),
            "{not json",
            "[]",
            orjson.dumps({"brokers": 3}).decode(),
        ):
            t.tracker.on_stats("consumer", stats)
        assert t.tracker.down_since == 100.0
        t.tracker.on_stats("other", UP)  # a client that is not down
        assert t.tracker.down_since == 100.0

    def test_forget_ends_a_closed_clients_outage_without_a_line(self, t: _Tracked) -> None:
        t.tracker.on_error("consumer", ALL_DOWN)
        t.clock.now = 105.0
        t.tracker.on_error("consumer", TRANSPORT)
        t.tracker.forget("consumer")
        assert t.lines() == ["kafka_unreachable"] and t.changes == [100.0, None]

    def test_other_errors_are_rate_limited_per_client_and_code(self, t: _Tracked) -> None:
        auth = RdKafkaError(RdKafkaError._AUTHENTICATION, "SASL authentication failed")
        for _ in range(20):
            t.tracker.on_error("consumer", auth)
        t.tracker.on_error("producer", auth)
        lines = t.captured.events("kafka_client_error")
        assert [e["client"] for e in lines] == ["consumer"] * 5 + ["producer"]
        assert lines[0]["code"] == "_AUTHENTICATION" and lines[0]["level"] == "warning"
        assert t.tracker.down_since is None

    def test_watch_sets_the_stats_callback_and_keeps_a_positive_interval(self, t: _Tracked) -> None:
        settings = t.tracker.watch("consumer", {})
        assert settings["statistics.interval.ms"] == 2000
        assert (
            t.tracker.watch("consumer", {"statistics.interval.ms": 500})["statistics.interval.ms"]
            == 500
        )
        assert (
            t.tracker.watch("consumer", {"statistics.interval.ms": 0})["statistics.interval.ms"]
            == 2000
        )
        t.tracker.on_error("consumer", ALL_DOWN)
        settings["stats_cb"](UP)
        assert t.tracker.down_since is None


class TestHealthFollowsIt:
    def test_ready_until_unready_after_s_then_503_with_the_reason(self) -> None:
        health = Health(stall_after_s=30.0, unready_after_s=5.0)
        health.partitions, health.model_version = (0,), "m"
        assert health.ready and health.broker_down_s is None
        health.set_broker_down_since(time.monotonic() - 4.0)
        assert health.ready  # not yet unready_after_s
        health.set_broker_down_since(time.monotonic() - 6.0)
        assert not health.ready and health.healthy  # liveness is the loop's alone
        health.set_broker_down_since(None)
        assert health.ready


# -- real clients ---------------------------------------------------------------------------


@pytest.fixture
def clients() -> Iterator[tuple[Health, CapturedLog, Source, Sink]]:
    """A Source and a Sink at a closed port, sharing a tracker that feeds a Health."""
    health = Health(stall_after_s=30.0, unready_after_s=1.0)
    health.partitions, health.model_version = (0,), "m"
    captured = CapturedLog()
    tracker = Reachability(
        health.set_broker_down_since, announce_after_s=1.0, logger=captured.logger
    )
    cfg = KafkaConfig(
        bootstrap_servers="127.0.0.1:1",  # nothing listens on port 1
        group_id=f"test-{uuid.uuid4().hex}",
        client={"statistics.interval.ms": 500},
    )
    source = Source(cfg, "nowhere", _ignore, _ignore, _ignore, reachability=tracker)
    sink = Sink(cfg, reachability=tracker)
    try:
        yield health, captured, source, sink
    finally:
        sink.close(timeout_s=1.0)
        source.close()


def _ignore(_partitions: list[int]) -> None:
    return


def _spin(source: Source, sink: Sink, seconds: float) -> None:
    timeout = Timeout(seconds)
    while not timeout.expired:
        source.consume(100, 0.1)
        sink.poll(0.0)


class TestUnreachableBroker:
    def test_one_warning_no_raw_lines_and_unready(
        self, clients: tuple[Health, CapturedLog, Source, Sink], capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Within seconds: one kafka_unreachable for both clients, no ``%3|`` line, /readyz red."""
        health, captured, source, sink = clients
        assert health.ready
        timeout = Timeout(10)
        while not timeout.expired and (health.ready or not captured.events("kafka_unreachable")):
            _spin(source, sink, 0.2)
        _spin(source, sink, 1.5)  # the errors keep coming; the lines do not
        (warning,) = captured.events("kafka_unreachable")
        assert set(warning["clients"]) <= {"consumer", "producer"}
        assert not health.ready and health.healthy
        assert health.broker_down_s is not None and health.broker_down_s > 1.0
        assert captured.events("kafka_client_error") == []
        out, err = capfd.readouterr()
        assert "%3|" not in err + out and "|FAIL|" not in err + out, err[-2000:]


@pytest.mark.slow
class TestBrokerRestart:
    def test_the_outage_is_told_once_and_its_end_too(self) -> None:
        """A broker killed and started again: unreachable, then reachable again with down_s."""
        health = Health(stall_after_s=30.0, unready_after_s=2.0)
        health.partitions, health.model_version = (0,), "m"
        captured = CapturedLog()
        tracker = Reachability(
            health.set_broker_down_since, announce_after_s=1.0, logger=captured.logger
        )
        with LocalBroker() as broker:
            bootstrap = broker.start(timeout_s=180)
            topic = f"test-{uuid.uuid4().hex}"
            admin = AdminClient({"bootstrap.servers": bootstrap})
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[
                topic
            ].result(30)
            cfg = KafkaConfig(
                bootstrap_servers=bootstrap,
                group_id=f"test-{uuid.uuid4().hex}",
                client={"statistics.interval.ms": 500},
            )
            source = Source(cfg, topic, _ignore, _ignore, _ignore, reachability=tracker)
            sink = Sink(cfg, reachability=tracker)
            try:
                _spin(source, sink, 2.0)
                assert captured.events() == [] and health.ready
                broker.kill()
                timeout = Timeout(30)
                while not timeout.expired and (
                    health.ready or not captured.events("kafka_unreachable")
                ):
                    _spin(source, sink, 0.2)
                assert not health.ready
                broker.start(timeout_s=180)
                timeout = Timeout(60)
                while not timeout.expired and not captured.events("kafka_reachable_again"):
                    _spin(source, sink, 0.2)
                # Nothing else: no line per failed connection, no kafka_client_error.
                told = [e["event"] for e in captured.events()]
                assert told == ["kafka_unreachable", "kafka_reachable_again"], [
                    (e.get("code"), e.get("error")) for e in captured.events("kafka_client_error")
                ]
                assert captured.events("kafka_reachable_again")[0]["down_s"] > 2.0
                assert health.ready and health.broker_down_s is None
            finally:
                sink.close(timeout_s=1.0)
                source.close()
