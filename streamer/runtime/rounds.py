"""The commit round: a small state machine over "publish and confirm", "write state", "commit".

A round, for each partition p (see the daemon's module docstring for the why):

1. ``start``: at H_p, the last consumed offset, the state writer takes a snapshot (it
   evicts silent sensors and notes every sensor's ring anchor as of H_p);
2. once the batches queued before H are published (``batch_published`` counts them
   down), and before any later one is: the changed sensors' state is copied as of H
   (or, for a very large round, produced at once);
3. ``advance``, once per loop iteration: the copied state is serialised and produced a
   slice at a time, then the sink is marked;
4. once every record produced up to the mark is acknowledged: the offsets are committed
   without waiting, and ``answered`` books the coordinator's answer.

``run`` does the same in one call (shutdown, revocation): drain, flush, write, flush,
commit, all before it returns. ``abandon`` drops a round in flight and hands what it
has not produced back to the state writer, for the next round to write.

Nothing here touches Kafka or torch: the collaborators are the Protocols below, which
``Sink``, ``Source`` and ``Checkpointer`` satisfy, and which tests satisfy with fakes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog
from numpy.typing import NDArray

from streamer.codec import offset_of
from streamer.scoring.thresholds import Threshold

__all__ = [
    "FLUSH_TIMEOUT_S",
    "STATE_SLICE",
    "Checkpoint",
    "CommitAnswer",
    "CommitRounds",
    "CommitSent",
    "Committer",
    "Delivery",
    "Round",
    "StateAtH",
    "StateWriter",
]

log = structlog.get_logger("streamer.daemon")

FLUSH_TIMEOUT_S = 60.0
# State records serialised and produced per loop iteration by an interval round.
STATE_SLICE = 100
# An interval round starts, and serialises each slice of its state, in a loop pass with
# no scores in flight (between bursts, where it delays no window), but waits for one at
# most this long: a daemon that is never idle still commits, this much later.
BUSY_WAIT_S = 0.5


@dataclass(slots=True)
class Checkpoint:
    """One partition's part of a commit round, taken at H (``StateWriter.snapshot``)."""

    partition: int
    h: int
    # Sensors of the partition at H, and the position and count of the oldest sample a
    # future window of each needs (count 0: its ring held nothing), as arrays: at
    # 100,000 sensors a round that writes few records should not build 100,000 tuples.
    sensors: list[str]
    oldest_pos: NDArray[np.int64]
    oldest_count: NDArray[np.int64]
    # Evicted at H: their state is written without a ring anchor.
    evicted: set[str]
    _at: dict[str, int] | None = None

    def index(self) -> dict[str, int]:
        """Sensor -> its row in the arrays (built on first use)."""
        if self._at is None:
            self._at = dict(zip(self.sensors, range(len(self.sensors)), strict=True))
        return self._at

    def anchor(self, sensor: str) -> tuple[int, int] | None:
        """The ring anchor (offset, count) of a sensor of the checkpoint, if it held samples."""
        i = self.index()[sensor]
        count = int(self.oldest_count[i])
        return (offset_of(int(self.oldest_pos[i])), count) if count > 0 else None


# sensor, partition, H, ring (anchor or saved), threshold snapshot, alerts state
StateAtH = tuple[str, int, int, dict[str, Any] | None, Threshold | None, dict[str, Any]]


@dataclass(slots=True)
class Round:
    """A commit round in flight; the loop keeps consuming while it completes."""

    started: float  # perf_counter
    # Batches queued before H and not yet published: the round's state is the engine's
    # once they are, and before any later batch is.
    waiting: int
    checkpoints: list[Checkpoint]
    reason: str
    # Set at the barrier, once the state at H is copied (or, for a large round, produced).
    commits: dict[int, tuple[int, str]] | None = None
    # The state at H, serialised and produced a slice per loop iteration.
    unsent: deque[StateAtH] = field(default_factory=deque)
    # The sink mark once every state record is produced: every record behind the commits
    # (scores, alerts, dead letters, state) was produced before it.
    token: int = -1
    states: int = 0
    stalled_s: float = 0.0  # loop time spent on the round
    serialise_s: float = 0.0  # of which serialising the state at H


@dataclass(slots=True)
class CommitSent:
    """An interval round's commit, sent and not yet answered by the coordinator."""

    heads: dict[int, int]  # partition -> H
    reason: str
    states: int
    started: float  # the round's start (perf_counter)
    stalled: float  # loop time the round took
    sent: float  # perf_counter when the commit was sent
    extra: dict[str, Any]


class CommitAnswer(Protocol):
    """The coordinator's answer to an asynchronous commit (``kafka.source.CommitResult``)."""

    @property
    def committed(self) -> dict[int, int]:
        """Partition -> offset now committed."""

    @property
    def deferred(self) -> dict[int, str]:
        """Partition -> the passing error that kept it from being committed."""


