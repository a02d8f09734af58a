"""Helpers for the daemon integration tests: models, configs, input streams, a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

import streamer
from streamer.config import TrainConfig
from streamer.dev.simulate import CHANNELS, simulate
from streamer.encoders import window_id
from streamer.model.checkpoint import save_checkpoint
from streamer.model.train import train_model
from tests.helpers import Timeout

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(streamer.__file__).resolve().parent / "schemas"
T0 = 1_764_201_600.0


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for one of the published schemas (score, alert, dlq)."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def train_tiny(
    out: Path,
    *,
    preset: str = "conv1d",
    window: int = 16,
    hidden: int = 8,
    latent: int = 4,
    epochs: int = 3,
    stride: int = 4,
    rows: int = 600,
) -> Path:
    """Train a small model on simulated normal data and save its checkpoint in ``out``."""
    plant = simulate(4, rows, seed=11)
    cfg = TrainConfig(
        preset=preset,
        hidden=hidden,
        latent=latent,
        epochs=epochs,
        seed=0,
        train_stride=2,  # type: ignore[arg-type]
        calibration_samples=1000,
    )
    result = train_model(list(plant.values), list(CHANNELS), window, cfg, progress=False)
    save_checkpoint(
        out, result.module, result.scaler, list(CHANNELS), stride, result.info, result.calibration
    )
    return out


@dataclass
class Topics:
    """One test's topics."""

    input: str
    scores: str
    alerts: str
    dlq: str
    state: str
    partitions: int


def make_topics(new_topic: Any, partitions: int) -> Topics:
    """Create the five topics of one daemon (state compacted, as many partitions as input)."""
    return Topics(
        input=new_topic(partitions),
        scores=new_topic(1),
        alerts=new_topic(1),
        dlq=new_topic(1),
        state=new_topic(partitions, config={"cleanup.policy": "compact"}),
        partitions=partitions,
    )


def write_config(
    path: Path, bootstrap: str, topics: Topics, group: str, model: Path, **sections: dict[str, Any]
) -> Path:
    """A config file for the daemon under test; ``sections`` override the defaults."""
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "commit_interval_s": 1.0},
        "topics": {
            "input": topics.input,
            "scores": topics.scores,
            "alerts": topics.alerts,
            "dlq": topics.dlq,
            "state": topics.state,
        },
        "stream": {"channels": list(CHANNELS), "window": 16, "stride": 4},
        "model": {"path": str(model), "device": "cpu"},
        "threshold": {"method": "spot", "risk": 1e-3, "level": 0.95},
        "inference": {"threads": 1},
        "metrics": {"enabled": False, "stats_interval_s": 2.0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Sample:
    """One input message as produced."""

    sensor: str
    key: bytes | None
    value: bytes | None
    valid: bool  # expected to become a sample (and so count towards windows)
    kind: str = ""  # expected dead-letter kind when not valid
    partition: int = -1
    offset: int = -1
    row: int = -1


def plant_samples(
    sensors: int,
    rows: int,
    *,
    seed: int = 0,
    anomalies: Sequence[tuple[int, int, int]] = (),
    t0: float = T0,
) -> list[Sample]:
    """Simulated samples, sensor-interleaved in time order; ``anomalies``: (sensor, row, len).

    Row r of every sensor has timestamp ``t0 + r`` seconds.

    Each anomaly adds 40 standard deviations to the temperature channel: far outside
    anything a tiny model reconstructs, so its windows must be flagged.
    """
    plant = simulate(sensors, rows, seed=seed)
    values = plant.values.copy()
    std = values.std(axis=1)
    for s, row, length in anomalies:
        values[s, row : row + length, 0] += 40 * std[s, 0]
    out = []
    for r in range(rows):
        for s in range(sensors):
            name = f"sensor-{s}"
            doc = {
                "sensor": name,
                "ts": t0 + r,
                "values": [round(v, 6) for v in values[s, r].tolist()],
            }
            out.append(Sample(name, name.encode(), orjson.dumps(doc), True, row=r))
    return out


def produce(
    bootstrap: str,
    topic: str,
    samples: Iterable[Sample],
    timeout_s: float = 60.0,
    rate_per_s: float | None = None,
) -> None:
    """Produce samples in order (key decides the partition); fills in partition and offset."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    errors: list[str] = []
    started = time.monotonic()

    def report(sample: Sample) -> Any:
        def cb(err: Any, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                sample.partition, sample.offset = msg.partition(), msg.offset()

        return cb

    for i, s in enumerate(samples):
        while True:
            try:
                producer.produce(topic, key=s.key, value=s.value, on_delivery=report(s))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if rate_per_s is not None:
            ahead = (i + 1) / rate_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    assert producer.flush(timeout_s) == 0, "input not acknowledged"
    assert not errors, errors[:3]


def expected_windows(
    topic: str, samples: Sequence[Sample], window: int, stride: int
) -> dict[str, tuple[str, int, int]]:
    """Window id -> (sensor, partition, offset of last sample) for every window due."""
    by_sensor: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.valid:
            by_sensor[s.sensor].append(s)
    out = {}
    for sensor, rows in by_sensor.items():
        for k in range(window - 1, len(rows), stride):
            last = rows[k]
            assert last.offset >= 0, "produce() fills in offsets"
            out[window_id(topic, last.partition, last.offset)] = (
                sensor,
                last.partition,
                last.offset,
            )
    return out


def wait_for_ids(
    bootstrap: str,
    topic: str,
    wanted: set[str],
    timeout: Timeout,
    daemon: DaemonProcess | None = None,
) -> set[str]:
    """Read ``topic`` from the start with one consumer until every id in ``wanted`` was seen.

    Gives up early if ``daemon`` exits (the caller's assertion then shows its log).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"watch-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    seen: set[str] = set()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        while not timeout.expired and not wanted <= seen:
            if daemon is not None and daemon.proc.poll() is not None:
                break
            for m in consumer.consume(1000, min(0.5, timeout.remaining)):
                if m.error() is not None:
                    raise KafkaException(m.error())
                seen.add(orjson.loads(m.value() or b"")["id"])
    finally:
        consumer.close()
    return seen


@dataclass
class DaemonProcess:
    """``python -m streamer run`` as a real subprocess, its JSON log lines collected."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the test's environment
    proc: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_kb: int = 0
    _reader: threading.Thread | None = None

    def start(self) -> DaemonProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(self.config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.events.append(ev)

    def sample_rss(self) -> int:
        """Peak resident set (VmHWM, kB) of the daemon so far."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        return self.peak_rss_kb

    def seen(self, event: str) -> list[dict[str, Any]]:
        """Logged events of one name."""
        return [e for e in list(self.events) if e.get("event") == event]

    def wait_event(self, event: str, timeout: Timeout) -> dict[str, Any]:
        """Wait for a log event (fails with the log tail if the daemon exits first)."""
        while not timeout.expired:
            found = self.seen(event)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event; daemon log tail:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.sample_rss()
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"daemon did not exit within {timeout_s}s:\n{self.tail()}"
            ) from None
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
