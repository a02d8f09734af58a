"""Consumer wrapper: batched consume, manual offsets, cooperative rebalancing.

Offsets are never stored or committed automatically (``enable.auto.commit`` and
``enable.auto.offset.store`` are off): the daemon commits explicitly, per
partition, only what every output depending on it has been delivered for. The
commit carries metadata (the highest offset whose windows were emitted), which
the next owner of the partition reads back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka.admin import AdminClient
from numpy.typing import NDArray

from streamer.config import KafkaConfig
from streamer.errors import KafkaError
from streamer.kafka.access import held_operations
from streamer.kafka.admin import admin_client
from streamer.kafka.clientlog import client_logger
from streamer.kafka.membership import Membership, classic, leave_group, session_defaults
from streamer.kafka.reachability import Reachability

__all__ = ["CommitResult", "Committed", "Consumed", "Source", "consumer_conf"]

log = structlog.get_logger(__name__)

_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
}
# Classic protocol only: under the consumer protocol (KIP-848) the broker assigns, and
# librdkafka refuses the setting; its rebalances are incremental anyway.
_CLASSIC_REQUIRED: dict[str, Any] = {"partition.assignment.strategy": "cooperative-sticky"}
_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    # Bound what librdkafka prefetches: this is most of the daemon's memory under backlog.
    "queued.max.messages.kbytes": 32768,
}

PartitionsCallback = Callable[[list[int]], None]
# A refusal is reported once by the client, not at every refused fetch or join, and there
# is no event for "granted again": while one is held, the broker is asked this often
# whether it now allows the operation (for at most _RECHECK_TIMEOUT_S).
_RECHECK_S = 15.0
_RECHECK_TIMEOUT_S = 2.0
# Keys of refusals() besides partition numbers.
GROUP_REFUSED, TOPIC_REFUSED, CLUSTER_REFUSED = -1, -2, -3
# Watermarks unknown from fetches are asked of the broker at most this often.
_WATERMARK_ASK_S = 10.0
_REFUSALS = frozenset(
    {
        RdKafkaError.TOPIC_AUTHORIZATION_FAILED,
        RdKafkaError.GROUP_AUTHORIZATION_FAILED,
        RdKafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
_CLIENT = "consumer"  # this client's name in the Reachability tracker


_PASSING_CODES = frozenset(
    {
        RdKafkaError.REBALANCE_IN_PROGRESS,
        RdKafkaError.ILLEGAL_GENERATION,
        RdKafkaError.UNKNOWN_MEMBER_ID,
        RdKafkaError.NOT_COORDINATOR,
        RdKafkaError.COORDINATOR_NOT_AVAILABLE,
        RdKafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        RdKafkaError.REQUEST_TIMED_OUT,
        RdKafkaError._TIMED_OUT,
        RdKafkaError._TRANSPORT,
        # The client has no coordinator yet (a broker restarting, the coordinator moving):
        # seen failing a commit round a moment after a broker restart; the next one retries.
        RdKafkaError._WAIT_COORD,
    }
)


def _is_fatal(err: Any) -> bool:
    """Whether a client error is fatal (a copy in a message or error_cb is not flagged)."""
    return bool(err.fatal()) or err.code() == RdKafkaError._FATAL


def _passing(err: Any) -> bool:
    """Whether a commit error goes away by itself (retry at the next round)."""
    if not isinstance(err, RdKafkaError):
        return False
    return bool(err.retriable()) or err.code() in _PASSING_CODES


@dataclass(frozen=True, slots=True)
class Consumed:
    """A consumed batch, by column: what the daemon needs of each message, and no client type.

    Row i is one message: its partition, offset, value and key (None when absent).
    """

    partitions: NDArray[np.int64]
    offsets: NDArray[np.int64]
    values: list[bytes | None]
    keys: list[bytes | None]

    @staticmethod
    def of(msgs: Sequence[Message]) -> Consumed:
        """The columns of confluent-kafka messages (none of them an error)."""
        n = len(msgs)
        parts = np.fromiter((m.partition() or 0 for m in msgs), dtype=np.int64, count=n)
        offs = np.fromiter((m.offset() or 0 for m in msgs), dtype=np.int64, count=n)
        values: list[Any] = [m.value() for m in msgs]
        keys: list[Any] = [m.key() for m in msgs]
        return Consumed(parts, offs, values, keys)

    @staticmethod
    def empty() -> Consumed:
        """A batch of no message."""
        none = np.zeros(0, dtype=np.int64)
        return Consumed(none, none, [], [])

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: NDArray[np.int64]) -> Consumed:
        """The batch of these rows only, in this order."""
        at = rows.tolist()
        return Consumed(
            self.partitions[rows],
            self.offsets[rows],
            [self.values[i] for i in at],
            [self.keys[i] for i in at],
        )


class Committed:
    """A partition's committed offset and metadata (offset -1: nothing committed)."""

    __slots__ = ("metadata", "offset", "partition")

    def __init__(self, partition: int, offset: int, metadata: str | None) -> None:
        self.partition = partition
        self.offset = offset
        self.metadata = metadata


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The broker's answer to one asynchronous commit (``Source.commit_async``).

    ``committed``: partition -> offset now committed; ``deferred``: partition -> the
    passing error (a rebalance, a coordinator moving) that kept it from being committed.
    """

    committed: dict[int, int]
    deferred: dict[int, str]


def consumer_conf(cfg: KafkaConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """librdkafka settings of a consumer: the defaults, ``cfg``'s client settings, ``extra``.

    Later ones win; the bootstrap servers are always ``cfg``'s, and the client's own log
    goes to structlog.
    """
    conf: dict[str, Any] = {**_DEFAULTS, **cfg.librdkafka("consumer"), **extra}
    conf["bootstrap.servers"] = cfg.bootstrap_servers
    # librdkafka's own log lines as rate-limited structlog events (served by consume/poll)
    # rather than raw "%3|...|FAIL|" lines on stderr.
    conf["logger"] = client_logger()
    return conf


def _answer(
    topic: str, err: Any, parts: list[TopicPartition]
) -> tuple[CommitResult, KafkaError | None]:
    """Sort a commit's answer for ``topic`` (request error ``err``, else each partition's) out."""
    committed: dict[int, int] = {}
    deferred: dict[int, str] = {}
    failure = None
    for tp in parts:
        if tp.topic != topic:
            continue
        error = err if err is not None else tp.error
        if error is None:
            committed[tp.partition] = tp.offset
        elif _passing(error):
            deferred[tp.partition] = str(error)
        elif failure is None:
            failure = KafkaError(f"commit of {topic}[{tp.partition}] failed: {error}")
    return CommitResult(committed, deferred), failure


class Source:
    """Subscribes to one topic in the configured group; partitions are reported as ints.

    ``reachability`` hears the client's errors and statistics (the daemon shares one
    with its Sink, so an outage is told once); by default the Source has its own.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        topic: str,
        on_assign: PartitionsCallback,
        on_revoke: PartitionsCallback,
        on_lost: PartitionsCallback,
        client_id: str = "streamer",
        *,
        reachability: Reachability | None = None,
    ) -> None:
        client = cfg.librdkafka("consumer")
        conf = consumer_conf(
            cfg, {**session_defaults(client), "group.id": cfg.group_id, "client.id": client_id}
        )
        conf.update(_REQUIRED)
        if classic(client):
            conf.update(_CLASSIC_REQUIRED)
        # Held until close: no other daemon on this host takes the same static id meanwhile.
        self._membership = Membership(cfg)
        if self._membership.instance_id is not None:
            conf["group.instance.id"] = self._membership.instance_id
        log.info(
            "group_membership",
            group=cfg.group_id,
            protocol="classic" if classic(client) else "consumer",
            instance_id=self._membership.instance_id,
            session_timeout_ms=conf.get("session.timeout.ms"),
        )
        conf["error_cb"] = self._on_error
        # Broker outages: one line when one starts and ends, not one per failed connection.
        self._reachability = reachability if reachability is not None else Reachability()
        conf.update(self._reachability.watch(_CLIENT, conf))
        # Called (inside consume/poll, on the main thread) for asynchronous commits only.
        conf["on_commit"] = self.on_commit
        self.topic = topic
        self._commit_results: list[CommitResult] = []
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._failure: BaseException | None = None
        self._fatal: str | None = None
        # What the broker refuses us (a partition, or one of the *_REFUSED keys): reason.
        self._refused: dict[int, str] = {}
        self._rechecked = 0.0
        self._cfg = cfg
        self._admin: AdminClient | None = None
        # Watermarks asked of the broker (no fetch told them): partition -> (when, them).
        self._asked: dict[int, tuple[float, tuple[int, int]]] = {}
        self._owned: set[int] = set()  # as the rebalance callbacks told
        self._conf = conf
        try:
            self._consumer = self._subscribed()
        except KafkaException as exc:
            self._membership.release()
            raise KafkaError(f"cannot create consumer: {exc}") from exc

    def _subscribed(self) -> Consumer:
        """A new client with this source's settings, subscribed to the topic."""
        consumer = Consumer(self._conf)
        consumer.subscribe(
            [self.topic],
            on_assign=self._assign_cb,
            on_revoke=self._revoke_cb,
            on_lost=self._lost_cb,
        )
        return consumer

    def _rejoin(self) -> bool:
        """Replace a client fenced by its own earlier registration; False if not allowed."""
        if not self._membership.fenced(self._fatal) or not self._membership.may_rejoin():
            return False
        lost = sorted(self._owned)
        self._owned.clear()
        log.warning(
            "group_member_fenced_rejoining",
            instance_id=self._membership.instance_id,
            partitions=lost,
            error=self._fatal,
        )
        # Whatever it held, another member may own now: nothing of it is committed.
        self._on_lost(lost)
        old, self._consumer = self._consumer, self._subscribed()
        with contextlib.suppress(KafkaException, RuntimeError):
            old.close()  # fatal already: it may refuse
        self._fatal = None
        return True

    # Rebalance callbacks run inside consume(), on the main thread. An exception raised
    # in one would be swallowed by the client, so it is latched and raised after.
    def _guard(self, fn: PartitionsCallback, parts: list[TopicPartition]) -> None:
        if self._failure is not None:
            return
        try:
            fn(sorted(tp.partition for tp in parts if tp.topic == self.topic))
        except BaseException as exc:
            self._failure = exc

    def _assign_cb(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        # Assigned here rather than by the client after the callback returns, so that the
        # callback can pause them before any fetch (their state is restored first).
        try:
            consumer.incremental_assign(parts)
        except KafkaException as exc:
            if self._failure is None:
                self._failure = KafkaError(f"cannot take assigned partitions: {exc}")
            return
        self._owned.update(tp.partition for tp in parts if tp.topic == self.topic)
        self._guard(self._on_assign, parts)

    def _revoke_cb(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._owned.difference_update(tp.partition for tp in parts)
        self._guard(self._on_revoke, parts)

    def _lost_cb(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._owned.difference_update(tp.partition for tp in parts)
        self._guard(self._on_lost, parts)

    def _on_error(self, err: Any) -> None:
        if _is_fatal(err):
            self._fatal = f"consumer fatal error: {err}"
        elif err.code() == RdKafkaError.FENCED_INSTANCE_ID:
            # Not fatal: seen once as a group coordinator came back from a restart and
            # still held this static member's previous registration; the client joins
            # again by itself. Part of the outage, not an error of its own.
            log.info(
                "group_member_rejoining", instance_id=self._membership.instance_id, error=str(err)
            )
        else:
            self._note_refusal(None, err)
            self._reachability.on_error(_CLIENT, err)

    def _note_refusal(self, partition: int | None, err: Any) -> None:
        if not isinstance(err, RdKafkaError) or err.code() not in _REFUSALS:
            return
        code = err.code()
        if code == RdKafkaError.GROUP_AUTHORIZATION_FAILED:
            key = GROUP_REFUSED  # whichever partition's message carried it
        elif code == RdKafkaError.CLUSTER_AUTHORIZATION_FAILED:
            key = CLUSTER_REFUSED
        else:
            key = TOPIC_REFUSED if partition is None or partition < 0 else partition
        self._refused[key] = f"{err.name()}: {err.str()}"

    def refusals(self) -> dict[int, str]:
        """What the broker refuses this consumer now: partition, or a ``*_REFUSED`` key -> reason.

        A refusal holds until a message of that partition arrives (any message ends a
        refusal of the group or the whole topic), or until the broker, asked every 15 s
        while one holds, reports that it now allows READ on the topic or the group.
        """
        if not self._refused:
            return {}
        now = time.monotonic()
        if now - self._rechecked >= _RECHECK_S:
            self._rechecked = now
            self._recheck()
        return dict(self._refused)

    def _recheck(self) -> None:
        """Drop the refusals the broker no longer makes (READ now allowed)."""
        refused = self._refused
        group = self._cfg.group_id if GROUP_REFUSED in refused else None
        on_topic = [k for k in refused if k not in (GROUP_REFUSED, CLUSTER_REFUSED)]
        try:
            if self._admin is None:
                self._admin = admin_client(self._cfg)
            held = held_operations(
                self._admin, [self.topic] if on_topic else [], group, _RECHECK_TIMEOUT_S
            )
        except KafkaException:
            return  # no answer: the refusal stands
        for (kind, _), (ops, _) in held.items():
            if ops is not None and "READ" not in ops:
                continue
            for key in [GROUP_REFUSED] if kind == "group" else on_topic:
                refused.pop(key, None)

    def on_commit(self, err: Any, parts: list[TopicPartition]) -> None:
        """librdkafka's commit callback: the answer queued for ``commit_results``.

        Runs on the thread serving ``consume``; an error that does not pass by itself is
        raised by the next ``consume`` (raised here, it would be lost in the client).
        """
        result, failure = _answer(self.topic, err, parts)
        if failure is not None and self._failure is None:
            self._failure = failure  # raised by the next consume (a callback's would be lost)
        self._commit_results.append(result)

    def _raise(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._fatal is not None:
            fenced = self._membership.fenced(self._fatal)
            raise KafkaError(self._fatal + (self._membership.conflict() if fenced else ""))

    def consume(self, max_messages: int, timeout_s: float) -> Consumed:
        """Up to ``max_messages`` messages; waits up to ``timeout_s`` only for the first one.

        librdkafka's batch consume waits out its whole timeout unless the batch fills,
        which would hold every sample of a moderate stream for up to the poll timeout.
        Here what has already been fetched is taken at once; with nothing fetched, the
        call waits for one message and then takes whatever arrived with it. Rebalance
        callbacks run in here too.
        """
        consumer = self._consumer
        try:
            msgs = consumer.consume(max_messages, 0)
            if not msgs and timeout_s > 0:
                first = consumer.poll(timeout_s)
                if first is not None:
                    more = consumer.consume(max_messages - 1, 0) if max_messages > 1 else []
                    msgs = [first, *more]
        except KafkaException as exc:
            raise KafkaError(f"consume failed: {exc}") from exc
        out = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(m)
            elif err.code() == RdKafkaError._PARTITION_EOF:
                continue
            elif _is_fatal(err):
                self._on_error(err)  # a fenced static member comes this way
            else:
                self._note_refusal(m.partition(), err)
                self._reachability.on_error(_CLIENT, err)  # one line per kind, rate-limited
        if self._failure is None and self._fatal is not None and self._rejoin():
            # What this client fetched, the new one fetches again from the commits.
            return Consumed.empty()
        self._raise()
        if self._refused and out:
            # Messages came: the group is joined and the topic readable, and these
            # partitions are fetched.
            for key in (GROUP_REFUSED, TOPIC_REFUSED, CLUSTER_REFUSED):
                self._refused.pop(key, None)
            for m in out:
                self._refused.pop(m.partition() or 0, None)
        return Consumed.of(out) if out else Consumed.empty()

    def commit_async(self, offsets: dict[int, tuple[int, str]]) -> bool:
        """Send a commit of ``{partition: (offset, metadata)}`` without waiting for it.

        Its outcome comes back from ``commit_results`` after a later ``consume``; a
        failure that does not pass by itself is raised by that ``consume``. Commits
        reach the group coordinator in the order they are made. Returns False when the
        request could not even be sent for a passing reason (retry at the next round).
        """
        return not offsets or self._send(offsets, asynchronous=True) is not None

    def commit_results(self) -> list[CommitResult]:
        """Outcomes of asynchronous commits answered since the last call, oldest first."""
        out, self._commit_results = self._commit_results, []
        return out

    def _send(
        self, offsets: dict[int, tuple[int, str]], asynchronous: bool
    ) -> list[TopicPartition] | None:
        """The client's commit call; None when it could not be made for a passing reason.

        Returns the answer of a synchronous commit, [] for an asynchronous one.
        """
        tps = [
            TopicPartition(self.topic, p, off, metadata=meta)
            for p, (off, meta) in sorted(offsets.items())
        ]
        try:
            if asynchronous:
                self._consumer.commit(offsets=tps, asynchronous=True)
                return []
            return self._consumer.commit(offsets=tps, asynchronous=False) or []
        except KafkaException as exc:
            if _passing(exc.args[0] if exc.args else None):
                log.warning("commit_deferred", topic=self.topic, error=str(exc))
                return None
            raise KafkaError(f"commit of {self.topic} offsets failed: {exc}") from exc

    def assignment(self) -> list[int]:
        """Partitions of the topic assigned to this consumer now."""
        return sorted(tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic)

    def pause(self, partitions: Iterable[int]) -> None:
        """Stop fetching these partitions (backpressure); their position is kept."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        if tps:
            self._consumer.pause(tps)

    def resume(self, partitions: Iterable[int]) -> None:
        """Fetch these partitions again."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        if tps:
            self._consumer.resume(tps)

    def seek(self, partition: int, offset: int) -> None:
        """Fetch ``partition`` from ``offset`` next (it must be assigned)."""
        try:
            self._consumer.seek(TopicPartition(self.topic, partition, offset))
        except KafkaException as exc:
            raise KafkaError(f"cannot seek {self.topic}[{partition}] to {offset}: {exc}") from exc

    def committed(self, partitions: Sequence[int], timeout_s: float = 30.0) -> dict[int, Committed]:
        """Committed offset and metadata per partition."""
        if not partitions:
            return {}
        try:
            tps = self._consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout=timeout_s
            )
        except KafkaException as exc:
            raise KafkaError(f"cannot read committed offsets of {self.topic}: {exc}") from exc
        return {tp.partition: Committed(tp.partition, tp.offset, tp.metadata) for tp in tps}

    def commit(self, offsets: dict[int, tuple[int, str]]) -> bool:
        """Commit ``{partition: (offset, metadata)}`` synchronously.

        Returns False when the commit failed for a passing reason (a rebalance in
        progress, a coordinator moving): the caller keeps its state and retries at the
        next round. Other failures raise KafkaError.
        """
        if not offsets:
            return True
        answer = self._send(offsets, asynchronous=False)
        if answer is None:
            return False
        result, failure = _answer(self.topic, None, answer)
        if failure is not None:
            raise failure
        for p, error in result.deferred.items():
            log.warning("commit_deferred", topic=self.topic, partition=p, error=error)
        return not result.deferred

    def watermarks(self, partition: int) -> tuple[int, int]:
        """(low, high) offsets known from the last fetch (-1001 when unknown).

        Known from fetches, without a request, while the partition is fetched. When no
        fetch has told them (a fetch refused, say), they are asked of the broker, at most
        every 10 s per partition and for at most 1 s, so that a consumer that cannot read
        still shows its backlog.
        """
        tp = TopicPartition(self.topic, partition)
        lo, hi = self._consumer.get_watermark_offsets(tp, cached=True)
        if hi >= 0:
            return int(lo), int(hi)
        asked = self._asked.get(partition)
        now = time.monotonic()
        if asked is None or now - asked[0] >= _WATERMARK_ASK_S:
            try:
                got = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            except KafkaException:
                got = None
            asked = (now, (int(got[0]), int(got[1])) if got else (-1001, -1001))
            self._asked[partition] = asked
        return asked[1]

    def end_offset(self, topic: str, partition: int, timeout_s: float = 5.0) -> int:
        """The end offset (high watermark) of another topic's partition, asked of the broker."""
        try:
            _, hi = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise KafkaError(f"cannot read the end offset of {topic}[{partition}]: {exc}") from exc
        return int(hi)

    def close(self) -> None:
        """Leave the group at once (revoke callbacks run) and release the consumer.

        A static member does not leave on close alone (librdkafka keeps it in the group
        until its session times out, awaiting a restart): ``leave_group`` makes it leave
        first, so a stopped daemon's partitions move to the others at once. A crash
        (SIGKILL) does neither, and the restarted daemon releases them.
        """
        try:
            if self._membership.instance_id is not None and classic(self._cfg.librdkafka()):
                leave_group(self._consumer)
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer_close_failed", error=str(exc))
        self._membership.release()
        self._admin = None  # the refusal checks' client, if one was made
        self._reachability.forget(_CLIENT)
        self._raise()