class Delivery(Protocol):
    """Publish and confirm: the producer, as a round sees it (``kafka.sink.Sink``)."""

    def flush(self, timeout_s: float = ...) -> None:
        """Wait until everything produced is acknowledged (raise if it cannot be)."""

    def mark(self) -> int:
        """A token for "everything produced so far"."""

    def acknowledged(self, token: int) -> bool:
        """Whether everything produced before ``mark`` returned ``token`` is acknowledged."""


class Committer(Protocol):
    """Commit: the consumer's offsets, as a round sees them (``kafka.source.Source``)."""

    def commit(self, offsets: dict[int, tuple[int, str]]) -> bool:
        """Commit synchronously; False when a rebalance got in the way."""

    def commit_async(self, offsets: dict[int, tuple[int, str]]) -> bool:
        """Send a commit; False when it could not be sent (a rebalance)."""


class StateWriter(Protocol):
    """Write state: the per-sensor checkpoint a round takes and produces."""

    @property
    def written(self) -> int:
        """State records produced so far (a running count)."""

    def snapshot(self, partition: int) -> Checkpoint | None:
        """Step 1 for a partition, at its H; None when nothing was consumed since its commit."""

    def checkpoint(self, c: Checkpoint, defer: deque[StateAtH] | None) -> tuple[int, str]:
        """Step 2: the changed sensors' state at H (produced, or appended to ``defer``).

        Returns the partition's commit: offset and metadata.
        """

    def produce(self, state: StateAtH) -> None:
        """Serialise and produce one deferred state record."""

    def give_back(self, checkpoints: list[Checkpoint], unsent: Iterable[StateAtH]) -> None:
        """A round was abandoned: what it did not produce is for the next round."""

    def committed(self, heads: dict[int, int], offsets: dict[int, int]) -> None:
        """The coordinator accepted a commit of these partitions' H, at these offsets."""

    def round_size(self, checkpoints: list[Checkpoint]) -> int:
        """An upper bound on the records the round writes."""


