"""Metrics registry, batch histogram and the /metrics, /healthz, /readyz server, in process."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY, generate_latest

from streamer.codec import DLQ_KINDS
from streamer.config import MetricsConfig
from streamer.errors import StreamerError
from streamer.metrics import ArrayHistogram, Health, Metrics, MetricsServer, metric_names
from tests.helpers import Timeout
from tests.ops.helpers import http_get, scrape


class TestArrayHistogram:
    """A histogram fed a numpy array per call exports what Prometheus expects."""

    def test_buckets_count_and_sum(self) -> None:
        """Values land in cumulative le-buckets (bound inclusive); NaN and inf are ignored."""
        m = Metrics()
        h = ArrayHistogram("t_latency_seconds", "test", [0.1, 1.0, 10.0], m.registry)
        h.observe(np.array([0.05, 0.1, 0.5, 1.0, 3.0, 100.0, np.nan, np.inf]))
        h.observe(np.array([]))
        samples = {
            (s.name, s.labels.get("le")): s.value
            for fam in m.registry.collect()
            if fam.name == "t_latency_seconds"
            for s in fam.samples
        }
        assert samples[("t_latency_seconds_bucket", "0.1")] == 2
        assert samples[("t_latency_seconds_bucket", "1.0")] == 4
        assert samples[("t_latency_seconds_bucket", "10.0")] == 5
        assert samples[("t_latency_seconds_bucket", "+Inf")] == 6
        assert samples[("t_latency_seconds_count", None)] == 6 == h.count
        assert samples[("t_latency_seconds_sum", None)] == pytest.approx(104.65)

    def test_rejects_bad_buckets(self) -> None:
        """Buckets must be finite and non-empty."""
        with pytest.raises(ValueError, match="buckets"):
            ArrayHistogram("t_bad", "test", [], Metrics().registry)


class TestMetrics:
    """The daemon's series live in their own registry with bounded labels."""

    def test_own_registry(self) -> None:
        """Two instances coexist and nothing is registered in the global registry."""
        a, b = Metrics(), Metrics()
        a.messages_consumed.inc(3)
        assert b"streamer_messages_consumed_total 3.0" in generate_latest(a.registry)
        assert b"streamer_messages_consumed_total 0.0" in generate_latest(b.registry)
        assert not any(n.startswith("streamer_") for n in metric_names(REGISTRY))

    def test_labels_are_bounded(self) -> None:
        """Only kind, partition, result and version labels exist; DLQ kinds are pre-created."""
        m = Metrics()
        m.set_lag({0: 5, 1: 7})
        m.set_lag({1: 2})  # partition 0 revoked: its series goes away
        text = generate_latest(m.registry).decode()
        assert 'streamer_consumer_lag_messages{partition="0"}' not in text
        assert 'streamer_consumer_lag_messages{partition="1"} 2.0' in text
        for kind in DLQ_KINDS:
            assert f'streamer_dead_letters_total{{kind="{kind}"}} 0.0' in text
        labels = {
            k
            for fam in m.registry.collect()
            if fam.name.startswith("streamer_")
            for s in fam.samples
            for k in s.labels
        }
        assert labels <= {"kind", "partition", "result", "version", "le"}

    def test_model_info(self) -> None:
        """The model in use is an info series labelled with its version, with its load time."""
        m = Metrics()
        m.model_in_use("conv1d-abc", 0.25)
        m.model_in_use("conv1d-def", 0.5)
        text = generate_latest(m.registry).decode()
        assert 'streamer_model_info{version="conv1d-def"} 1.0' in text
        assert "conv1d-abc" not in text
        assert "streamer_model_load_seconds 0.5" in text


@pytest.fixture
def served() -> Iterator[tuple[Health, Metrics, str]]:
    """A metrics server on an ephemeral localhost port; closed after the test."""
    health = Health(stall_after_s=0.3)
    metrics = Metrics()
    metrics.track_health(health)
    server = MetricsServer(metrics.registry, health, "127.0.0.1", 0)
    host, port = server.start()
    yield health, metrics, f"http://{host}:{port}"
    server.close()


