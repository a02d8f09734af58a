"""`streamer produce`: a CSV file into the input topic, against the session's real broker."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka.admin import AdminClient

from streamer.codec import Decoder
from streamer.config import StreamConfig, load_config
from streamer.produce import produce_csv
from tests.conftest import NewTopicFactory
from tests.helpers import consume_all

T0 = 1_764_201_600


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def produce(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``streamer produce`` in ``cwd`` (no config.yaml there: the built-in defaults)."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", "produce", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def five_channels(n: int) -> np.ndarray:
    """Values that read back from CSV bit for bit."""
    return np.round(np.random.default_rng(7).normal(size=(n, 5)) * 100, 3)


@pytest.mark.kafka
class TestProduce:
    def test_every_row_is_one_sample_the_daemon_decodes(
        self, tmp_path: Path, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic()
        values = five_channels(25)
        data = write_csv(
            tmp_path / "pump-3.csv",
            ["timestamp", "temp", "pressure", "vibration", "flow", "current"],
            [[T0 + i / 4, *row] for i, row in enumerate(values.tolist())],
        )
        run = produce(
            tmp_path, "--data", str(data),
            "--set", f"kafka.bootstrap_servers={kafka_bootstrap}", "--set", f"topics.input={topic}",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"produced 25 samples of pump-3 to {topic}\n"
        # Nothing else: not even librdkafka's transient warnings on a fresh broker.
        assert run.stderr == "", run.stderr

        messages = consume_all(kafka_bootstrap, topic, expected=None)
        assert [m.offset() for m in messages] == list(range(25))
        assert {m.key() for m in messages} == {b"pump-3"}
        values_read = [m.value() for m in messages]
        samples, dead = Decoder(StreamConfig()).decode(values_read, [m.key() for m in messages])
        assert dead == []
        assert samples.ts.tolist() == [T0 + i / 4 for i in range(25)]
        assert np.array_equal(samples.values, values.astype(np.float32))
        assert orjson.loads(messages[0].value() or b"") == {
            "sensor": "pump-3",
            "ts": T0,
            "values": values[0].tolist(),
        }

    def test_field_names_sensor_and_gaps_follow_the_config(
        self, tmp_path: Path, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"kafka: {{bootstrap_servers: '{kafka_bootstrap}'}}\n"
            f"topics: {{input: {topic}}}\n"
            "stream: {channels: [a, b], sensor_field: id, timestamp_field: t, "
            "values_field: v}\n"
            "csv: {separator: ';', timestamp_column: time, missing: skip}\n"
        )
        data = tmp_path / "d.csv"
        data.write_text(
            "time;a;b;note\n"
            "2025-11-27T00:00:00;1.5;2;x\n"
            "2025-11-27T00:00:01;;3;x\n"
            "2025-11-27T00:00:02;2.5;4;x\n"
        )
        run = produce(tmp_path, "--config", str(cfg), "--data", str(data), "--sensor", "k-1")
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"produced 2 samples of k-1 to {topic}\n"
        assert run.stderr == f"streamer: {data}: skipped 1 rows with gaps\n"
        messages = consume_all(kafka_bootstrap, topic, expected=None)
        assert [(m.key(), orjson.loads(m.value() or b"")) for m in messages] == [
            (b"k-1", {"id": "k-1", "t": T0, "v": [1.5, 2.0]}),
            (b"k-1", {"id": "k-1", "t": T0 + 2, "v": [2.5, 4.0]}),
        ]

    @pytest.mark.parametrize(
        ("body", "said"),
        [
            ("1,1,2,3,4,5\n2,1,2,,4,5\n", "line 3, column 'vibration': missing value ''"),
            ("1,1,2,3,4,5\n2,1,2,3,4\n", "line 3: 5 fields, the header has 6"),
            ("2,1,2,3,4,5\n1,1,2,3,4,5\n", "line 3: timestamp '1' is not after"),
            ("", "no rows to produce"),
        ],
    )
    def test_a_bad_file_sends_nothing_and_exits_2(
        self,
        tmp_path: Path,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        body: str,
        said: str,
    ) -> None:
        topic = new_topic()
        data = tmp_path / "d.csv"
        data.write_text("timestamp,temp,pressure,vibration,flow,current\n" + body)
        run = produce(
            tmp_path, "--data", str(data),
            "--set", f"kafka.bootstrap_servers={kafka_bootstrap}", "--set", f"topics.input={topic}",
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith(f"streamer: {data}: ") and said in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and run.stdout == ""
        assert consume_all(kafka_bootstrap, topic, expected=None) == []

    def test_a_missing_topic_is_created_only_when_configured(
        self, tmp_path: Path, kafka_bootstrap: str, kafka_admin: AdminClient
    ) -> None:
        topic = f"test-{uuid.uuid4().hex}"
        data = write_csv(tmp_path / "s.csv", ["timestamp", "a"], [[1, 0.5], [2, 0.25]])
        args = [
            "--data", str(data), "--set", f"kafka.bootstrap_servers={kafka_bootstrap}",
            "--set", f"topics.input={topic}", "--set", "stream.channels=[a]",
        ]  # fmt: skip
        try:
            refused = produce(tmp_path, *args)
            assert refused.returncode == 1, refused.stderr
            assert f"topic {topic} does not exist on {kafka_bootstrap}" in refused.stderr
            assert "kafka.create_topics: true" in refused.stderr

            created = produce(tmp_path, *args, "--set", "kafka.create_topics=true")
            assert created.returncode == 0, created.stderr
            assert len(consume_all(kafka_bootstrap, topic, expected=None)) == 2
        finally:
            kafka_admin.delete_topics([topic], operation_timeout=0)

    def test_a_failed_delivery_exits_1_saying_how_many_arrived(
        self, tmp_path: Path, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        # The broker refuses every batch: larger than the topic's max.message.bytes.
        topic = new_topic(config={"max.message.bytes": "80"})
        data = write_csv(tmp_path / "s.csv", ["timestamp", "a"], [[i, 0.5] for i in range(5)])
        run = produce(
            tmp_path, "--data", str(data), "--set", f"kafka.bootstrap_servers={kafka_bootstrap}",
            "--set", f"topics.input={topic}", "--set", "stream.channels=[a]",
        )  # fmt: skip
        assert run.returncode == 1, run.stderr
        last = run.stderr.splitlines()[-1]
        assert last.startswith(f"streamer: cannot produce {data} to {topic} on {kafka_bootstrap}:")
        assert last.endswith("(0 of 5 samples acknowledged)"), last

    def test_rate_paces_the_rows(
        self, tmp_path: Path, kafka_bootstrap: str, new_topic: NewTopicFactory
    ) -> None:
        topic = new_topic()
        data = write_csv(tmp_path / "s.csv", ["timestamp", "a"], [[i, 0.5] for i in range(21)])
        cfg = load_config(
            None,
            sets=[
                f"kafka.bootstrap_servers={kafka_bootstrap}",
                f"topics.input={topic}",
                "stream.channels=[a]",
            ],
            env={},
        )
        started = time.monotonic()
        done = produce_csv(cfg, data, rate=40.0)
        took = time.monotonic() - started
        assert (done.samples, done.sensor, done.topic) == (21, "s", topic)
        # 21 rows at 40 a second: the last one goes out half a second after the first.
        assert took >= 0.5, took
        assert len(consume_all(kafka_bootstrap, topic, expected=None)) == 21


class TestWithoutABroker:
    def test_an_unreachable_broker_is_one_line_after_the_connect_timeout(
        self, tmp_path: Path
    ) -> None:
        data = write_csv(tmp_path / "s.csv", ["timestamp", "a"], [[1, 0.5]])
        started = time.monotonic()
        run = produce(
            tmp_path, "--data", str(data), "--set", "kafka.bootstrap_servers=127.0.0.1:9",
            "--set", "kafka.connect_timeout_s=2", "--set", "stream.channels=[a]",
        )  # fmt: skip
        took = time.monotonic() - started
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith("streamer: cannot reach Kafka at 127.0.0.1:9"), run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
        assert run.stdout == ""
        assert took < 20, took  # the 30 s default would show

    @pytest.mark.parametrize(
        ("args", "said"),
        [
            (["--rate", "0"], "argument --rate: 0 is not above 0"),
            (["--sensor", ""], "sensor id '' must be 1 to 256 characters"),
            (["--set", "csv.columns=[a, b]"], "csv.columns names 2 columns but stream.channels 1"),
            (
                ["--set", "stream.max_message_bytes=80", "--sensor", "s" * 60],
                "line 2: the sample is 97 bytes, over stream.max_message_bytes (80)",
            ),
        ],
    )
    def test_bad_arguments_exit_2_before_any_connection(
        self, tmp_path: Path, args: list[str], said: str
    ) -> None:
        data = write_csv(tmp_path / "s.csv", ["timestamp", "a", "b"], [[1, 0.5, 0.5]])
        run = produce(
            tmp_path, "--data", str(data), "--set", "kafka.bootstrap_servers=127.0.0.1:9",
            "--set", "stream.channels=[a]", *args,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert said in run.stderr
