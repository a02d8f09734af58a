"""The benchmark's broker, topics, model and stream: what a suite sets up before the daemon runs."""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.config import TrainConfig
from streamer.dev.broker import LocalBroker
from streamer.model.checkpoint import save_checkpoint
from streamer.model.train import train_model

T0 = 1_764_201_600.0

# The security settings (SASL_SSL, SCRAM) of each secured broker this run started, by
# bootstrap address: every client of this script, and the daemon's kafka.client, use them.
SECURED: dict[str, dict[str, str]] = {}


def client(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a client of the broker at ``bootstrap`` (secured or not)."""
    return {"bootstrap.servers": bootstrap, **SECURED.get(bootstrap, {}), **extra}


def stream_rows(
    rows: range, sensors: int, channels: int, rng: np.random.Generator, phase: float = 0.1
) -> Any:
    """The benchmark's normal signal, one ``(sensors, channels)`` array per row.

    Each sensor is a phase-shifted sine per channel plus Gaussian noise; the model is
    trained on the same kind of data, so the stream is normal to it (as a plant's is).
    """
    sensor_phase = np.arange(sensors)[:, None] * phase + np.arange(channels)[None, :]
    for r in rows:
        yield np.sin(r / 20 + sensor_phase) + rng.normal(0, 0.05, (sensors, channels))


def train(out: Path, window: int, stride: int, channels: int) -> Path:
    """A small conv1d model on the benchmark's normal signal (16 sensors, phases 0..2 pi)."""
    rows = max(600, 4 * window)
    data = np.stack(list(stream_rows(range(rows), 16, channels, np.random.default_rng(1), 0.4)))
    names = [f"c{i}" for i in range(channels)]
    cfg = TrainConfig(preset="conv1d", epochs=5, hidden=32, latent=16, train_stride=4)
    res = train_model(list(data.transpose(1, 0, 2)), names, window, cfg, progress=False)
    save_checkpoint(out, res.module, res.scaler, names, stride, {"bench": True}, res.calibration)
    return out


def make_topics(bootstrap: str, partitions: int) -> dict[str, str]:
    """Fresh topics for one run."""
    stamp = time.time_ns()
    names = {k: f"bench-{k}-{stamp}" for k in ("input", "scores", "alerts", "dlq", "state")}
    admin = AdminClient(client(bootstrap))
    specs = []
    for k, name in names.items():
        n = partitions if k in ("input", "state", "scores") else 1
        conf = {"cleanup.policy": "compact"} if k == "state" else {}
        specs.append(NewTopic(name, num_partitions=n, replication_factor=1, config=conf))
    for fut in admin.create_topics(specs).values():
        fut.result(60)
    return names


def produce_stream(
    bootstrap: str,
    topic: str,
    sensors: int,
    rows: int,
    channels: int,
    *,
    rate_hz: float | None = None,
    wall_clock: bool = False,
    first_row: list[int] | None = None,
) -> int:
    """Produce rows x sensors samples (sensor-interleaved); returns the count.

    ``first_row[s]``: sensor s comes online at that row (default: every sensor at row 0).
    """
    producer = Producer(
        client(
            bootstrap,
            # Idempotence keeps each partition in order across retries (a fresh topic's
            # first requests are often retried); reordered samples would be dead-lettered.
            **{
                "enable.idempotence": True,
                # Paced runs (latency) send each row at once: the producer's own batching
                # delay would otherwise count as the daemon's latency.
                "linger.ms": 20 if rate_hz is None else 1,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 2_000_000,
                "compression.type": "lz4",
            },
        )
    )
    # This process imported torch to train the model: without freezing, a full garbage
    # collection (~100 ms) now and then would hold samples stamped before it.
    gc.collect()
    gc.freeze()
    try:
        n = _send_rows(producer, topic, sensors, rows, channels, rate_hz, wall_clock, first_row)
    finally:
        gc.unfreeze()  # frozen objects are not freed at exit, and extensions report leaks
    producer.flush(120)
    return n


def _send_rows(
    producer: Producer,
    topic: str,
    sensors: int,
    rows: int,
    channels: int,
    rate_hz: float | None,
    wall_clock: bool,
    first_row: list[int] | None,
) -> int:
    keys = [f"s{i:06d}".encode() for i in range(sensors)]
    started = time.monotonic()
    n = 0
    rng = np.random.default_rng(0)
    for r, vals in enumerate(stream_rows(range(rows), sensors, channels, rng)):
        row_ts = T0 + r
        for s in range(sensors):
            if first_row is not None and r < first_row[s]:
                continue
            # Wall-clock samples are stamped as they are sent, as a sensor gateway would:
            # a row of 1,000 messages takes ~10 ms to encode, which is not the daemon's.
            ts = time.time() if wall_clock else row_ts
            doc = orjson.dumps(
                {"sensor": keys[s].decode(), "ts": ts, "values": vals[s].tolist()},
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            while True:
                try:
                    producer.produce(topic, doc, key=keys[s])
                    break
                except BufferError:
                    producer.poll(0.01)
            n += 1
        producer.poll(0)
        if rate_hz is not None:
            ahead = (r + 1) / rate_hz - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return n


def consumer_from_start(bootstrap: str, topic: str, purpose: str) -> Consumer:
    """A consumer (own throwaway group) assigned to every partition of ``topic`` from offset 0."""
    consumer = Consumer(
        client(
            bootstrap,
            **{
                "group.id": f"{purpose}-{time.time_ns()}",
                "enable.auto.commit": False,
                "fetch.max.bytes": 52_428_800,
            },
        )
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


def read_all(bootstrap: str, topic: str, purpose: str) -> Iterator[Message]:
    """Every record of ``topic`` from the start, until three one-second polls bring nothing."""
    consumer = consumer_from_start(bootstrap, topic, purpose)
    try:
        idle = 0
        while idle < 3:
            batch = consumer.consume(10_000, 1.0)
            idle = 0 if batch else idle + 1
            yield from (m for m in batch if m.error() is None)
    finally:
        consumer.close()


def topic_records(bootstrap: str, topic: str) -> int:
    """Records in a topic: the sum of its partitions' high watermarks."""
    consumer = consumer_from_start(bootstrap, topic, "count")
    try:
        return sum(
            consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()
        )
    finally:
        consumer.close()


def steady_samples(sensors: int, rows: int, window: int) -> int:
    """Samples consumed between the first and the last score: from each sensor's first window on."""
    return sensors * max(rows - window + 1, 0)


def expected_windows(sensors: int, rows: int, window: int, stride: int) -> int:
    return sensors * ((rows - window) // stride + 1) if rows >= window else 0


@contextlib.contextmanager
def broker_and_tmp(bootstrap: str | None, prefix: str) -> Iterator[tuple[str, Path]]:
    """A temporary folder, and the broker at ``bootstrap`` or a local one started for the run."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmpdir:
        if bootstrap is not None:
            yield bootstrap, Path(tmpdir)
            return
        broker = LocalBroker()
        try:
            yield broker.start(), Path(tmpdir)
        finally:
            broker.stop()
