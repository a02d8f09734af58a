"""The daemon's operations surface, as a real subprocess on the real broker.

Metrics and health endpoints, the systemd notify protocol against a socket the
test opens, model hot reload (SIGHUP and file watch), and secrets kept out of the
logs. Every wait is bounded by a ``Timeout``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from tests.conftest import NewTopicFactory
from tests.helpers import Timeout, consume_all
from tests.integration.helpers import (
    REPO,
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    wait_for_ids,
    write_config,
)
from tests.ops.helpers import http_get, metrics_url, notify_listener, scrape, swap_symlink

pytestmark = pytest.mark.kafka

W, S = 16, 4


def version_of(model_dir: Path) -> str:
    """The model version recorded in a checkpoint's sidecar."""
    return str(orjson.loads((model_dir / "model.json").read_bytes())["model_version"])


def model_link(tmp_path: Path, target: Path) -> Path:
    """``models/current`` as a symlink to ``target``: how operators rotate models."""
    link = tmp_path / "models" / "current"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def with_model_settings(cfg: Path, **settings: Any) -> Path:
    """Add ``model`` settings to a config from ``write_config`` (its ``model`` is the path)."""
    data = yaml.safe_load(cfg.read_text())
    data["model"].update(settings)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def read_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record in ``topic`` so far, decoded."""
    return [orjson.loads(m.value() or b"") for m in consume_all(bootstrap, topic, timeout_s=30)]


def wait_events(
    daemon: DaemonProcess, event: str, n: int, timeout: Timeout
) -> list[dict[str, Any]]:
    """Wait until the daemon logged ``event`` at least ``n`` times."""
    while not timeout.expired:
        found = daemon.seen(event)
        if len(found) >= n or daemon.proc.poll() is not None:
            break
        time.sleep(0.05)
    found = daemon.seen(event)
    assert len(found) >= n, f"{len(found)} {event!r} events; log tail:\n{daemon.tail()}"
    return found


class GroupMember:
    """A plain consumer in the daemon's group that holds partitions until closed."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                # The daemon's protocol: members of one group must agree on it.
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.auto.commit": False,
            }
        )
        self.assigned: set[int] = set()
        self._stop = threading.Event()
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _on_assign(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        self.assigned |= {tp.partition for tp in parts}

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        self.assigned -= {tp.partition for tp in parts}

    def _poll(self) -> None:
        # Keep polling: a member that stops polling stalls every rebalance of the group.
        while not self._stop.is_set():
            self.consumer.poll(0.1)

    def wait_assigned(self, timeout: Timeout) -> None:
        while not timeout.expired and not self.assigned:
            time.sleep(0.05)
        assert self.assigned, "the group member got no partition"

    def close(self) -> None:
        """Leave the group (its partitions go to the other members)."""
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def bad_samples() -> list[Sample]:
    """Three malformed messages of known kinds."""
    wrong = orjson.dumps({"sensor": "sensor-0", "ts": time.time(), "values": [1.0, 2.0]})
    return [
        Sample("sensor-0", b"sensor-0", b'{"sensor": "sensor-0", "ts": ', False, "bad_json"),
        Sample("sensor-0", b"sensor-0", wrong, False, "wrong_channel_count"),
        Sample("sensor-2", b"sensor-2", None, False, "empty"),
    ]


class TestMetricsEndpoint:
    """/metrics, /healthz and /readyz of a running daemon."""

    def test_series_move_and_readiness_flips(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """/readyz is 503 until a partition is assigned; then every series counts what flowed."""
        timeout = Timeout(90)
        topics = make_topics(new_topic, 1)
        holder = GroupMember(kafka_bootstrap, group_id, topics.input)
        try:
            holder.wait_assigned(timeout)
            cfg = write_config(
                tmp_path / "cfg.yaml",
                kafka_bootstrap,
                topics,
                group_id,
                models["a"],
                metrics={"enabled": True, "port": 0},
            )
            daemon = DaemonProcess(cfg).start()
            daemons.append(daemon)
            url = metrics_url(daemon, timeout)
            daemon.wait_event("daemon_ready", timeout)
            # In the group, alive, but the only partition belongs to the other member.
            for _ in range(5):
                assert http_get(url + "/readyz")[0] == 503
                time.sleep(0.1)
            assert http_get(url + "/healthz")[0] == 200
        finally:
            holder.close()
        while not timeout.expired and http_get(url + "/readyz")[0] != 200:
            time.sleep(0.1)
        status, body = http_get(url + "/readyz")
        assert status == 200, daemon.tail()
        assert orjson.loads(body) == {
            "ready": True,
            "partitions": [0],
            "model": version_of(models["a"]),
        }

        rows = 240
        samples = plant_samples(4, rows, seed=3, anomalies=[(1, 150, 8)], t0=time.time() - rows)
        bad = bad_samples()
        stream = samples[:300] + bad + samples[300:]
        produce(kafka_bootstrap, topics.input, stream)
        expected = expected_windows(topics.input, stream, W, S)
        lag = 'streamer_consumer_lag_messages{partition="0"}'
        values: dict[str, float] = {}
        while not timeout.expired:
            values = scrape(url + "/metrics")
            if (
                values["streamer_windows_scored_total"] == len(expected)
                and values["streamer_end_to_end_latency_seconds_count"] == len(expected)
                and values.get(lag) == 0
                # Gauges are refreshed once a second: wait for a refresh after the stream
                # (a small stream is scored within one, so lag and queue read 0 before it).
                and values.get("streamer_sensors") == 4
                and values.get("streamer_inference_queue_depth") == 0
                and values.get("streamer_inference_queued_windows") == 0
                and values.get("streamer_partitions_paused") == 0
                # A round commits once its records are acknowledged and the coordinator
                # answers: on a loaded machine that can come after the last score.
                and values.get("streamer_commits_total", 0) >= 1
            ):
                break
            time.sleep(0.2)
        assert values["streamer_messages_consumed_total"] == len(stream), daemon.tail()
        assert values["streamer_samples_decoded_total"] == len(samples)
        assert values["streamer_windows_scored_total"] == len(expected)
        for b in bad:
            assert values[f'streamer_dead_letters_total{{kind="{b.kind}"}}'] == 1
        dead = sum(v for k, v in values.items() if k.startswith("streamer_dead_letters_total{"))
        assert dead == len(bad)
        assert values["streamer_inference_batch_windows_sum"] == len(expected)
        batches = values["streamer_inference_batch_windows_count"]
        assert batches >= 1
        assert values["streamer_inference_latency_seconds_count"] == batches
        assert values["streamer_inference_latency_seconds_sum"] > 0
        e2e_n = values["streamer_end_to_end_latency_seconds_count"]
        assert e2e_n == len(expected)
        # Samples stamped over the last `rows` seconds: no window is older than that.
        assert 0 < values["streamer_end_to_end_latency_seconds_sum"] / e2e_n < rows + 60
        assert values[lag] == 0
        assert values["streamer_alerts_opened_total"] >= 1
        assert values["streamer_alerts_open"] >= 0
        assert values[f'streamer_model_info{{version="{version_of(models["a"])}"}}'] == 1
        assert values["streamer_model_load_seconds"] > 0
        assert values["streamer_partitions_assigned"] == 1
        assert values["streamer_partitions_paused"] == 0
        assert values["streamer_inference_queue_depth"] == 0
        assert values["streamer_inference_queued_windows"] == 0
        assert values["streamer_sensors"] == 4
        assert values["streamer_ready"] == 1
        assert values["streamer_commits_total"] >= 1
        assert values["process_resident_memory_bytes"] > 0
        print(
            f"\n{len(expected)} windows in {int(batches)} forward passes; mean end-to-end "
            f"{values['streamer_end_to_end_latency_seconds_sum'] / e2e_n:.1f} s "
            f"(samples stamped over the last {rows} s)"
        )
        assert daemon.stop() == 0, daemon.tail()


class TestSystemdNotify:
    """READY, WATCHDOG and STOPPING reach the socket named by NOTIFY_SOCKET."""

    def test_ready_watchdog_stall_and_stopping(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """READY once consuming, pings every half interval, none while stopped, STOPPING."""
        timeout = Timeout(60)
        topics = make_topics(new_topic, 1)
        cfg = write_config(tmp_path / "cfg.yaml", kafka_bootstrap, topics, group_id, models["a"])
        with notify_listener() as listener:
            env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "400000"}
            daemon = DaemonProcess(cfg, env=env).start()
            daemons.append(daemon)
            ready = listener.wait_for("READY", timeout)
            assert ready["READY"] == "1" and topics.input in ready["STATUS"]
            pings = [f for f in listener.read(1.2) if "WATCHDOG" in f]
            assert len(pings) >= 3, listener.received

            # A stuck process: SIGSTOP freezes the loop (and everything else) for real.
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                listener.read(0.3)  # anything sent before the stop took hold
                while_stopped = listener.read(1.5)
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            assert while_stopped == []
            listener.wait_for("WATCHDOG", Timeout(5))

            daemon.proc.send_signal(signal.SIGTERM)
            stopping = listener.wait_for("STOPPING", timeout)
            assert stopping["STOPPING"] == "1"
            assert daemon.proc.wait(timeout.remaining) == 0, daemon.tail()
        enabled = daemon.seen("watchdog_enabled")
        assert enabled and enabled[0]["ping_every_s"] == pytest.approx(0.2), daemon.tail()


class TestHotReload:
    """A new model is swapped in between batches; a bad one leaves the old one scoring."""

    def test_sighup_swaps_model_without_losing_windows(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """After SIGHUP scores carry model B's version; every window appears exactly once."""
        timeout = Timeout(90)
        topics = make_topics(new_topic, 2)
        link = model_link(tmp_path, models["a"])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            link,
        )
        # SIGHUP only (no file watch): this test is about the signal.
        cfg = with_model_settings(cfg, watch_interval_s=0)
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        samples = plant_samples(4, 200, seed=4)
        head = [s for s in samples if s.row < 100]
        tail = [s for s in samples if s.row >= 100]
        produce(kafka_bootstrap, topics.input, head)
        exp_head = set(expected_windows(topics.input, head, W, S))
        assert exp_head <= wait_for_ids(kafka_bootstrap, topics.scores, exp_head, timeout, daemon)

        swap_symlink(link, models["b"])
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_event("model_reloaded", timeout)
        assert reloaded["trigger"] == "signal"
        assert reloaded["previous"] == version_of(models["a"])
        assert reloaded["model"] == version_of(models["b"])
        produce(kafka_bootstrap, topics.input, tail)
        expected = set(expected_windows(topics.input, samples, W, S))
        wait_for_ids(kafka_bootstrap, topics.scores, expected, timeout, daemon)
        assert daemon.stop() == 0, daemon.tail()

        records = read_records(kafka_bootstrap, topics.scores)
        counts = Counter(r["id"] for r in records)
        assert set(counts) == expected and max(counts.values()) == 1, "lost or repeated windows"
        for r in records:
            want = models["a"] if r["id"] in exp_head else models["b"]
            assert r["model"] == version_of(want), r
        print(f"\nreload took {reloaded['load_s'] * 1000:.0f} ms (load and validate)")

    def test_broken_or_incompatible_model_keeps_the_old_one(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """Tampered weights, then another window: both refused with the reason; A keeps scoring."""
        timeout = Timeout(90)
        topics = make_topics(new_topic, 1)
        link = model_link(tmp_path, models["a"])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            link,
            metrics={"enabled": True, "port": 0},
        )
        cfg = with_model_settings(cfg, watch_interval_s=0)
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        url = metrics_url(daemon, timeout)
        daemon.wait_event("daemon_ready", timeout)

        tampered = shutil.copytree(models["b"], tmp_path / "models" / "tampered")
        blob = bytearray((tampered / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (tampered / "model.safetensors").write_bytes(bytes(blob))
        swap_symlink(link, tampered)
        daemon.proc.send_signal(signal.SIGHUP)
        (first,) = wait_events(daemon, "model_reload_failed", 1, timeout)
        assert "SHA-256" in first["reason"] and first["model"] == version_of(models["a"])

        swap_symlink(link, models["w8"])
        daemon.proc.send_signal(signal.SIGHUP)
        second = wait_events(daemon, "model_reload_failed", 2, timeout)[1]
        assert "incompatible" in second["reason"] and "window 8" in second["reason"]

        samples = plant_samples(3, 80, seed=6)
        produce(kafka_bootstrap, topics.input, samples)
        expected = set(expected_windows(topics.input, samples, W, S))
        wait_for_ids(kafka_bootstrap, topics.scores, expected, timeout, daemon)
        values = scrape(url + "/metrics")
        assert daemon.stop() == 0, daemon.tail()
        assert {r["model"] for r in read_records(kafka_bootstrap, topics.scores)} == {
            version_of(models["a"])
        }
        assert values['streamer_model_reloads_total{result="failed"}'] == 2
        assert values['streamer_model_reloads_total{result="ok"}'] == 0
        assert values[f'streamer_model_info{{version="{version_of(models["a"])}"}}'] == 1
        assert not daemon.seen("model_reloaded")

    def test_file_change_reloads_without_a_signal(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """Swapping the model directory is noticed by the file watch and B scores from then on."""
        timeout = Timeout(60)
        topics = make_topics(new_topic, 1)
        link = model_link(tmp_path, models["a"])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            link,
        )
        cfg = with_model_settings(cfg, watch_interval_s=0.2)
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        daemon.wait_event("daemon_ready", timeout)
        swap_symlink(link, models["b"])
        reloaded = daemon.wait_event("model_reloaded", timeout)
        assert reloaded["trigger"] == "file_changed"
        samples = plant_samples(3, 60, seed=8)
        produce(kafka_bootstrap, topics.input, samples)
        expected = set(expected_windows(topics.input, samples, W, S))
        wait_for_ids(kafka_bootstrap, topics.scores, expected, timeout, daemon)
        assert daemon.stop() == 0, daemon.tail()
        models_seen = {r["model"] for r in read_records(kafka_bootstrap, topics.scores)}
        assert models_seen == {version_of(models["b"])}
        assert len(daemon.seen("model_reload_started")) == 1


class TestSecrets:
    """Configured secrets never reach the logs or check-config output."""

    def test_password_appears_nowhere(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        models: dict[str, Path],
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """An env and a file secret stay out of a daemon run's stdout/stderr and check-config."""
        timeout = Timeout(60)
        topics: Topics = make_topics(new_topic, 1)
        env_secret = f"env-secret-{os.getpid()}-{time.time_ns()}"
        file_secret = f"file-secret-{time.time_ns()}"
        secret_file = tmp_path / "kafka-password"
        secret_file.write_text(file_secret + "\n")
        # PLAINTEXT broker: librdkafka accepts these settings and does not use them.
        client = {
            "sasl.username": "streamer",
            "sasl.password": "${STREAMER_TEST_KAFKA_PASSWORD}",
            "ssl.key.password": f"file:{secret_file}",
        }
        cfg = write_config(
            tmp_path / "cfg.yaml",
            kafka_bootstrap,
            topics,
            group_id,
            models["a"],
            kafka={"client": client},
            metrics={"enabled": True, "port": 0, "stats_interval_s": 0.5},
        )
        env = {"STREAMER_TEST_KAFKA_PASSWORD": env_secret}
        daemon = DaemonProcess(cfg, env=env).start()
        daemons.append(daemon)
        url = metrics_url(daemon, timeout)
        samples = plant_samples(2, 40, seed=2) + bad_samples()
        produce(kafka_bootstrap, topics.input, samples)
        expected = set(expected_windows(topics.input, samples, W, S))
        wait_for_ids(kafka_bootstrap, topics.scores, expected, timeout, daemon)
        daemon.wait_event("stats", timeout)
        metrics_text = http_get(url + "/metrics")[1].decode()
        assert daemon.stop() == 0, daemon.tail()

        configured = daemon.seen("daemon_configured")[0]["kafka_client"]
        assert configured["sasl.password"] == configured["ssl.key.password"] == "**********"
        log = "\n".join(daemon.lines)
        for secret in (env_secret, file_secret):
            assert secret not in log
            assert secret not in metrics_text

        run_env = dict(os.environ, **env)
        ok = subprocess.run(
            [sys.executable, "-m", "streamer", "check-config", "--config", str(cfg)],
            cwd=REPO,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
        assert "**********" in ok.stdout
        # A config that fails validation next to the secrets: the error names no secret.
        text = cfg.read_text().replace("window: 16", "window: 1")
        broken = tmp_path / "broken.yaml"
        broken.write_text(text)
        bad = subprocess.run(
            [sys.executable, "-m", "streamer", "check-config", "--config", str(broken)],
            cwd=REPO,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "stream.window" in bad.stderr
        for out in (ok.stdout + ok.stderr, bad.stdout + bad.stderr):
            assert env_secret not in out and file_secret not in out
