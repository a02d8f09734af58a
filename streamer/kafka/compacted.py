"""The latest record of each key of a compacted topic, read once by an assigned consumer.

The daemon reads its state topic this way when a partition is assigned: every sensor's
newest state record, without joining a group or committing anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError

from streamer.config import KafkaConfig
from streamer.errors import KafkaError
from streamer.kafka.source import consumer_conf

__all__ = ["LatestRecords", "read_latest"]


@dataclass
class LatestRecords:
    """The latest value of each key in one partition (None: a tombstone), and the count read.

    ``known``: how many of them were given (``read_latest``'s ``known``) instead of read.
    """

    values: dict[bytes, bytes | None] = field(default_factory=dict)
    records: int = 0
    known: int = 0


def _ends_to_read(
    consumer: Consumer,
    topic: str,
    partitions: Sequence[int],
    timeout_s: float,
    known: Mapping[int, tuple[int, dict[bytes, bytes]]],
    out: dict[int, LatestRecords],
) -> dict[int, int]:
    """The high watermark, as of now, of each partition of ``topic`` to read.

    A partition whose low and high watermarks are equal has nothing to read, and one whose
    latest records are ``known`` as of its end offset now is taken from there (into
    ``out``): both are left out.
    """
    ends: dict[int, int] = {}
    for p in partitions:
        try:
            lo, hi = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=max(0.1, timeout_s)
            )
        except KafkaException as exc:
            raise KafkaError(f"cannot read watermarks of {topic}[{p}]: {exc}") from exc
        given = known.get(p)
        if given is not None and given[0] == hi:
            out[p] = LatestRecords(dict(given[1]), 0, len(given[1]))
        elif hi > lo:
            ends[p] = hi
    return ends


def _keep_latest(
    batch: Sequence[Message], topic: str, ends: dict[int, int], out: dict[int, LatestRecords]
) -> int:
    """Keep each key's newest value from one consumed batch in ``out``; returns the records read.

    A partition leaves ``ends`` once its last record before the end, or an end-of-partition
    event at or past it, is seen; records of a partition no longer in ``ends`` are ignored.
    """
    read = 0
    for m in batch:
        p, offset = m.partition() or 0, m.offset() or 0
        err = m.error()
        if err is not None:
            if err.code() != RdKafkaError._PARTITION_EOF:
                raise KafkaError(f"reading {topic}[{p}] failed: {err}")
            if p in ends and offset >= ends[p]:
                del ends[p]
            continue
        if p not in ends:
            continue  # past the end we took at the start
        latest = out[p]
        latest.records += 1
        read += 1
        key = m.key()
        if key is not None:
            latest.values[key] = m.value()
        if offset >= ends[p] - 1:
            del ends[p]
    return read


def read_latest(
    cfg: KafkaConfig,
    topic: str,
    partitions: Sequence[int],
    stall_s: float,
    on_progress: Callable[[int, list[int]], None] | None = None,
    progress_every_s: float = 1.0,
    stop: threading.Event | None = None,
    known: Mapping[int, tuple[int, dict[bytes, bytes]]] | None = None,
) -> tuple[dict[int, LatestRecords], list[int]]:
    """The latest record of each key of a compacted topic's partitions, with one reader.

    Reads each partition up to its high watermark as of now and keeps only the newest
    value per key as it goes, as compaction would: until the broker compacts it, the
    topic's log holds every version written (a state topic: one per sensor per commit
    round), and holding them all would cost a multiple of the live state's memory.
    Records without a key are skipped. Returns the latest records per partition and the
    partitions whose end was not reached because the read stalled: nothing arrived for
    ``stall_s``. A long read that keeps advancing is never cut short (a state topic whose
    tail the broker has not compacted yet can hold millions of records, and giving up on
    it would fail every restart alike). ``on_progress(records, unfinished)`` is called
    about every ``progress_every_s`` while records arrive, and once at the end. The
    reader is assigned, not subscribed: it joins no group and commits nothing. Once
    ``stop`` is set the read ends within half a second, its partitions unfinished.
    ``known``: partition -> (end offset, latest records as of it), as a local snapshot
    holds them; such a partition is not read if it still ends there.

    It carries the daemon's own ``group.id`` (the client requires one): on a cluster
    with ACLs the daemon holds READ on its group, while a group named per reader (one
    uuid each) could not be granted by name, and every restart with state to read
    failed with GROUP_AUTHORIZATION_FAILED. Being assigned, it never joins the group,
    so the members' assignment is not disturbed.
    """
    conf = consumer_conf(
        cfg,
        {
            "group.id": cfg.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        },
    )
    consumer = Consumer(conf)
    out = {p: LatestRecords() for p in partitions}
    read = 0
    try:
        ends = _ends_to_read(consumer, topic, partitions, stall_s, known or {}, out)
        if ends:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        advanced = told = time.monotonic()
        while ends and not (stop is not None and stop.is_set()):
            now = time.monotonic()
            if now - advanced >= stall_s:
                break
            batch = consumer.consume(10000, min(0.5, stall_s - (now - advanced)))
            if batch:
                advanced = time.monotonic()
            read += _keep_latest(batch, topic, ends, out)
            if on_progress is not None and advanced - told >= progress_every_s:
                told = advanced
                on_progress(read, sorted(ends))
        if on_progress is not None:
            on_progress(read, sorted(ends))
        return out, sorted(ends)
    finally:
        consumer.close()