class TestMetricsServer:
    """The HTTP endpoints report metrics, liveness of the loop, and readiness."""

    def test_metrics_endpoint(self, served: tuple[Health, Metrics, str]) -> None:
        """/metrics serves the registry in the Prometheus text format."""
        _, metrics, url = served
        metrics.windows_scored.inc(42)
        values = scrape(url + "/metrics")
        assert values["streamer_windows_scored_total"] == 42
        assert values["process_resident_memory_bytes"] > 0
        assert http_get(url + "/nope")[0] == 404

    def test_healthz_follows_the_heartbeat(self, served: tuple[Health, Metrics, str]) -> None:
        """/healthz is 200 while the loop beats and 503 once it stops for stall_after_s."""
        health, _, url = served
        health.beat()
        assert http_get(url + "/healthz")[0] == 200
        timeout = Timeout(5)
        while not timeout.expired and http_get(url + "/healthz")[0] == 200:
            time.sleep(0.05)
        status, body = http_get(url + "/healthz")
        assert status == 503 and orjson.loads(body)["healthy"] is False
        assert scrape(url + "/metrics")["streamer_seconds_since_progress"] > 0.3
        health.beat()
        assert http_get(url + "/healthz")[0] == 200

    def test_readyz_needs_partitions_and_model(self, served: tuple[Health, Metrics, str]) -> None:
        """/readyz is 503 until partitions are assigned and a model is loaded."""
        health, _, url = served
        assert http_get(url + "/readyz")[0] == 503
        health.model_version = "conv1d-abc"
        assert http_get(url + "/readyz")[0] == 503
        health.partitions = (0, 2)
        status, body = http_get(url + "/readyz")
        assert status == 200
        assert orjson.loads(body) == {"ready": True, "partitions": [0, 2], "model": "conv1d-abc"}
        assert scrape(url + "/metrics")["streamer_ready"] == 1
        health.partitions = ()
        assert http_get(url + "/readyz")[0] == 503

    def test_readyz_says_a_restore_in_progress(self, served: tuple[Health, Metrics, str]) -> None:
        """While a state restore reads, /readyz says how far it got.

        Not ready until the first partitions are restored; partitions already held go on
        serving while others are restored.
        """
        health, _, url = served
        health.model_version = "m"
        health.restoring = "state [0, 1]: 1,234,567 records read in 41 s"
        status, body = http_get(url + "/readyz")
        assert status == 503
        assert orjson.loads(body)["restoring"] == health.restoring
        health.partitions = (0,)
        health.restoring = "state [1]: 20 records read in 0 s"
        status, body = http_get(url + "/readyz")
        assert status == 200 and orjson.loads(body)["restoring"] == health.restoring
        health.restoring = None
        status, body = http_get(url + "/readyz")
        assert status == 200 and "restoring" not in orjson.loads(body)

    def test_readyz_turns_503_while_kafka_is_unreachable(
        self, served: tuple[Health, Metrics, str]
    ) -> None:
        """Past unready_after_s without a broker /readyz is 503 and says why; /healthz stays 200."""
        health, _, url = served
        health.partitions, health.model_version = (0,), "m"
        health.set_broker_down_since(time.monotonic() - 3.0)  # within the default 10 s
        status, body = http_get(url + "/readyz")
        assert status == 200 and re.fullmatch(
            r"unreachable for 3\.\d s", orjson.loads(body)["kafka"]
        )
        health.set_broker_down_since(time.monotonic() - 12.3)
        health.beat()
        status, body = http_get(url + "/readyz")
        assert status == 503
        got = orjson.loads(body)
        assert re.fullmatch(r"unreachable for 12\.\d s", got.pop("kafka"))
        assert got == {"ready": False, "partitions": [0], "model": "m"}
        assert http_get(url + "/healthz")[0] == 200
        values = scrape(url + "/metrics")
        assert values["streamer_ready"] == 0
        assert values["streamer_kafka_unreachable_seconds"] > 12
        health.set_broker_down_since(None)
        status, body = http_get(url + "/readyz")
        assert status == 200 and "kafka" not in orjson.loads(body)
        assert scrape(url + "/metrics")["streamer_kafka_unreachable_seconds"] == 0

    def test_binds_localhost_by_default(self) -> None:
        """The default bind address is loopback only."""
        assert MetricsConfig().host == "127.0.0.1"

    def test_port_in_use_is_an_error(self) -> None:
        """A port already taken raises StreamerError naming the address."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = MetricsServer(Metrics().registry, Health(1.0), "127.0.0.1", port)
            with pytest.raises(StreamerError, match=f"127.0.0.1:{port}"):
                server.start()