class CommitRounds:
    """Runs commit rounds: at most one in flight, and the commits sent but not answered.

    ``defer_max``: a round over at most this many sensors copies their state at H and
    produces it a slice per loop iteration (a copy holds ~2 KB per sensor until it is
    serialised); a larger one produces it all at H. ``on_done(seconds, stalled_s)``
    is told of every commit the coordinator accepted.
    """

    def __init__(
        self,
        delivery: Delivery,
        committer: Committer,
        writer: StateWriter,
        *,
        defer_max: int = 20_000,
        on_done: Callable[[float, float], None] | None = None,
    ) -> None:
        self.delivery = delivery
        self.committer = committer
        self.writer = writer
        self.defer_max = defer_max
        self.on_done = on_done
        self.round: Round | None = None
        self.sent: deque[CommitSent] = deque()
        self.commits = 0

    # -- interval rounds: the loop goes on meanwhile -------------------------------------

    def start(self, partitions: Iterable[int], reason: str, *, waiting: int) -> None:
        """Step 1 now; ``waiting`` batches queued before H are still to be published."""
        assert self.round is None, "a commit round is already in flight"
        started = time.perf_counter()
        checkpoints = [c for c in map(self.writer.snapshot, partitions) if c is not None]
        if not checkpoints:
            return
        self.round = Round(started, waiting, checkpoints, reason)
        self.round.stalled_s = time.perf_counter() - started
        if waiting == 0:
            self._checkpoint()

    def batch_published(self) -> None:
        """A queued batch was published: at the round's barrier, take its state at H."""
        r = self.round
        if r is not None and r.waiting > 0:
            r.waiting -= 1
            if r.waiting == 0:
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Step 2, at the barrier: the changed sensors' state as of H."""
        r = self.round
        assert r is not None
        started = time.perf_counter()
        # A fleet's worth of records at once (100,000 sensors: hundreds of MB) is produced
        # at once instead, with the producer flushed as it goes (StateWriter.checkpoint).
        defer = self.writer.round_size(r.checkpoints) <= self.defer_max
        written = self.writer.written
        r.commits = {
            c.partition: self.writer.checkpoint(c, r.unsent if defer else None)
            for c in r.checkpoints
        }
        r.states = self.writer.written - written + len(r.unsent)
        r.serialise_s = time.perf_counter() - started
        r.stalled_s += r.serialise_s

    def advance(self, *, busy: bool = False) -> float | None:
        """Step 3: produce a slice of the round's state; commit once it is all delivered.

        ``busy``: scores are in flight, so the slice waits for a later pass, unless the
        round is older than ``BUSY_WAIT_S``. Returns the loop time the round took, once
        it is done (None before).
        """
        r = self.round
        if r is None or r.commits is None:
            return None
        if r.token < 0 and (not busy or time.perf_counter() - r.started >= BUSY_WAIT_S):
            started = time.perf_counter()
            for _ in range(min(STATE_SLICE, len(r.unsent))):
                self.writer.produce(r.unsent.popleft())
            if not r.unsent:
                r.token = self.delivery.mark()
            r.stalled_s += time.perf_counter() - started
        if r.token < 0 or not self.delivery.acknowledged(r.token):
            return None
        self.round = None
        return self._commit(
            r.checkpoints,
            r.commits,
            r.reason,
            r.states,
            r.started,
            r.stalled_s,
            wait=False,
            serialise_s=round(r.serialise_s, 4),
        )

    def abandon(self) -> None:
        """Drop the round in flight (a blocking round or a rebalance supersedes it)."""
        r = self.round
        if r is None:
            return
        self.round = None
        # What it has not produced yet, the next round writes (as of its own H).
        self.writer.give_back(r.checkpoints, r.unsent)
        log.debug(
            "commit_round_abandoned",
            reason=r.reason,
            checkpointed=r.commits is not None,
            unsent=len(r.unsent),
        )

    def answered(self, answer: CommitAnswer) -> None:
        """The coordinator's answer to the oldest commit sent without waiting."""
        if not self.sent:
            return
        sent = self.sent.popleft()
        if answer.deferred:
            # Those partitions keep their last committed H: the next round commits them.
            log.warning("commit_deferred", reason=sent.reason, errors=answer.deferred)
        heads = {p: h for p, h in sent.heads.items() if p in answer.committed}
        if heads:
            self._committed(
                answer.committed,
                heads,
                sent.reason,
                sent.states,
                sent.started,
                sent.stalled,
                {**sent.extra, "commit_s": round(time.perf_counter() - sent.sent, 4)},
            )

    # -- blocking rounds: shutdown and revocation -----------------------------------------

    def run(self, partitions: Iterable[int], reason: str, *, drain: Callable[[], None]) -> None:
        """Publish everything (``drain``), write the changed state, commit: all before returning.

        For shutdown and revocation, which must be done when the call returns. A round in
        flight must have been abandoned first.
        """
        assert self.round is None, "abandon the round in flight first"
        started = time.perf_counter()
        written = self.writer.written
        drain()
        self.delivery.flush(FLUSH_TIMEOUT_S)
        drained = time.perf_counter()
        checkpoints = [c for c in map(self.writer.snapshot, partitions) if c is not None]
        commits = {c.partition: self.writer.checkpoint(c, None) for c in checkpoints}
        self.delivery.flush(FLUSH_TIMEOUT_S)
        stalled = time.perf_counter() - started
        self._commit(
            checkpoints,
            commits,
            reason,
            self.writer.written - written,
            started,
            stalled,
            drain_s=round(drained - started, 4),
        )

    # -- the commit itself ----------------------------------------------------------------

    def _commit(
        self,
        checkpoints: list[Checkpoint],
        commits: dict[int, tuple[int, str]],
        reason: str,
        states: int,
        started: float,
        stalled: float,
        *,
        wait: bool = True,
        **extra: Any,
    ) -> float:
        """Commit what a round checkpointed (its records are acknowledged).

        ``started``: the round's start (perf_counter); ``stalled``: the loop time it took
        so far. Returns the loop time it took in all. With ``wait=False`` (interval
        rounds) the commit is sent and the loop goes on: a synchronous commit waits a
        round trip to the group coordinator (10-25 ms on a busy local broker, more
        across a network), in which nothing is consumed. ``answered`` completes it.
        """
        before = time.perf_counter()
        heads = {c.partition: c.h for c in checkpoints}
        if not wait:
            # When not sent (a rebalance is under way), the next round or the revoke commits.
            if commits and self.committer.commit_async(commits):
                now = time.perf_counter()
                taken = stalled + now - before
                self.sent.append(CommitSent(heads, reason, states, started, taken, now, extra))
            return stalled + time.perf_counter() - before
        if not commits or not self.committer.commit(commits):
            # A rebalance is under way: the next round (or the revoke) commits.
            return stalled + time.perf_counter() - before
        now = time.perf_counter()
        stalled += now - before
        offsets = {p: off for p, (off, _) in commits.items()}
        self._committed(offsets, heads, reason, states, started, stalled, extra)
        return stalled

    def _committed(
        self,
        offsets: dict[int, int],
        heads: dict[int, int],
        reason: str,
        states: int,
        started: float,
        stalled: float,
        extra: dict[str, Any],
    ) -> None:
        """Book a commit the coordinator accepted."""
        self.writer.committed(heads, offsets)
        self.commits += 1
        now = time.perf_counter()
        if self.on_done is not None:
            self.on_done(now - started, stalled)
        log.debug(
            "offsets_committed",
            reason=reason,
            offsets=offsets,
            heads=heads,
            states=states,
            seconds=round(now - started, 4),
            stalled_s=round(stalled, 4),
            **extra,
        )
