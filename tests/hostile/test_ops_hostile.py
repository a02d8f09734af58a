"""The operator's side of hostile input: the metrics port, a broker outage, secrets.

Rows 7, 8 and 10 of the hostile-input table, against real daemon processes: 1,000
idle or half-open connections to the metrics port used to take a thread each and
write tracebacks into the JSON log; a 30 s broker outage wrote hundreds of raw
librdkafka lines while /readyz stayed green; a ``sasl.oauthbearer.config`` holding a
client secret was printed at start-up.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.dev.broker import LocalBroker
from tests.conftest import NewTopicFactory
from tests.helpers import Timeout
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
from tests.ops.helpers import http_get, metrics_url

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4
METRICS = {"enabled": True, "port": 0, "stats_interval_s": 2.0}


def test_idle_connections_to_the_metrics_port_cost_nothing(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    """300 idle and 300 half-sent connections: scrapes answer, the loop scores, no traceback."""
    topics = make_topics(new_topic, 1)
    cfg = write_config(
        tmp_path / "c.yaml", kafka_bootstrap, topics, group_id, model_dir, metrics=METRICS
    )
    daemon = DaemonProcess(cfg).start()
    daemons.append(daemon)
    timeout = Timeout(120)
    base = metrics_url(daemon, timeout)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    held = []
    for i in range(600):
        s = socket.create_connection((host, int(port)), timeout=5)
        if i % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        held.append(s)
    started = time.monotonic()
    status, body = http_get(base + "/metrics", timeout_s=10)
    scrape_s = time.monotonic() - started
    assert status == 200 and b"streamer_messages_consumed_total" in body
    # The loop goes on: a stream produced now is scored completely.
    samples = plant_samples(2, 80, seed=12)
    produce(kafka_bootstrap, topics.input, samples)
    wanted = set(expected_windows(topics.input, samples, W, S))
    seen = wait_for_ids(kafka_bootstrap, topics.scores, wanted, timeout, daemon)
    assert wanted <= seen, daemon.tail()
    for s in held:
        s.close()
    time.sleep(1.0)
    status, _ = http_get(base + "/healthz")
    assert status == 200
    assert daemon.stop() == 0, daemon.tail()
    print(f"scrape with 600 connections held: {scrape_s:.3f} s")
    assert scrape_s < 5.0
    assert not [line for line in daemon.lines if "Traceback" in line or "Error:" in line]
    errors = daemon.seen("metrics_client_error")
    assert len(errors) <= 20, len(errors)  # rate-limited, not one per client


def _broker_topics(bootstrap: str) -> Topics:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = {k: f"{k}-{time.time_ns()}" for k in ("input", "scores", "alerts", "dlq", "state")}
    specs = [
        NewTopic(
            n,
            num_partitions=1,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if k == "state" else {},
        )
        for k, n in names.items()
    ]
    for f in admin.create_topics(specs).values():
        f.result(30)
    return Topics(**names, partitions=1)


def test_broker_outage_is_two_lines_and_makes_the_instance_unready(
    model_dir: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """15 s without the broker: one kafka_unreachable, /readyz 503, no raw client lines."""
    broker = LocalBroker(run_dir=tmp_path / "broker")
    bootstrap = broker.start()
    try:
        topics = _broker_topics(bootstrap)
        cfg = write_config(
            tmp_path / "c.yaml",
            bootstrap,
            topics,
            "g-outage",
            model_dir,
            metrics={**METRICS, "unready_after_s": 3.0},
        )
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        timeout = Timeout(240)
        base = metrics_url(daemon, timeout)
        samples = plant_samples(3, 200, seed=13)
        half = len(samples) // 2
        produce(bootstrap, topics.input, samples[:half])
        first = set(expected_windows(topics.input, samples[:half], W, S))
        assert first <= wait_for_ids(bootstrap, topics.scores, first, timeout, daemon)
        assert http_get(base + "/readyz")[0] == 200
        lines_before = len(daemon.lines)
        broker.stop(keep_data=True)
        down = time.monotonic()
        unready = None
        while time.monotonic() - down < 15:
            status, body = http_get(base + "/readyz")
            if status == 503 and unready is None:
                unready = (time.monotonic() - down, body)
            assert http_get(base + "/healthz")[0] == 200  # alive: no restart for an outage
            time.sleep(0.5)
        outage_lines = daemon.lines[lines_before:]
        broker.start()
        produce(bootstrap, topics.input, samples[half:])
        wanted = set(expected_windows(topics.input, samples, W, S))
        seen = wait_for_ids(bootstrap, topics.scores, wanted, timeout, daemon)
        assert wanted <= seen, daemon.tail()
        back = daemon.wait_event("kafka_reachable_again", timeout)
        assert daemon.stop() == 0, daemon.tail()
    finally:
        broker.stop()
    assert unready is not None and b"unreachable" in unready[1], "readyz stayed 200"
    assert unready[0] < 10, unready
    assert len(daemon.seen("kafka_unreachable")) == 1, daemon.tail()
    assert back["down_s"] >= 10, back
    assert not [line for line in daemon.lines if line.startswith("%")], "raw librdkafka lines"
    print(f"log lines during a 15 s outage: {len(outage_lines)}")
    assert len(outage_lines) < 60, "\n".join(outage_lines[-20:])


def test_secrets_in_client_settings_are_never_printed(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    """An OAUTHBEARER config with a client secret stays out of check-config and the log."""
    topics = make_topics(new_topic, 1)
    secret = "clientSecret-hunter2-9f1c"
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        topics,
        group_id,
        model_dir,
        kafka={"client": {"sasl.oauthbearer.config": f"clientId=streamer clientSecret={secret}"}},
    )
    shown = subprocess.run(
        [sys.executable, "-m", "streamer", "check-config", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout + shown.stderr
    daemon = DaemonProcess(cfg).start()
    daemons.append(daemon)
    daemon.wait_event("daemon_ready", Timeout(120))
    assert daemon.stop() == 0, daemon.tail()
    assert not [line for line in daemon.lines if secret in line]
    assert daemon.seen("daemon_configured"), daemon.tail()

    # A mis-cased key is refused at start-up with the key named, its value not shown.
    data = yaml.safe_load(cfg.read_text())
    data["kafka"]["client"] = {"SASL.PASSWORD": secret}
    cfg.write_text(yaml.safe_dump(data))
    refused = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    out = refused.stdout + refused.stderr
    assert "SASL.PASSWORD" in out and "sasl.password" in out
    assert secret not in out
