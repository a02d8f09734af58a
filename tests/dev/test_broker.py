"""The local Kafka broker used by development, the tests, CI and the demo."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

# NewTopic's documented home; the package's stubs do not re-export it explicitly.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.config import load_config
from streamer.dev import broker as localbroker
from streamer.dev.broker import LocalBroker, ensure_jars
from streamer.dev.broker import cli as broker_cli
from streamer.errors import KafkaError
from tests.conftest import NewTopicFactory
from tests.helpers import consume_all, produce_json

_BOOTSTRAP_RE = re.compile(r"127\.0\.0\.1:\d+")
REPO = Path(__file__).resolve().parents[2]


def _records(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensor-{i % 3}", json.dumps({"sensor": f"sensor-{i % 3}", "seq": i}).encode())
        for i in range(start, start + n)
    ]


def _values(messages: list[Message]) -> list[bytes]:
    return [m.value() or b"" for m in messages]


@pytest.mark.kafka
class TestSessionBroker:
    def test_round_trip_on_fresh_topic(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        """Records produced to a new topic are consumed back, with keys, in order."""
        topic = new_topic()
        records = _records(20)
        produce_json(kafka_bootstrap, topic, records)

        messages = consume_all(kafka_bootstrap, topic, expected=len(records), timeout_s=30)

        assert [(m.key(), m.value()) for m in messages] == [(k.encode(), v) for k, v in records]

    def test_consume_all_without_expected_reads_to_the_end(
        self, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        """consume_all(expected=None) returns everything already written to every partition."""
        topic = new_topic(partitions=3)
        records = _records(30)
        produce_json(kafka_bootstrap, topic, records)

        messages = consume_all(kafka_bootstrap, topic, expected=None, timeout_s=30)

        assert sorted(_values(messages)) == sorted(v for _, v in records)

    def test_auto_create_is_off(self, kafka_bootstrap: str, kafka_admin: AdminClient) -> None:
        """Producing to a topic nobody created does not create it: a typo must not pass."""
        missing = f"missing-{uuid.uuid4().hex}"
        # A producer's metadata requests ask the broker to auto-create the topic.
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(missing, value=b"{}")
        producer.flush(1)
        producer.purge()

        topic = kafka_admin.list_topics(missing, timeout=10).topics[missing]
        assert topic.error is not None
        assert not topic.partitions


@pytest.mark.kafka
class TestRestart:
    def test_restart_and_crash_keep_topics_data_and_offsets(
        self, tmp_path: Path, group_id: str
    ) -> None:
        """A clean restart and a SIGKILL + start on the same data dir keep topics, records,
        committed offsets and the address."""
        with LocalBroker(tmp_path / "broker") as broker:
            bootstrap = broker.start()
            admin = AdminClient({"bootstrap.servers": bootstrap})
            admin.create_topics([NewTopic("durable", num_partitions=2, replication_factor=1)])[
                "durable"
            ].result(timeout=30)
            produce_json(bootstrap, "durable", _records(10))
            _commit(bootstrap, group_id, "durable", {0: 3})

            assert broker.restart() == bootstrap
            produce_json(bootstrap, "durable", _records(10, start=10))

            broker.kill()
            assert broker.pid is None
            assert broker.start() == bootstrap

            messages = consume_all(bootstrap, "durable", expected=20, timeout_s=60)
            assert sorted(_values(messages)) == sorted(v for _, v in _records(20))
            assert _committed(bootstrap, group_id, "durable", 0) == 3
        assert (tmp_path / "broker" / "data" / "meta.properties").is_file()

    def test_port_in_use_fails_with_log_tail_and_cleans_up(self) -> None:
        """A broker that cannot bind its port raises KafkaError quoting its log, and its
        temporary run dir is removed by stop()."""
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            port = blocker.getsockname()[1]
            with LocalBroker(port=port) as broker:
                with pytest.raises(KafkaError, match="Address already in use"):
                    broker.start(timeout_s=60)
                run_dir = broker.run_dir
                assert broker.pid is None
            assert not run_dir.exists()


def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str, partition: int) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=30)
        return int(tp.offset)
    finally:
        consumer.close()


def _cli(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer.dev.broker", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.kafka
class TestCommandLine:
    def test_start_status_stop(self, broker_cli_env: dict[str, str], tmp_path: Path) -> None:
        """start prints only the address and leaves a detached broker that status finds and
        stop ends; a second start reuses the running broker."""
        started = _cli(broker_cli_env, "start")
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        assert _BOOTSTRAP_RE.fullmatch(bootstrap), started.stdout
        assert started.stdout == bootstrap + "\n"
        # Without --write-config: how to point the commands at it, on stderr.
        assert f"--set kafka.bootstrap_servers={bootstrap}" in started.stderr
        assert f"STREAMER__KAFKA__BOOTSTRAP_SERVERS={bootstrap}" in started.stderr

        # The broker outlived the command that started it and serves clients.
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
        assert metadata.brokers

        status = _cli(broker_cli_env, "status")
        assert (status.returncode, status.stdout) == (0, bootstrap + "\n")
        # A second start reuses the running broker, and writes a config for it when asked.
        written = tmp_path / "dev.yaml"
        again = _cli(broker_cli_env, "start", "--write-config", str(written), cwd=REPO)
        assert (again.returncode, again.stdout) == (0, bootstrap + "\n"), again.stderr
        assert f"wrote {written}" in again.stderr
        assert load_config(written, env={}).kafka.bootstrap_servers == bootstrap

        state_path = Path(broker_cli_env["STREAMER_CACHE"]) / "broker" / "state.json"
        pid = json.loads(state_path.read_text())["pid"]
        stopped = _cli(broker_cli_env, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout == ""
        assert not state_path.exists()
        assert broker_cli.process_gone(pid)

        after = _cli(broker_cli_env, "status")
        assert (after.returncode, after.stdout) == (1, "")
        assert "no broker running" in after.stderr


class TestEnsureJars:
    def test_cached_libs_are_returned_without_maven(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A complete libs dir in the cache is used as is, even with no mvn on PATH."""
        libs = tmp_path / "kafka" / "9.9.9" / "libs"
        libs.mkdir(parents=True)
        (libs / "kafka_2.13-9.9.9.jar").touch()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))

        assert ensure_jars("9.9.9", cache_dir=tmp_path) == libs

    def test_libs_env_must_hold_the_kafka_jar(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """STREAMER_KAFKA_LIBS pointing at a directory without Kafka's jar is an error."""
        monkeypatch.setenv(localbroker.LIBS_ENV, str(tmp_path))
        with pytest.raises(KafkaError, match=re.escape("holds no kafka_2.13-9.9.9.jar")):
            ensure_jars("9.9.9")

    def test_missing_java_is_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without java on PATH or JAVA_HOME the error says what to install."""
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        monkeypatch.delenv("JAVA_HOME", raising=False)
        with pytest.raises(KafkaError, match="java not found"):
            ensure_jars("9.9.9", cache_dir=tmp_path)

    def test_missing_maven_is_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With java but no mvn the error names Maven."""
        bin_dir = _bin_dir(tmp_path, mvn_script=None)
        monkeypatch.setenv("PATH", str(bin_dir))
        monkeypatch.delenv("JAVA_HOME", raising=False)
        with pytest.raises(KafkaError, match="mvn not found"):
            ensure_jars("9.9.9", cache_dir=tmp_path)

    def test_failed_fetch_reports_maven_output_and_leaves_no_libs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failing mvn raises KafkaError with its output tail and leaves no libs dir behind."""
        bin_dir = _bin_dir(
            tmp_path, mvn_script="echo 'Could not resolve org.apache.kafka'\nexit 1\n"
        )
        monkeypatch.setenv("PATH", str(bin_dir))
        monkeypatch.delenv("JAVA_HOME", raising=False)
        with pytest.raises(KafkaError, match=re.escape("Could not resolve org.apache.kafka")):
            ensure_jars("9.9.9", cache_dir=tmp_path / "cache")
        version_dir = tmp_path / "cache" / "kafka" / "9.9.9"
        assert sorted(p.name for p in version_dir.iterdir()) == [".lock", "pom.xml"]


def _bin_dir(tmp_path: Path, mvn_script: str | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\nexit 0\n")
    java.chmod(0o755)
    if mvn_script is not None:
        mvn = bin_dir / "mvn"
        mvn.write_text("#!/bin/sh\n" + mvn_script)
        mvn.chmod(0o755)
    return bin_dir


class TestStatusWithoutBroker:
    def test_status_exits_1_when_none_runs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """status with no state file exits 1 and prints nothing on stdout."""
        monkeypatch.setenv("STREAMER_CACHE", str(tmp_path))
        assert localbroker.main(["status"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "no broker running" in captured.err

    def test_stop_without_broker_is_a_no_op(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """stop with nothing running succeeds, so scripts can call it unconditionally."""
        monkeypatch.setenv("STREAMER_CACHE", str(tmp_path))
        assert localbroker.main(["stop"]) == 0
