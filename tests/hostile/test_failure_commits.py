"""A failure at any stage of a batch never commits what was not fully processed.

The daemon runs in this process against the real broker, with one stage made to fail
at its n-th call. After ``run`` raised, the group's committed offset and H must not
reach past the last batch the daemon fully processed; a clean daemon started
afterwards must then publish every window and dead-letter every bad message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from streamer.config import load_config
from streamer.daemon import Daemon
from streamer.errors import KafkaError
from streamer.kafka.sink import Sink
from streamer.kafka.source import Consumed
from streamer.runtime.checkpoint import Checkpointer
from streamer.runtime.ingest import Ingest
from streamer.runtime.publisher import Publisher
from tests.conftest import NewTopicFactory
from tests.helpers import Timeout
from tests.integration.helpers import (
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
from tests.integration.test_daemon import bad_messages

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4


class InjectedError(RuntimeError):
    """The failure a test injects."""


def failing(fn: Callable[..., Any], at_call: int, fired: list[int]) -> Callable[..., Any]:
    """``fn``, except that its ``at_call``-th call raises InjectedError."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at_call:
            fired.append(calls[0])
            raise InjectedError(f"injected failure at call {at_call}")
        return fn(*args, **kwargs)

    return wrapper


def interleaved(good: list[Sample], bad: list[Sample], every: int) -> list[Sample]:
    """The good samples with one bad message after every ``every`` of them."""
    out: list[Sample] = []
    bad_iter = iter(bad)
    for i, s in enumerate(good, 1):
        out.append(s)
        if i % every == 0:
            nxt = next(bad_iter, None)
            if nxt is not None:
                out.append(nxt)
    return out


def committed(
    bootstrap: str, group: str, topic: str, partitions: int
) -> dict[int, tuple[int, int]]:
    """Partition -> (committed offset, H from the metadata); absent when nothing committed."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        probe.close()
    out = {}
    for tp in tps:
        if tp.offset >= 0:
            meta = orjson.loads(tp.metadata) if tp.metadata else {}
            out[tp.partition] = (tp.offset, int(meta.get("h", tp.offset - 1)))
    return out


# (stage, call that fails): each is a point inside one batch's processing or a round.
STAGES = [
    ("decode", 3),
    ("dead_letter", 2),
    ("submit", 3),
    ("publish", 4),
    ("produce", 40),
    ("state", 2),
]


@pytest.mark.parametrize(("stage", "at_call"), STAGES, ids=[s for s, _ in STAGES])
def test_failure_at_any_stage_commits_nothing_unprocessed(
    stage: str,
    at_call: int,
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics: Topics = make_topics(new_topic, 1)
    good = plant_samples(3, 100, seed=3)
    # Dead letters that need no ring: out_of_order depends on arrival, keep it out.
    bad = [b for b in bad_messages() if b.kind != "out_of_order"]
    samples = interleaved(good, bad, every=20)
    produce(kafka_bootstrap, topics.input, samples)
    cfg_path = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        topics,
        group_id,
        model_dir,
        kafka={"consume_batch": 40, "commit_interval_s": 0.5},
    )
    daemon = Daemon(load_config(cfg_path))
    daemon.build()  # the engine, to patch before run()
    fired: list[int] = []
    done: dict[int, int] = {}  # partition -> last offset of a fully processed batch
    process = Ingest.process

    def tracked(self: Ingest, batch: Consumed) -> None:
        process(self, batch)
        for p, off in zip(batch.partitions.tolist(), batch.offsets.tolist(), strict=True):
            done[p] = max(done.get(p, -1), off)

    monkeypatch.setattr(Ingest, "process", tracked)
    if stage == "decode":
        daemon.decoder.decode = failing(daemon.decoder.decode, at_call, fired)  # type: ignore[method-assign]
    elif stage == "dead_letter":
        monkeypatch.setattr(
            Publisher, "dead_letter", failing(Publisher.dead_letter, at_call, fired)
        )
    elif stage == "submit":
        daemon.engine.submit_pieces = failing(daemon.engine.submit_pieces, at_call, fired)  # type: ignore[method-assign]
    elif stage == "publish":
        monkeypatch.setattr(Publisher, "publish", failing(Publisher.publish, at_call, fired))
    elif stage == "state":
        monkeypatch.setattr(Checkpointer, "write", failing(Checkpointer.write, at_call, fired))
    else:
        # The producer refusing a record, as it does one larger than message.max.bytes.
        original = Sink.produce

        def refusing(self: Sink, *args: Any, **kwargs: Any) -> None:
            if len(fired) == 0 and self.produced + 1 == at_call:
                fired.append(at_call)
                raise KafkaError("cannot produce: Broker: Message size too large (injected)")
            original(self, *args, **kwargs)

        monkeypatch.setattr(Sink, "produce", refusing)
        original_many = Sink.produce_many

        def refusing_many(
            self: Sink, topic: str, values: Any, keys: Any, on_last_delivered: Any = None
        ) -> None:
            # A batch of score records: those before the refused one are produced.
            k = at_call - self.produced - 1
            if len(fired) == 0 and 0 <= k < len(values):
                original_many(self, topic, values[:k], keys[:k])
                fired.append(at_call)
                raise KafkaError("cannot produce: Broker: Message size too large (injected)")
            original_many(self, topic, values, keys, on_last_delivered)

        monkeypatch.setattr(Sink, "produce_many", refusing_many)
    # Should the stage never be reached, stop instead of hanging (the assertion names it).
    stopper = threading.Timer(60.0, daemon.request_stop)
    stopper.start()
    try:
        with pytest.raises((InjectedError, KafkaError)):
            daemon.run()
    finally:
        stopper.cancel()
    assert fired, f"stage {stage} was never reached"
    monkeypatch.undo()

    got = committed(kafka_bootstrap, group_id, topics.input, 1)
    for p, (offset, h) in got.items():
        last = done.get(p, -1)
        assert h <= last, f"{stage}: committed H {h} past the last processed offset {last}"
        assert offset <= last + 1, f"{stage}: committed offset {offset} past {last} + 1"

    # A clean daemon takes over: every window is published, every bad message dead-lettered.
    timeout = Timeout(120)
    wanted = set(expected_windows(topics.input, samples, W, S))
    again = DaemonProcess(cfg_path).start()
    daemons.append(again)
    again.wait_event("daemon_ready", timeout)  # signals are handled from then on
    seen = wait_for_ids(kafka_bootstrap, topics.scores, wanted, timeout, again)
    missing = wanted - seen
    assert not missing, f"{stage}: {len(missing)} windows never published\n{again.tail()}"
    dlq_kinds = set()
    reader = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{group_id}-dlq",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        reader.subscribe([topics.dlq])
        deadline = Timeout(30)
        while not deadline.expired and len(dlq_kinds) < len(bad):
            for m in reader.consume(100, 0.5):
                if m.error() is None:
                    dlq_kinds.add(dict(m.headers() or [])["error.kind"].decode())
    finally:
        reader.close()
    assert dlq_kinds == {b.kind for b in bad}, f"{stage}: dead letters missing"
    assert again.stop() == 0, again.tail()
