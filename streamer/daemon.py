"""``streamer run``: the Kafka daemon, the one module that wires every layer together.

Main thread: consume a batch, decode it, push the samples into the engine's ring
buffers and queue the completed windows for the inference worker; publish the
scored batches (in order) as score and alert records; every
``kafka.commit_interval_s`` run a commit round. The inference worker is the
engine's thread.

Delivery (at-least-once in, deterministic ids out). A sample's position is
``partition << 40 | offset``; a window's id hashes (input topic, partition, offset
of its last sample). A commit round, for each partition p:

1. takes H_p, the last consumed offset, evicts silent sensors, and notes each
   sensor's ring anchor (the offset and count of the oldest sample its ring still
   needs) as of H_p;
2. once every batch consumed up to H_p is scored and its records (scores, alerts,
   dead letters) produced, and before any later batch is: writes the state of every
   sensor that changed (threshold, alerts, ring anchor) to the compacted state
   topic, partition p, with ``upto`` = H_p;
3. once every record produced up to step 2 is acknowledged, commits offset
   C_p = min(each live sensor's anchor offset, H_p + 1) with metadata
   ``{"v": 1, "h": H_p}``.

The loop goes on consuming and scoring past H_p meanwhile: the state written in
step 2 is the engine's exactly at H_p, because batches complete in order. Rounds
at shutdown and on revocation instead drain and flush first, and are done when
they return.

On assignment the partition's state is read back before any of its messages: the
thresholds and alerts are restored, the anchors are set on the ring buffers, and
a window is emitted only if its last offset is above ``max(h, upto)`` of its
sensor. The replay from C_p rebuilds the rings (the anchors keep the stride phase
of the original run), so a clean restart emits every window exactly once and a
crash re-emits only byte-identical records.

Operations (``streamer.metrics``, ``streamer.notify``, ``streamer.reload``): the
loop beats a heartbeat each iteration, which drives ``/healthz`` and the systemd
watchdog; counters are incremented once per batch; gauges (lag, queue depth,
paused partitions, open alerts) are refreshed about once a second. READY=1 goes
to systemd after the first consume returns: the topics were checked, the model is
loaded and the consumer is in the loop. Waiting for an assignment instead would
never make a spare instance (more instances than partitions) ready; ``/readyz``
is the per-instance "partitions assigned" signal. SIGHUP, or a change of the
checkpoint files, loads the new model in a background thread; the swap happens
between inference batches and keeps every sensor's threshold and alert state.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import orjson
import structlog
from confluent_kafka import KafkaException, Message
from numpy.typing import NDArray

from streamer.codec import (
    OFFSET_BITS,
    DeadLetter,
    DecodedSamples,
    Decoder,
    encode_alert,
    encode_scores,
    to_position,
)
from streamer.config import Config
from streamer.deadletter import DEAD_LETTER_OVERHEAD, dead_letter_record
from streamer.engine import Engine, PendingBatch, ScoredBatch
from streamer.errors import (
    ConfigError,
    InferenceError,
    KafkaError,
    StaleStateError,
    StateError,
    StreamerError,
)
from streamer.kafka.access import check_access
from streamer.kafka.admin import (
    alter_topic_command,
    ensure_topics,
    message_limits,
    state_topic_findings,
)
from streamer.kafka.reachability import Reachability
from streamer.kafka.sink import Sink
from streamer.kafka.source import (
    CLUSTER_REFUSED,
    GROUP_REFUSED,
    TOPIC_REFUSED,
    CommitResult,
    LatestRecords,
    Source,
    read_latest,
)
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.model.checkpoint import load_checkpoint
from streamer.model.train import resolve_device
from streamer.notify import Notifier, Watchdog, watchdog_interval_s
from streamer.reload import CheckpointWatcher, ModelReloader, ReloadOutcome
from streamer.scoring.thresholds import Threshold
from streamer.windows import WindowBatch

__all__ = [
    "STATE_VERSION",
    "Daemon",
    "SensorGrowth",
    "configure_logging",
    "run_daemon",
    "settle_heap",
]

log = structlog.get_logger("streamer.daemon")

STATE_VERSION = 1
"""Version of the state-topic record; any other version is reported and ignored."""
COMMIT_META_VERSION = 1
_OFFSET_MASK = (1 << OFFSET_BITS) - 1
_FLUSH_TIMEOUT_S = 60.0
# A long state restore says how far it got this often.
_RESTORE_LOG_S = 5.0
# A refusal by the broker (authorization) is logged again this often while it lasts.
_ACCESS_REPEAT_S = 30.0
_PRODUCER_MAX = 1_000_000  # librdkafka's message.max.bytes
# A dead letter refused for its size this many times (its value halved each time) fails.
_DEAD_LETTER_RESIZES = 24
# Gauges (lag, queue depth, ...) are refreshed this often; Prometheus scrapes every 15 s
# or so, and the refresh reads the consumer, so it is kept off the per-batch path.
_GAUGE_REFRESH_S = 1.0
# With scores in flight and no new message, wait this long for the oldest batch's scores
# before polling Kafka again (short: messages arriving meanwhile wait in librdkafka).
_RESULT_WAIT_S = 0.002
# The next commit round starts at least this many times the last round's duration later.
_COMMIT_SPACING = 9.0
# State records produced between waits for delivery within one commit round.
_STATE_FLUSH_EVERY = 5000
# An interval round over at most this many sensors (its partitions' sensors and
# evictions, an upper bound on the records) copies their state at H and serialises and
# produces _STATE_SLICE records per loop iteration; a larger one produces them all at H,
# flushing as above (a copy holds ~2 KB per sensor until it is serialised).
_DEFER_STATES_MAX = 20_000
_STATE_SLICE = 100
# Per-sensor eviction warnings per partition and round; the rest are summed in one line.
_EVICTIONS_LOGGED = 20


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure_logging(json_logs: bool | None = None) -> None:
    """structlog to stdout: JSON lines when stdout is not a TTY (journald), console otherwise.

    The level is ``STREAMER_LOG_LEVEL`` (debug, info, warning; default info). Debug adds
    one line per commit round (offsets, heads, timings) and per heap settle.
    """
    if json_logs is None:
        json_logs = not sys.stdout.isatty()
    name = os.environ.get("STREAMER_LOG_LEVEL", "info").strip().lower()
    if name not in _LOG_LEVELS:
        raise ConfigError(f"STREAMER_LOG_LEVEL={name!r} is not one of {', '.join(_LOG_LEVELS)}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LOG_LEVELS[name]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def settle_heap(reason: str, *, rethaw: bool = True, **fields: Any) -> None:
    """Collect every cycle, then move what is alive out of the cyclic collector's reach.

    The imports (torch above all) leave some 200,000 tracked objects that live as long
    as the process. A full collection walks them all: 90-150 ms on a 2-core machine,
    every few seconds under load, with the loop and so every score in flight stalled.
    Frozen (``gc.freeze``), they are skipped, and a full collection costs what the loop
    itself allocates. Run after start-up, an assignment's restore and a model swap:
    rare events that create long-lived objects. Unfreezing first (``rethaw``)
    re-examines what an earlier call froze, so a frozen cycle dropped since (a replaced
    model, a revoked partition's state) is still collected here. Without it, the call
    walks only what was made since the last one (``SensorGrowth``'s settles).
    """
    started = time.perf_counter()
    if rethaw:
        gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    log.debug(
        "heap_settled",
        reason=reason,
        frozen=gc.get_freeze_count(),
        collected=collected,
        seconds=round(time.perf_counter() - started, 4),
        **fields,
    )


class SensorGrowth:
    """When the sensors' long-lived objects call for another heap settle.

    Each sensor's threshold and alert state are a few tracked objects made at its first
    score, long after start-up's settle. At 100,000 sensors they are some 200,000 objects
    that every full collection walked (50-80 ms, about every second while scoring, each
    freeing nothing). Settling each time the count has doubled (from ``minimum``) keeps
    them frozen, and walks each object about twice in all.
    """

    __slots__ = ("minimum", "settled")

    def __init__(self, minimum: int = 1000) -> None:
        self.minimum = minimum
        self.settled = 0

    def due(self, sensors: int) -> bool:
        """Whether ``sensors`` is at least double (and ``minimum`` above) the last settle's."""
        return sensors - self.settled >= max(self.minimum, self.settled)


def _label(positions: NDArray[np.int64]) -> list[str]:
    """Alert-id positions as "partition:offset" (stable across runs and instances)."""
    return [f"{p >> OFFSET_BITS}:{p & _OFFSET_MASK}" for p in positions.tolist()]


@dataclass(slots=True)
class _Partition:
    """What the daemon tracks per assigned input partition."""

    partition: int
    # Offset of the last message consumed (H_p); -1 before the first one.
    consumed: int = -1
    # H of the last commit (read from the commit metadata at assignment, then ours).
    committed_h: int = -1
    # Windows and dead letters at or below this offset were already published.
    restored_h: int = -1
    # Sensor -> offset up to which its windows were published (state newer than commit).
    skip: dict[str, int] = field(default_factory=dict)
    replay_until: int = -1  # max(restored_h, every skip value)
    stale: int = 0  # restored thresholds written under another model (re-warmed)
    sensors: set[str] = field(default_factory=set)  # sensors with a ring (or a pending anchor)
    known: set[str] = field(default_factory=set)  # every sensor seen or restored here
    dirty: set[str] = field(default_factory=set)  # state to write at the next round
    evicted: set[str] = field(default_factory=set)  # state records to clear at the next round


@dataclass(slots=True)
class _Checkpoint:
    """One partition's part of a commit round, taken at H (see ``Daemon._snapshot``)."""

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
        return (int(self.oldest_pos[i]) & _OFFSET_MASK, count) if count > 0 else None


# sensor, partition, H, ring anchor, threshold snapshot, alerts state
_StateAtH = tuple[str, int, int, dict[str, int] | None, Threshold | None, dict[str, Any]]


@dataclass(slots=True)
class _Round:
    """A commit round in flight; the loop keeps consuming while it completes."""

    started: float  # perf_counter
    # The round's state is the engine's after this many batches were published: every
    # batch submitted before H, and none after.
    barrier: int
    checkpoints: list[_Checkpoint]
    reason: str
    # Set at the barrier, once the state at H is copied (or, for a large round, produced).
    commits: dict[int, tuple[int, str]] | None = None
    # The state at H, serialised and produced a slice per loop iteration.
    unsent: deque[_StateAtH] = field(default_factory=deque)
    # The sink mark once every state record is produced: every record behind the commits
    # (scores, alerts, dead letters, state) was produced before it.
    token: int = -1
    states: int = 0
    stalled_s: float = 0.0  # loop time spent on the round
    serialise_s: float = 0.0  # of which serialising the state at H


@dataclass(slots=True)
class _CommitSent:
    """An interval round's commit, sent and not yet answered by the coordinator."""

    heads: dict[int, int]  # partition -> H
    reason: str
    states: int
    started: float  # the round's start (perf_counter)
    stalled: float  # loop time the round took
    sent: float  # perf_counter when the commit was sent
    extra: dict[str, Any]


@dataclass(slots=True)
class _Stats:
    messages: int = 0
    samples: int = 0
    windows: int = 0
    skipped_windows: int = 0
    alerts: int = 0
    dead_letters: int = 0
    dead_by_kind: dict[str, int] = field(default_factory=dict)
    state_written: int = 0
    state_corrupt: int = 0
    evicted: int = 0
    commits: int = 0
    pauses: int = 0


class Daemon:
    """One streamer instance: consume, score, publish, checkpoint, commit."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.topics = cfg.topics
        device = resolve_device(cfg.model.device)
        load_started = time.perf_counter()
        model = load_checkpoint(cfg.model.path, device)
        load_s = time.perf_counter() - load_started
        if model.window != cfg.stream.window or tuple(model.channels) != tuple(cfg.stream.channels):
            raise ConfigError(
                f"model {cfg.model.path} has window {model.window} and channels "
                f"{list(model.channels)}; stream.window is {cfg.stream.window} and "
                f"stream.channels {list(cfg.stream.channels)}: they must match"
            )
        self.channels = list(model.channels)
        self.decoder = Decoder(cfg.stream)
        self.metrics = Metrics()
        self.health = Health(cfg.metrics.stall_after_s)
        self.metrics.track_health(self.health)
        # /readyz turns 503 after this long with no broker reachable (metrics.unready_after_s).
        self.health.unready_after_s = cfg.metrics.unready_after_s
        # Shared by consumer and producer: one kafka_unreachable line per outage, and Health.
        self.reachability = Reachability(on_change=self.health.set_broker_down_since)
        self.notifier = Notifier()
        self.engine = Engine(
            model,
            max_gap_s=cfg.stream.max_gap_s,
            threshold=cfg.threshold,
            alerts=cfg.alerts,
            inference=cfg.inference,
            device=device,
            stride=cfg.stream.stride,
            position_label=_label,
            on_batch=self.metrics.inference_batch_done,
        )
        self.metrics.model_in_use(model.version, load_s)
        self.health.model_version = model.version
        self.reloader = ModelReloader(
            cfg.model.path, device, model.window, model.channels, cfg.threshold
        )
        self.watcher = CheckpointWatcher(cfg.model.path) if cfg.model.watch_interval_s > 0 else None
        self._reload_requested = False
        self._server: MetricsServer | None = None
        self._watchdog: Watchdog | None = None
        self.parts: dict[int, _Partition] = {}
        self.sensor_part: dict[str, int] = {}
        # Offset of the ring anchor last written to the state topic, per live sensor.
        self.anchor_offset: dict[str, int] = {}
        # Per live sensor, when its last message arrived (monotonic): wall-clock idleness
        # (stream.max_idle_s) and which sensor gives way under stream.max_sensors.
        self.last_seen: dict[str, float] = {}
        # Evicted sensors whose threshold and alert state is kept in memory: since when
        # (monotonic) and their partition, oldest first (see _expire_evicted).
        self.evicted_at: dict[str, tuple[float, int]] = {}
        # Sensor-limit events since the last sensor_limit_reached line (one per interval).
        self.limit_counts = {"evicted": 0, "refused_samples": 0, "refused_sensors": 0}
        self.limit_logged = 0.0
        self.pending: deque[PendingBatch] = deque()
        # Batches submitted to and published from the engine, for a round's barrier.
        self.submitted = 0
        self.published = 0
        self.round: _Round | None = None
        self.commits_sent: deque[_CommitSent] = deque()
        self.growth = SensorGrowth()
        # Backpressure: not consuming because the worker's queue is full (since when), and
        # whether the partitions are also paused in the client (after kafka.pause_after_s).
        self.paused = False
        self.paused_since = 0.0
        self.client_paused = False
        self.stats = _Stats()
        self._access_logged = 0.0
        self._stop_requested = False
        # Set once the loop raised: from then on nothing is committed (see run).
        self._failed = False
        self._stop_signal = ""
        self._signals = 0
        self.sink: Sink | None = None
        self.source: Source | None = None
        # Bytes of a message's value a dead letter keeps (set from the topic limits).
        self.dlq_value_bytes = self.cfg.stream.max_message_bytes
        log.info(
            "daemon_configured",
            model=model.version,
            device=device,
            window=model.window,
            stride=cfg.stream.stride,
            channels=self.channels,
            input=self.topics.input,
            group=cfg.kafka.group_id,
            bootstrap=cfg.kafka.bootstrap_servers,
            kafka_client=cfg.redacted()["kafka"]["client"],  # secrets masked
            load_s=round(load_s, 3),
        )

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: the operator wants out now. Nothing is committed that was
            # not delivered, so the next start replays from the last commit.
            os.write(2, b"streamer: second signal, exiting at once (exit code 1)\n")
            os._exit(1)
        # No logging here: the handler may interrupt a write to stdout. The loop logs it.
        self._stop_requested = True
        self._stop_signal = signal.Signals(signum).name

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        # As for SIGTERM: only a flag; the loop starts the reload.
        self._reload_requested = True

    def request_stop(self) -> None:
        """Ask the main loop to drain, commit and return (as SIGTERM does)."""
        self._stop_requested = True

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; 0 after a clean shutdown. Raises StreamerError on failure."""
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self._start_ops()
            ensure_topics(cfg.kafka, self.topics)
            self._check_state_topic()
            self._check_grants()
            self.sink = Sink(
                cfg.kafka, max_batch_bytes=self._output_limits(), reachability=self.reachability
            )
            self.source = Source(
                cfg.kafka,
                self.topics.input,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
                reachability=self.reachability,
            )
            log.info("daemon_started", input=self.topics.input, group=cfg.kafka.group_id)
            settle_heap("started")
            try:
                return self._loop()
            except BaseException:
                # Whatever failed may have left a batch half processed, or its records
                # unsent: closing the consumer below revokes the partitions, and that
                # revocation must release them without a commit round. The next owner
                # replays from the last commit, so nothing is lost.
                self._failed = True
                raise
        finally:
            # Frozen objects are not freed at exit, and some extensions report them as leaks.
            gc.unfreeze()
            self._stop_ops()
            self.engine.close()
            if self.sink is not None:
                self.sink.close()
            if self.source is not None:
                with contextlib.suppress(StreamerError):
                    self.source.close()

    def _loop(self) -> int:
        assert self.sink is not None and self.source is not None
        cfg = self.cfg
        batch_n = cfg.kafka.consume_batch
        poll_s = cfg.kafka.poll_timeout_ms / 1000.0
        commit_every = cfg.kafka.commit_interval_s
        stats_every = cfg.metrics.stats_interval_s
        watch_every = cfg.model.watch_interval_s
        next_commit = time.monotonic() + commit_every
        next_stats = time.monotonic() + stats_every
        next_gauges = next_watch = time.monotonic()
        last_stats = (time.monotonic(), self.stats.messages, self.stats.windows)
        worker = self.engine.worker
        ready = False
        while not self._stop_requested:
            self.health.beat()
            worker.raise_if_failed()
            if self.paused and worker.is_half_empty:
                self._set_paused(False)
            if not self.paused and worker.is_full:
                self._set_paused(True)
            if (
                self.paused
                and not self.client_paused
                and time.monotonic() - self.paused_since >= cfg.kafka.pause_after_s
            ):
                self._pause_client()
            # Held (paused, not in the client): no consume; the worker is waited on below
            # and the messages wait in librdkafka.
            msgs: list[Message] = []
            if not self.paused or self.client_paused:
                # Consume even while paused in the client: it serves rebalances. With scores
                # in flight, do not wait in consume: wait on the worker below.
                busy = self.paused or bool(self.pending)
                msgs = self.source.consume(batch_n, 0.0 if busy else poll_s)
                for answer in self.source.commit_results():
                    self._commit_answered(answer)
            if not ready:
                ready = True
                self.notifier.ready(f"consuming {self.topics.input}")
                log.info("daemon_ready", input=self.topics.input)
            if msgs:
                self._process(msgs)
            if self.paused:
                self._publish_done(block_s=0.05)
            else:
                self._publish_done(block_s=0.0 if msgs else _RESULT_WAIT_S)
            self.sink.poll(0)
            if self._reload_requested:
                self._reload_requested = False
                self._request_reload("signal")
            outcome = self.reloader.take()
            if outcome is not None:
                self._apply_reload(outcome)
            now = time.monotonic()
            if self.round is None and now >= next_commit:
                self._expire_evicted()
                self._start_round(list(self.parts), reason="interval")
            if self.round is not None:
                stalled = self._advance_round()
                if stalled is not None:
                    # With many changed sensors a round's checkpoint takes seconds of the
                    # loop's time. Space rounds so that they take at most a tenth of it.
                    next_commit = time.monotonic() + max(commit_every, _COMMIT_SPACING * stalled)
            if now >= next_gauges:
                self._refresh_gauges()
                next_gauges = now + _GAUGE_REFRESH_S
                sensors = len(self.engine.thresholds)
                if self.growth.due(sensors):
                    settle_heap("sensors", rethaw=False, sensors=sensors)
                    self.growth.settled = sensors
            if self.watcher is not None and now >= next_watch:
                next_watch = now + watch_every
                if self.watcher.changed():
                    self._request_reload("file_changed")
            if now >= next_stats:
                last_stats = self._log_stats(last_stats)
                next_stats = now + stats_every
        log.info("shutdown_started", signal=self._stop_signal, pending_batches=len(self.pending))
        self.notifier.stopping("draining, flushing and committing")
        self._abandon_round()
        self._commit_round(list(self.parts), reason="shutdown")
        # Leaving the group revokes everything: the callback finds nothing left to commit.
        self.source.close()
        self.source = None
        self.sink.flush(_FLUSH_TIMEOUT_S)
        self._log_stats(last_stats)
        log.info("shutdown_complete")
        return 0

    def _check_state_topic(self) -> None:
        """Warn, naming the settings and the command, when the state tail can grow unbounded."""
        topic = self.topics.state
        findings = state_topic_findings(self.cfg.kafka, topic, timeout_s=10.0)
        if findings is None:
            log.info("state_topic_settings_unknown", topic=topic)
        elif findings:
            log.warning(
                "state_topic_unbounded",
                topic=topic,
                settings={f.name: {"now": f.value, "wanted": f.wanted} for f in findings},
                why=sorted({f.why for f in findings}),
                command=alter_topic_command(self.cfg.kafka.bootstrap_servers, topic, findings),
            )

    def _check_grants(self) -> None:
        """Fail at start-up, naming the grant, when an output or the state is not writable.

        Without WRITE on an output topic (or READ and WRITE on the state topic) the first
        record there fails, perhaps hours later at the first alert; the broker says now.
        A refused input or group is only logged: the daemon stays up, not ready, and
        consumes once the grant arrives (see _check_access).
        """
        try:
            grants = check_access(self.cfg.kafka, self.topics, timeout_s=10.0)
        except (KafkaException, KafkaError) as exc:
            log.info("kafka_access_unchecked", error=str(exc))
            return
        missing = [g for g in grants if g.held is False]
        if not missing:
            return
        user = self.cfg.kafka.librdkafka().get("sasl.username")
        principal = f"User:{user}" if user else "User:<this client's principal>"
        said = [f"{g.operation} on {g.resource_type} {g.name} ({g.role})" for g in missing]
        commands = [g.acl_command(principal, self.cfg.kafka.bootstrap_servers) for g in missing]
        log.error("kafka_access_missing", missing=said, principal=principal, grant=commands)
        # Only READ on the input and on the group may wait for their grant (not ready).
        waits = [g.operation == "READ" and g.role in ("input", "group") for g in missing]
        fatal = [s for s, w in zip(said, waits, strict=True) if not w]
        if fatal:
            raise KafkaError(
                f"{principal} lacks {'; '.join(fatal)} on {self.cfg.kafka.bootstrap_servers}; "
                f"grant it: {' && '.join(commands)}"
            )

    def _output_limits(self) -> int:
        """Size the dead letters to the DLQ topic; the smallest limit of the output topics.

        A dead letter keeps the original bytes, cut to what both the DLQ topic's
        ``max.message.bytes`` and the producer's ``message.max.bytes`` accept.
        """
        t = self.topics
        limits = message_limits(self.cfg.kafka, [t.scores, t.alerts, t.dlq, t.state])
        producer_max = int(self.cfg.kafka.librdkafka().get("message.max.bytes", _PRODUCER_MAX))
        dlq = min(limits[t.dlq], producer_max)
        self.dlq_value_bytes = max(0, dlq - DEAD_LETTER_OVERHEAD - dlq // 200)
        log.info("output_limits", topics=limits, dead_letter_value_bytes=self.dlq_value_bytes)
        return min(*limits.values(), producer_max)

    # -- operations: metrics, health, watchdog, reload ---------------------------------------

    def _start_ops(self) -> None:
        mc = self.cfg.metrics
        if mc.enabled:
            self._server = MetricsServer(self.metrics.registry, self.health, mc.host, mc.port)
            host, port = self._server.start()
            log.info("metrics_listening", host=host, port=port)
        interval_s = watchdog_interval_s()
        if interval_s is not None and self.notifier.enabled:
            self._watchdog = Watchdog(self.notifier, interval_s, lambda: self.health.healthy)
            self._watchdog.start()
            log.info(
                "watchdog_enabled",
                timeout_s=interval_s,
                ping_every_s=self._watchdog.period_s,
                stall_after_s=self.health.stall_after_s,
            )

    def _stop_ops(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._server is not None:
            self._server.close()
        self.notifier.close()

    def _request_reload(self, trigger: str) -> None:
        if self.watcher is not None:
            self.watcher.rebase()  # the files as they are now are what this load reads
        log.info("model_reload_started", trigger=trigger, path=str(self.cfg.model.path))
        self.notifier.reloading(f"loading model from {self.cfg.model.path}")
        self.reloader.request(trigger)

    def _apply_reload(self, out: ReloadOutcome) -> None:
        """Swap in a validated model between batches, or keep the running one and say why."""
        running = self.engine.worker.model_version
        ctx = {"trigger": out.trigger, "path": str(self.cfg.model.path)}
        error = out.error
        if out.model is not None and out.model.version == running:
            self.metrics.reload_result("unchanged")
            log.info("model_reload_skipped", reason="same version", model=running, **ctx)
        elif out.model is not None:
            try:
                self.engine.swap_model(out.model, out.prototype)
            except InferenceError as exc:
                error = str(exc)
            else:
                self.metrics.reload_result("ok")
                self.metrics.model_in_use(out.model.version, out.seconds)
                self.health.model_version = out.model.version
                log.info(
                    "model_reloaded",
                    model=out.model.version,
                    previous=running,
                    load_s=round(out.seconds, 3),
                    **ctx,
                )
                settle_heap("model_reloaded")
        if error is not None:
            self.metrics.reload_result("failed")
            log.warning("model_reload_failed", reason=error, model=running, **ctx)
        self.notifier.ready(f"consuming {self.topics.input} with model {self.engine.model.version}")

    def _lag(self) -> dict[int, int]:
        """Messages behind the partition's high watermark, per owned partition (cached)."""
        out: dict[int, int] = {}
        if self.source is None:
            return out
        for p, part in self.parts.items():
            _, hi = self.source.watermarks(p)
            if hi >= 0:
                # Before the first message, the position is after the last commit's H.
                out[p] = max(0, hi - (max(part.consumed, part.committed_h) + 1))
        return out

    def _refresh_gauges(self) -> None:
        m = self.metrics
        m.set_lag(self._lag())
        m.queue_depth.set(self.engine.worker.queue_depth)
        m.queued_windows.set(self.engine.worker.queued_windows)
        m.partitions_assigned.set(len(self.parts))
        m.partitions_paused.set(len(self.parts) if self.paused else 0)
        m.alerts_open.set(self.engine.alerts.open_count())
        m.sensors.set(len(self.sensor_part))
        self._check_access()

    def _refused_what(self, key: int) -> str:
        """What a key of Source.refusals() names: the group, the topic, or a partition."""
        if key == GROUP_REFUSED:
            return f"group {self.cfg.kafka.group_id}"
        if key == TOPIC_REFUSED:
            return f"topic {self.topics.input}"
        if key == CLUSTER_REFUSED:
            return "cluster"
        return f"{self.topics.input}[{key}]"

    def _check_access(self) -> None:
        """Not ready while the broker refuses our input or group; say so, at a bounded rate.

        A fetch refused for lack of READ leaves a partition assigned and the loop healthy,
        consuming nothing: without this, the instance would report ready while its
        backlog grows.
        """
        if self.source is None:
            return
        refused = self.source.refusals()
        reason = (
            None
            if not refused
            else "; ".join(f"{self._refused_what(p)}: {why}" for p, why in sorted(refused.items()))
        )
        now = time.monotonic()
        if reason is not None and (
            reason != self.health.access_refused or now - self._access_logged >= _ACCESS_REPEAT_S
        ):
            self._access_logged = now
            log.error(
                "kafka_access_refused",
                reason=reason,
                hint="check the grants with `streamer check-access --config ...`",
            )
        elif reason is None and self.health.access_refused is not None:
            log.info("kafka_access_granted", was=self.health.access_refused)
        self.health.access_refused = reason

    def _set_paused(self, paused: bool) -> None:
        """Stop consuming while the worker's queue is full, or start again.

        Pausing holds consumption first: no consume call, so librdkafka keeps what it
        prefetched, where pausing the partitions in the client would discard it and fetch
        it again on resume. They are paused in the client only if the hold lasts
        ``kafka.pause_after_s`` (``_pause_client``), so that rebalances are served.
        """
        assert self.source is not None
        parts = list(self.parts)
        if paused:
            self.paused_since = time.monotonic()
            self.stats.pauses += 1
            log.info("consumption_paused", **self._queue_fields(), partitions=parts)
        else:
            if self.client_paused:
                self.source.resume(parts)
                self.client_paused = False
            log.info(
                "consumption_resumed",
                **self._queue_fields(),
                partitions=parts,
                paused_s=round(time.monotonic() - self.paused_since, 3),
            )
        self.paused = paused

    def _pause_client(self) -> None:
        """Pause the partitions in the client: the worker is still full after the hold."""
        assert self.source is not None
        parts = list(self.parts)
        self.source.pause(parts)
        self.client_paused = True
        log.warning(
            "partitions_paused",
            held_s=round(time.monotonic() - self.paused_since, 3),
            **self._queue_fields(),
            partitions=parts,
        )

    def _queue_fields(self) -> dict[str, int]:
        """The worker queue's fill, for the backpressure and stats log lines."""
        worker = self.engine.worker
        return {"queue_depth": worker.queue_depth, "queued_windows": worker.queued_windows}

    def _log_stats(self, last: tuple[float, int, int]) -> tuple[float, int, int]:
        now = time.monotonic()
        st = self.stats
        dt_s = max(now - last[0], 1e-9)
        lag = sum(self._lag().values())
        messages_per_s = round((st.messages - last[1]) / dt_s, 1)
        windows_per_s = round((st.windows - last[2]) / dt_s, 1)
        log.info(
            "stats",
            messages_per_s=messages_per_s,
            windows_per_s=windows_per_s,
            messages=st.messages,
            windows=st.windows,
            alerts=st.alerts,
            dead_letters=st.dead_letters,
            dead_by_kind=dict(st.dead_by_kind),
            lag=lag,
            **self._queue_fields(),
            paused=self.paused,
            partitions=sorted(self.parts),
            sensors=len(self.sensor_part),
            commits=st.commits,
            model=self.engine.model.version,
        )
        self.notifier.status(
            f"{messages_per_s} msg/s, {windows_per_s} windows/s, lag {lag}, "
            f"partitions {sorted(self.parts)}, model {self.engine.model.version}"
        )
        return now, st.messages, st.windows

    # -- processing ------------------------------------------------------------------------

    def _process(self, msgs: list[Message]) -> None:
        parts_l = [m.partition() or 0 for m in msgs]
        offs_l = [m.offset() or 0 for m in msgs]
        part_arr = np.asarray(parts_l, dtype=np.int64)
        off_arr = np.asarray(offs_l, dtype=np.int64)
        keep = np.ones(len(msgs), dtype=bool)
        heads: list[tuple[_Partition, int]] = []
        for p in np.unique(part_arr).tolist():
            sel = part_arr == p
            part = self.parts.get(p)
            if part is None:
                keep &= ~sel  # not ours (any more)
                continue
            # Never process an offset twice in one assignment (pause/resume may refetch).
            keep &= ~(sel & (off_arr <= part.consumed))
            heads.append((part, int(off_arr[sel].max())))
        if not keep.all():
            idx = np.flatnonzero(keep)
            msgs = [msgs[i] for i in idx.tolist()]
            part_arr, off_arr = part_arr[idx], off_arr[idx]
        if msgs:
            self._process_kept(msgs, part_arr, off_arr)
        # Only now is the batch fully processed (decoded, dead-lettered, its windows
        # queued): H, what a commit round may cover, moves past it. Raised above, it
        # stays where it was, so no round can commit an offset that was never processed.
        for part, head in heads:
            part.consumed = max(part.consumed, head)

    def _process_kept(
        self, msgs: list[Message], part_arr: NDArray[np.int64], off_arr: NDArray[np.int64]
    ) -> None:
        """Decode a batch's new messages, dead-letter the bad ones, queue their windows."""
        self.stats.messages += len(msgs)
        self.metrics.messages_consumed.inc(len(msgs))
        positions = to_position(part_arr, off_arr)
        samples, dead = self.decoder.decode(
            [m.value() for m in msgs], [m.key() for m in msgs], positions
        )
        for d in dead:
            self._dead_letter(msgs[d.index], d)
        samples = self._refuse_future(msgs, samples)
        s_parts = part_arr[samples.index]
        refused = self._track_sensors(samples.keys, s_parts)
        if refused is not None:
            samples = self._refuse(
                msgs,
                samples,
                refused,
                "sensor_limit",
                lambda r: (
                    f"new sensor {samples.keys[r]!r} refused: stream.max_sensors "
                    f"({self.cfg.stream.max_sensors}) reached and every sensor is in this batch"
                ),
            )
            s_parts = part_arr[samples.index]
        if len(samples) == 0:
            return
        self.stats.samples += len(samples)
        self.metrics.samples_decoded.inc(len(samples))
        keep_fn = self._keep_fn(s_parts, samples.positions)
        push, pieces = self.engine.submit_pieces(
            samples.keys,
            samples.ts,
            samples.values,
            samples.positions,
            piece=self.cfg.inference.chunk,
            keep=keep_fn,
        )
        for r in push.rejected.tolist():
            i = int(samples.index[r])
            self._dead_letter(
                msgs[i],
                DeadLetter(
                    i,
                    "out_of_order",
                    f"timestamp {float(samples.ts[r])!r} is not after the sensor's previous sample",
                ),
            )
        self.pending.extend(pieces)
        self.submitted += len(pieces)
        # The worker may already be done with older batches: publish them without waiting.
        self._publish_done(block_s=0.0)

    def _refuse_future(self, msgs: list[Message], samples: DecodedSamples) -> DecodedSamples:
        """Dead-letter samples stamped more than stream.max_future_s ahead of the wall clock."""
        if len(samples) == 0:
            return samples
        now = time.time()
        limit = now + self.cfg.stream.max_future_s
        if float(samples.ts.max()) <= limit:
            return samples  # the common case: one comparison per batch
        ts = samples.ts
        return self._refuse(
            msgs,
            samples,
            ts > limit,
            "bad_timestamp",
            lambda r: (
                f"{self.cfg.stream.timestamp_field} {float(ts[r])!r} is {float(ts[r]) - now:.0f} s "
                f"ahead of the clock (stream.max_future_s {self.cfg.stream.max_future_s:g})"
            ),
        )

    def _refuse(
        self,
        msgs: list[Message],
        samples: DecodedSamples,
        bad: NDArray[np.bool_],
        kind: str,
        reason: Any,
    ) -> DecodedSamples:
        """Dead-letter the samples ``bad`` marks (``reason(row)`` says why); the others."""
        for r in np.flatnonzero(bad).tolist():
            i = int(samples.index[r])
            self._dead_letter(msgs[i], DeadLetter(i, kind, reason(r)))
        keep = ~bad
        return DecodedSamples(
            samples.keys[keep],
            samples.ts[keep],
            samples.values[keep],
            samples.positions[keep],
            samples.index[keep],
        )

    def _track_sensors(
        self, keys: NDArray[np.object_], parts: NDArray[np.int64]
    ) -> NDArray[np.bool_] | None:
        """Register new sensors (their ring anchor is written at the next round).

        Beyond stream.max_sensors, a new sensor takes the place of the least recently seen
        one, not in this batch, that has not filled a window yet (since its last reset).
        Sensors that fill windows are never displaced by new ids: with no such place left,
        the samples of the sensors that find no room are marked in the returned mask, to
        be dead-lettered (sensor_limit), so a flood of new ids costs no real sensor its
        window.
        """
        known = self.sensor_part
        names = keys.tolist()
        now = time.monotonic()
        # One dict lookup per sample: cheaper than finding the distinct keys (np.unique
        # sorts objects with Python comparisons), and almost every key is known.
        new = [i for i, key in enumerate(names) if key not in known]
        refused = None
        if new:
            first: dict[str, int] = {}
            for i in new:
                first.setdefault(names[i], int(parts[i]))
            room = self.cfg.stream.max_sensors - len(known)
            if len(first) > room:
                room += self._make_room(len(first) - room, set(names))
                if len(first) > room:
                    over = set(itertools.islice(first, room, None))
                    refused = np.fromiter((n in over for n in names), bool, len(names))
                    for key in over:
                        del first[key]
                    self._count_limit(refused_samples=int(refused.sum()), refused_sensors=len(over))
            for key, p in first.items():
                self.sensor_part[key] = p
                part = self.parts[p]
                part.sensors.add(key)
                part.known.add(key)
                part.dirty.add(key)
                part.evicted.discard(key)
                self.evicted_at.pop(key, None)
        if refused is None:
            self.last_seen.update(zip(names, itertools.repeat(now)))
        else:
            kept = (n for n, r in zip(names, refused.tolist(), strict=True) if not r)
            self.last_seen.update((n, now) for n in kept)
        return refused

    def _make_room(self, wanted: int, batch: set[str]) -> int:
        """Evict up to ``wanted`` live sensors that have not filled a window, not in ``batch``.

        The least recently seen go first. Runs only at the limit: a pass over the live
        sensors. Returns how many were evicted.
        """
        engine = self.engine
        names = [s for s in self.sensor_part if s not in batch]
        if not names:
            return 0
        slots = engine.index.slots(names)
        unfilled = np.flatnonzero(engine.windows.counts_of(slots) < engine.windows.window)
        seen = np.fromiter(
            map(self.last_seen.get, names, itertools.repeat(0.0)),
            dtype=np.float64,
            count=len(names),
        )
        oldest = unfilled[np.argsort(seen[unfilled], kind="stable")[:wanted]]
        victims = [names[i] for i in oldest.tolist()]
        for s in victims:
            part = self.parts[self.sensor_part[s]]
            self._evicted(s, part, "sensor_limit")
        self._count_limit(evicted=len(victims))
        return len(victims)

    def _count_limit(self, **counts: int) -> None:
        """Count sensor-limit events; one sensor_limit_reached line per stats interval."""
        for k, v in counts.items():
            self.limit_counts[k] += v
        self.metrics.sensors_refused.inc(counts.get("refused_samples", 0))
        now = time.monotonic()
        if now - self.limit_logged >= self.cfg.metrics.stats_interval_s:
            self.limit_logged = now
            log.warning(
                "sensor_limit_reached",
                max_sensors=self.cfg.stream.max_sensors,
                sensors=len(self.sensor_part),
                **self.limit_counts,
                hint="a flood of new sensor ids, or raise stream.max_sensors",
            )
            self.limit_counts = dict.fromkeys(self.limit_counts, 0)

    def _evicted(self, sensor: str, part: _Partition, reason: str) -> None:
        """Drop a live sensor's ring; keep what it learned, if anything (see _expire_evicted).

        A sensor that was never scored has nothing to keep: it leaves the known set, and
        its record (if an anchor was written) is cleared with a tombstone at the next round.
        """
        written = sensor in self.anchor_offset
        self._forget_ring(sensor, part)
        if sensor in self.engine.thresholds:
            part.evicted.add(sensor)
            self.evicted_at.pop(sensor, None)
            self.evicted_at[sensor] = (time.monotonic(), part.partition)
        else:
            part.known.discard(sensor)
            if written:
                part.evicted.add(sensor)
        self.stats.evicted += 1
        self.metrics.sensors_evicted.labels(reason=reason).inc()

    def _expire_evicted(self) -> None:
        """Forget the state of sensors evicted too long ago, or beyond max_sensors of them.

        Run between rounds only (no round's records in flight): the tombstone then comes
        after every earlier record of the sensor, so a restart re-warms it too.
        """
        assert self.sink is not None
        ttl_s = self.cfg.stream.evicted_state_ttl_s
        cap = self.cfg.stream.max_sensors
        now = time.monotonic()
        expired: list[tuple[str, int]] = []
        for sensor, (since, p) in self.evicted_at.items():  # oldest first
            if now - since <= ttl_s and len(self.evicted_at) - len(expired) <= cap:
                break
            expired.append((sensor, p))
        if not expired:
            return
        names = [s for s, _ in expired]
        self.engine.thresholds.drop(names)
        self.engine.alerts.drop(names)
        for sensor, p in expired:
            del self.evicted_at[sensor]
            part = self.parts.get(p)
            if part is not None:
                part.known.discard(sensor)
                part.evicted.discard(sensor)
                self.sink.produce(self.topics.state, None, key=sensor, partition=p)
        self.metrics.sensors_expired.inc(len(expired))
        log.info("evicted_state_expired", sensors=len(expired), kept=len(self.evicted_at))

    def _keep_fn(self, parts: NDArray[np.int64], positions: NDArray[np.int64]) -> Any:
        """Window filter for a replay: None (keep all) once past every partition's replay mark."""
        offs = positions & _OFFSET_MASK
        if not any(
            (offs[parts == p] <= self.parts[p].replay_until).any()
            for p in np.unique(parts).tolist()
        ):
            return None
        index = self.engine.index

        def keep(w: WindowBatch) -> NDArray[np.bool_]:
            out = np.ones(len(w), dtype=bool)
            sensors = index.keys_of(w.slots)
            for i, pos in enumerate(w.end_pos.tolist()):
                p, off = pos >> OFFSET_BITS, pos & _OFFSET_MASK
                part = self.parts[p]
                if off <= part.replay_until:
                    mark = part.skip.get(str(sensors[i]), part.restored_h)
                    out[i] = off > max(mark, part.restored_h)
            skipped = int((~out).sum())
            self.stats.skipped_windows += skipped
            self.metrics.windows_skipped.inc(skipped)
            return out

        return keep

    def _dead_letter(self, msg: Message, d: DeadLetter) -> None:
        assert self.sink is not None
        p, off = msg.partition() or 0, msg.offset() or 0
        part = self.parts[p]
        if off <= part.restored_h:
            return  # published before the restart
        self.stats.dead_letters += 1
        self.stats.dead_by_kind[d.kind] = self.stats.dead_by_kind.get(d.kind, 0) + 1
        self.metrics.dead_letter(d.kind)
        value, key = msg.value(), msg.key()
        assert not isinstance(value, str) and not isinstance(key, str)

        def record(max_value_bytes: int) -> tuple[bytes | None, bytes | None, list[Any]]:
            r = dead_letter_record(
                value,
                key,
                kind=d.kind,
                reason=d.reason,
                topic=self.topics.input,
                partition=p,
                offset=off,
                max_value_bytes=max_value_bytes,
            )
            if r.truncated:
                self.metrics.dead_letters_truncated.inc()
                log.warning(
                    "dead_letter_truncated",
                    kind=d.kind,
                    partition=p,
                    offset=off,
                    size=len(value or b""),
                    kept=len(r.value or b""),
                )
            return r.value, r.key, r.headers

        def smaller(refusals: int) -> tuple[bytes | None, bytes | None, list[Any]] | None:
            # Refused anyway (a topic's limit lowered since start-up): halve what is kept.
            if refusals > _DEAD_LETTER_RESIZES:
                return None
            return record(min(len(value or b""), self.dlq_value_bytes) >> refusals)

        first = record(self.dlq_value_bytes)
        self.sink.produce(self.topics.dlq, first[0], key=first[1], headers=first[2], shrink=smaller)

    def _publish_done(self, block_s: float) -> None:
        """Publish scored batches in order; wait up to ``block_s`` for the oldest one."""
        pending = self.pending
        if pending and block_s > 0 and not pending[0].future.done():
            try:
                pending[0].future.result(timeout=block_s)
            except TimeoutError:
                return
        while pending and pending[0].future.done():
            self._publish_next()

    def _drain(self) -> None:
        """Wait for and publish every queued batch."""
        while self.pending:
            self._publish_next()

    def _publish_next(self) -> None:
        """Complete and publish the oldest queued batch (waiting for its scores)."""
        self._publish(self.engine.complete(self.pending.popleft()))
        self.published += 1
        if self.round is not None and self.published == self.round.barrier:
            self._checkpoint_round()

    def _publish(self, b: ScoredBatch) -> None:
        assert self.sink is not None
        n = len(b)
        if n == 0:
            return
        topic_out = self.topics.scores
        produce = self.sink.produce
        sensors = [str(s) for s in b.sensors]
        records = encode_scores(
            topic=self.topics.input,
            sensors=sensors,
            positions=b.windows.end_pos,
            window_start=b.windows.start_ts,
            window_end=b.windows.end_ts,
            scores=b.scores,
            thresholds=b.thresholds,
            anomalous=b.anomalous,
            likelihood=b.likelihood,
            channel_errors=b.channel_errors,
            channels=self.channels,
            model=b.model_version,
        )
        end_ts = b.windows.end_ts
        e2e = self.metrics.end_to_end

        def delivered() -> None:
            # Hooked on the batch's last score only: its records leave in the same producer
            # batches, so one acknowledgement times them all, at one callback per batch.
            e2e.observe(np.maximum(time.time() - end_ts, 0.0))

        last = n - 1
        for i, (record, sensor) in enumerate(zip(records, sensors, strict=True)):
            produce(topic_out, record, key=sensor, on_delivered=delivered if i == last else None)
        for ev in b.events:
            produce(self.topics.alerts, encode_alert(ev), key=ev.sensor)
            (self.metrics.alerts_opened if ev.state == "open" else self.metrics.alerts_closed).inc()
            log.info(
                "alert_opened" if ev.state == "open" else "alert_closed",
                alert=ev.id,
                sensor=ev.sensor,
                peak_score=ev.peak_score,
                top_channels=[c for c, _ in ev.top_channels],
            )
        self.stats.windows += n
        self.stats.alerts += len(b.events)
        self.metrics.windows_scored.inc(n)
        # Their thresholds and alert state moved: checkpoint them at the next round.
        for s in set(sensors):
            p = self.sensor_part.get(s)
            if p is not None and p in self.parts:
                self.parts[p].dirty.add(s)

    # -- commit rounds ---------------------------------------------------------------------

    def _commit_round(self, partitions: Iterable[int], reason: str) -> None:
        """Deliver everything, checkpoint changed sensors, commit, all before returning.

        For shutdown and revocation, which must be done when the call returns; the
        interval rounds are ``_start_round``'s, and let the loop run meanwhile.
        """
        assert self.sink is not None and self.source is not None
        started = time.perf_counter()
        written = self.stats.state_written
        self._drain()
        self.sink.flush(_FLUSH_TIMEOUT_S)
        drained = time.perf_counter()
        checkpoints = [c for c in (self._snapshot(p) for p in partitions) if c is not None]
        commits = {c.partition: self._checkpoint(c) for c in checkpoints}
        self.sink.flush(_FLUSH_TIMEOUT_S)
        stalled = time.perf_counter() - started
        self._commit(
            checkpoints,
            commits,
            reason,
            self.stats.state_written - written,
            started,
            stalled,
            drain_s=round(drained - started, 4),
        )

    def _start_round(self, partitions: Iterable[int], reason: str) -> None:
        """Start a commit round that completes while the loop goes on consuming.

        1. Now, at H: evict, and note every sensor's ring anchor.
        2. When the batches queued before H are published (``_publish_next``), and before
           any later one is: copy the changed sensors' thresholds and alert state, which
           are then exactly those at H.
        3. Serialise and produce those records, a slice per loop iteration, then mark
           the sink (``_advance_round``).
        4. Once every record produced up to the mark is acknowledged: commit. Records
           produced meanwhile are newer than H, and not covered by it.
        """
        started = time.perf_counter()
        checkpoints = [c for c in (self._snapshot(p) for p in partitions) if c is not None]
        if not checkpoints:
            return
        self.round = _Round(started, self.submitted, checkpoints, reason)
        self.round.stalled_s = time.perf_counter() - started
        if self.published == self.submitted:
            self._checkpoint_round()

    def _checkpoint_round(self) -> None:
        """Step 2 of a round, at the barrier: the changed sensors' state as of H.

        Copied into ``unsent`` for ``_advance_round`` to serialise and produce, or, for a
        round above _DEFER_STATES_MAX sensors, serialised and produced here.
        """
        r = self.round
        assert r is not None
        started = time.perf_counter()
        # A fleet's worth of records at once (100,000 sensors: hundreds of MB) is produced
        # at once instead, with the producer flushed every _STATE_FLUSH_EVERY records.
        defer = sum(len(c.evicted) + len(c.sensors) for c in r.checkpoints) <= _DEFER_STATES_MAX
        written = self.stats.state_written
        r.commits = {
            c.partition: self._checkpoint(c, r.unsent if defer else None) for c in r.checkpoints
        }
        r.states = self.stats.state_written - written + len(r.unsent)
        r.serialise_s = time.perf_counter() - started
        r.stalled_s += r.serialise_s

    def _advance_round(self) -> float | None:
        """Step 3 of a round: produce its state, commit once delivered.

        Returns the loop time the round took, once it is done.
        """
        r = self.round
        assert r is not None and self.sink is not None
        if r.commits is None:
            return None
        if r.token < 0:
            started = time.perf_counter()
            for _ in range(min(_STATE_SLICE, len(r.unsent))):
                state = r.unsent.popleft()
                self._produce_state(state[0], state[1], self._state_value(*state))
            if not r.unsent:
                r.token = self.sink.mark()
            r.stalled_s += time.perf_counter() - started
        if r.token < 0 or not self.sink.acknowledged(r.token):
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

    def _abandon_round(self) -> None:
        """Drop the round in flight (a blocking round or a rebalance supersedes it)."""
        r = self.round
        if r is None:
            return
        self.round = None
        # What it has not produced yet, the next round writes (as of its own H).
        for c in r.checkpoints:
            part = self.parts.get(c.partition)
            if part is not None:
                part.evicted |= c.evicted
        for sensor, p, *_ in r.unsent:
            part = self.parts.get(p)
            if part is not None:
                (part.dirty if sensor in part.sensors else part.evicted).add(sensor)
        log.debug(
            "commit_round_abandoned",
            reason=r.reason,
            checkpointed=r.commits is not None,
            unsent=len(r.unsent),
        )

    def _commit(
        self,
        checkpoints: list[_Checkpoint],
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
        across a network), in which nothing is consumed. ``_commit_answered``
        completes it.
        """
        assert self.source is not None
        before = time.perf_counter()
        heads = {c.partition: c.h for c in checkpoints}
        if not wait:
            # When not sent (a rebalance is under way), the next round or the revoke commits.
            if commits and self.source.commit_async(commits):
                now = time.perf_counter()
                taken = stalled + now - before
                self.commits_sent.append(
                    _CommitSent(heads, reason, states, started, taken, now, extra)
                )
            return stalled + time.perf_counter() - before
        if not commits or not self.source.commit(commits):
            # A rebalance is under way: the next round (or the revoke) commits.
            return stalled + time.perf_counter() - before
        now = time.perf_counter()
        stalled += now - before
        offsets = {p: off for p, (off, _) in commits.items()}
        self._committed(offsets, heads, reason, states, started, stalled, extra)
        return stalled

    def _commit_answered(self, answer: CommitResult) -> None:
        """The coordinator's answer to the oldest commit sent without waiting."""
        if not self.commits_sent:
            return
        sent = self.commits_sent.popleft()
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
        for p, h in heads.items():
            part = self.parts.get(p)
            if part is not None:
                # An answer can come after a later (revocation) commit or a reassignment
                # that already moved H on; never move it back.
                part.committed_h = max(part.committed_h, h)
        self.stats.commits += 1
        now = time.perf_counter()
        self.metrics.commit_done(now - started, stalled)
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

    def _snapshot(self, p: int) -> _Checkpoint | None:
        """Step 1 of a round for partition p: evict, and take the ring anchors at H."""
        part = self.parts.get(p)
        if part is None or part.consumed <= part.committed_h:
            return None  # nothing consumed since the last commit (or still replaying)
        h = part.consumed
        self._expire_anchors(part)
        names, oldest_pos, oldest_count = self._evict(part, h)
        evicted, part.evicted = part.evicted, set()
        return _Checkpoint(p, h, names, oldest_pos, oldest_count, evicted)

    def _checkpoint(self, c: _Checkpoint, defer: deque[_StateAtH] | None = None) -> tuple[int, str]:
        """Produce the state records of a snapshot; its commit (offset, metadata).

        Written: the sensors evicted at H, and those present at H whose thresholds or
        alerts changed. A sensor that appeared after H stays dirty for the next round.
        With ``defer``, the sensors' state at H is appended there, to be serialised and
        produced later: a threshold snapshot takes a quarter of the time of its record.
        """
        assert self.sink is not None
        p, h = c.partition, c.h
        part = self.parts[p]
        # Keep what was learned by evicted sensors; only the ring anchor is gone.
        records: list[tuple[str, dict[str, int] | None]] = [(s, None) for s in sorted(c.evicted)]
        c.evicted = set()
        at_h = c.index() if part.dirty else {}
        dirty = sorted(s for s in part.dirty if s in at_h and s in part.sensors)
        part.dirty.difference_update(dirty)
        for s in dirty:
            ring = None
            anchor = c.anchor(s)
            if anchor is not None:
                ring = {"anchor_offset": anchor[0], "anchor_count": anchor[1]}
                self.anchor_offset[s] = anchor[0]
            records.append((s, ring))
        engine = self.engine
        for n, (s, ring) in enumerate(records, 1):
            threshold = engine.thresholds.get(s)
            alerts = engine.alerts.export(s)
            if defer is not None:
                # The threshold as of H: a copy, serialised later.
                snapshot = None if threshold is None else threshold.clone()
                defer.append((s, p, h, ring, snapshot, alerts))
                continue
            self._produce_state(s, p, self._state_value(s, p, h, ring, threshold, alerts))
            if n % _STATE_FLUSH_EVERY == 0:
                # Bound what the producer holds: at 100,000 changed sensors one round is
                # hundreds of MB of records. Everything must be delivered before the
                # commit anyway, so waiting for this slice now costs only a round trip.
                self.sink.flush(_FLUSH_TIMEOUT_S)
        # The oldest anchor written for a sensor of the partition, else H + 1.
        nothing = itertools.repeat(h + 1)
        offset = min(map(self.anchor_offset.get, part.sensors, nothing), default=h + 1)
        return offset, orjson.dumps({"v": COMMIT_META_VERSION, "h": h}).decode()

    def _state_value(
        self,
        sensor: str,
        p: int,
        h: int,
        ring: dict[str, int] | None,
        threshold: Threshold | None,
        alerts: dict[str, Any],
    ) -> bytes | None:
        """A sensor's state record for H = h, from its threshold (snapshot) and alerts.

        None (a tombstone) for an evicted sensor that was never scored: nothing to keep.
        """
        if threshold is None and ring is None:
            return None
        th = None if threshold is None else self.engine.thresholds.export(sensor, of=threshold)
        return orjson.dumps(
            {
                "version": STATE_VERSION,
                "sensor": sensor,
                "partition": p,
                "upto": h,
                "threshold": th,
                "alerts": alerts,
                "ring": ring,
            },
            option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
        )

    def _produce_state(self, sensor: str, p: int, value: bytes | None) -> None:
        assert self.sink is not None
        self.sink.produce(self.topics.state, value, key=sensor, partition=p)
        self.stats.state_written += 1

    def _expire_anchors(self, part: _Partition) -> None:
        """Anchors the replay went past without meeting (record older than the log) are void."""
        engine = self.engine
        for slot, (pos, _count) in engine.windows.anchors.items():
            if pos >> OFFSET_BITS != part.partition or (pos & _OFFSET_MASK) > part.consumed:
                continue
            engine.windows.clear_anchors([slot])
            key = engine.index.key(slot)
            if engine.windows.count(slot) == 0:
                self._forget_ring(str(key), part)
            log.warning(
                "state_anchor_missed",
                sensor=key,
                partition=part.partition,
                anchor_offset=pos & _OFFSET_MASK,
            )

    def _evict(
        self, part: _Partition, h: int
    ) -> tuple[list[str], NDArray[np.int64], NDArray[np.int64]]:
        """Evict silent sensors and those that would make the replay too long.

        Returns the sensors kept, with the position and count of the oldest sample a
        future window of theirs needs (``RingWindows.oldest``). Vectorised: at 100,000
        sensors it runs at every commit round.
        """
        engine = self.engine
        names = list(part.sensors)
        anchor_of = self.anchor_offset.get
        slots = engine.index.slots(names)
        last_ts = engine.windows.last_ts_of(slots)
        oldest_pos, oldest_count = engine.windows.oldest(slots)
        written = np.fromiter(
            map(anchor_of, names, itertools.repeat(-1)), dtype=np.int64, count=len(names)
        )
        held = np.where(oldest_pos >= 0, oldest_pos & _OFFSET_MASK, h)
        anchor = np.where(written >= 0, written, held)
        has_samples = np.isfinite(last_ts)
        # The partition's clock: the (upper) median of the latest timestamps of its sensors
        # that filled a window (of all, while none has), so neither one sensor with a clock
        # far ahead nor a handful of new ids can make the others look silent.
        filled = has_samples & (engine.windows.counts_of(slots) >= engine.windows.window)
        latest = np.sort(last_ts[filled if filled.any() else has_samples])
        now_ts = float(latest[latest.size // 2]) if latest.size else float("-inf")
        silent = has_samples & (now_ts - last_ts > self.cfg.stream.max_gap_s)
        # Wall-clock idleness: ids that sent a message or two and never again do not pin
        # the commit, whatever their timestamps say.
        mono = time.monotonic()
        seen = np.fromiter(
            map(self.last_seen.get, names, itertools.repeat(mono)),
            dtype=np.float64,
            count=len(names),
        )
        idle = ~silent & (mono - seen > self.cfg.stream.max_idle_s)
        silent |= idle
        limit = self.cfg.stream.max_replay_messages
        behind = (h - anchor) > limit
        replay_bound = behind & ~silent
        out = silent | behind
        evict = sorted(np.flatnonzero(out).tolist(), key=names.__getitem__)
        for n, i in enumerate(evict):
            s = names[i]
            reason = "idle" if idle[i] else "silent" if silent[i] else "replay_bound"
            if n < _EVICTIONS_LOGGED:
                log.warning(
                    "sensor_evicted",
                    sensor=s,
                    partition=part.partition,
                    reason=reason,
                    samples_dropped=engine.windows.unscored(int(slots[i])),
                    silent_s=round(float(now_ts - last_ts[i]), 3),
                    idle_s=round(float(mono - seen[i]), 3),
                    messages_behind=int(h - anchor[i]),
                )
            self._evicted(s, part, reason)
        if len(evict) > _EVICTIONS_LOGGED:
            log.warning(
                "sensors_evicted",
                partition=part.partition,
                silent=int((silent & ~idle).sum()),
                idle=int(idle.sum()),
                replay_bound=int(replay_bound.sum()),
                logged=_EVICTIONS_LOGGED,
            )
        if replay_bound.sum() > len(names) // 2:
            # Most of the partition's sensors: the bound is too small for the fleet, since
            # a window spans `window` samples of every sensor in the partition.
            log.error(
                "replay_bound_too_small",
                partition=part.partition,
                max_replay_messages=limit,
                sensors=len(names),
                needed_at_least=self.cfg.stream.window * len(names),
                hint="raise stream.max_replay_messages above window x sensors per partition",
            )
        if not evict:
            return names, oldest_pos, oldest_count
        kept = np.flatnonzero(~out)
        return [names[i] for i in kept.tolist()], oldest_pos[kept], oldest_count[kept]

    def _forget_ring(self, sensor: str, part: _Partition) -> None:
        engine = self.engine
        if sensor in engine.index:
            slot = engine.index.slot(sensor)
            engine.windows.reset([slot])
            engine.index.release([sensor])
        part.sensors.discard(sensor)
        part.dirty.discard(sensor)
        self.sensor_part.pop(sensor, None)
        self.anchor_offset.pop(sensor, None)
        self.last_seen.pop(sensor, None)

    # -- rebalances ------------------------------------------------------------------------

    def _restore_progress(
        self, partitions: list[int], started: float
    ) -> Callable[[int, list[int]], None]:
        """What a state restore does while it reads: heartbeat, /readyz, a line every 5 s.

        A restore runs inside the loop's consume call. While it advances the loop counts as
        alive (a long uncompacted state tail must not trip the watchdog and kill a daemon
        that would finish), and /readyz says what it is doing.
        """
        logged = [started]

        def progress(records: int, unfinished: list[int]) -> None:
            now = time.monotonic()
            self.health.beat()
            self.health.restoring = (
                f"{self.topics.state} {partitions}: {records:,} records read in "
                f"{now - started:.0f} s"
            )
            if unfinished and now - logged[0] >= _RESTORE_LOG_S:
                logged[0] = now
                log.info(
                    "state_restore_progress",
                    partitions=partitions,
                    unfinished=unfinished,
                    records=records,
                    seconds=round(now - started, 1),
                )

        return progress

    def _on_assign(self, partitions: list[int]) -> None:
        if not partitions:
            return
        if self._stop_requested or self._failed:
            # Leaving the group (SIGTERM, or after a failure) can still bring an incremental
            # assignment, revoked again a moment later. Restoring it would ask the busy
            # coordinator for commits (a 30 s timeout seen while the group rebalanced);
            # left unrestored, its revocation commits nothing, and the next owner replays.
            log.info("partitions_assigned_while_leaving", partitions=partitions)
            return
        assert self.source is not None
        committed = self.source.committed(partitions)
        started = time.monotonic()
        stall_s = self.cfg.kafka.restore_timeout_s
        try:
            state, unfinished = read_latest(
                self.cfg.kafka,
                self.topics.state,
                partitions,
                stall_s,
                on_progress=self._restore_progress(partitions, started),
            )
        finally:
            self.health.restoring = None
        if unfinished:
            raise KafkaError(
                f"restoring {self.topics.state} partitions {unfinished} made no progress for "
                f"{stall_s}s (kafka.restore_timeout_s)"
            )
        # A restore makes only long-lived objects (each sensor's state): the collections
        # their allocations would trigger free nothing, and at 100,000 sensors cost seconds.
        # The settle below walks them once instead.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for p in partitions:
                c = committed.get(p)
                start = c.offset if c is not None and c.offset >= 0 else 0
                h = self._commit_head(c.metadata if c is not None else None, c.offset if c else -1)
                part = _Partition(partition=p, committed_h=h, restored_h=h, replay_until=h)
                self.parts[p] = part
                self._restore(part, start, state[p], started)
        finally:
            if collecting:
                gc.enable()
        if self.client_paused:
            self.source.pause(partitions)
        self.health.partitions = tuple(sorted(self.parts))
        log.info("partitions_assigned", partitions=partitions, owned=sorted(self.parts))
        settle_heap("assigned")

    @staticmethod
    def _commit_head(metadata: str | None, offset: int) -> int:
        """H of a commit: from our metadata, else (another tool committed) offset - 1."""
        if metadata:
            try:
                meta = orjson.loads(metadata)
                if meta.get("v") == COMMIT_META_VERSION and isinstance(meta.get("h"), int):
                    return int(meta["h"])
            except (orjson.JSONDecodeError, AttributeError):
                pass
            log.warning("commit_metadata_unknown", metadata=metadata[:200])
        return offset - 1 if offset >= 0 else -1

    def _restore(self, part: _Partition, start: int, latest: LatestRecords, started: float) -> None:
        """Restore every sensor of partition p from its latest state record."""
        p = part.partition
        restored = corrupt = anchors = 0
        values = latest.values
        for key in list(values):
            # Taken out as it is applied: each record's bytes are freed once restored.
            value = values.pop(key)
            if value is None:
                continue
            try:
                rec = self._parse_state(key, value, p)
                self._apply_state(part, rec, start)
            except StateError as exc:
                corrupt += 1
                self.stats.state_corrupt += 1
                log.warning(
                    "state_corrupt",
                    partition=p,
                    sensor=key.decode(errors="replace")[:256],
                    error=str(exc),
                )
                continue
            restored += 1
            anchors += rec["sensor"] in self.anchor_offset
        log.info(
            "state_restored",
            partition=p,
            sensors=restored,
            corrupt=corrupt,
            stale_thresholds=part.stale,
            anchors=anchors,
            records=latest.records,
            start_offset=start,
            committed_h=part.restored_h,
            replay_until=part.replay_until,
            seconds=round(time.monotonic() - started, 3),
        )

    @staticmethod
    def _parse_state(key: bytes, value: bytes, p: int) -> dict[str, Any]:
        try:
            rec = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise StateError(f"not JSON: {exc}") from exc
        if not isinstance(rec, dict) or rec.get("version") != STATE_VERSION:
            version = rec.get("version") if isinstance(rec, dict) else None
            raise StateError(f"unknown state record version {version!r}")
        sensor = rec.get("sensor")
        if not isinstance(sensor, str) or sensor.encode() != key:
            raise StateError(f"record sensor {sensor!r} does not match its key")
        if rec.get("partition") != p:
            raise StateError(f"record is for partition {rec.get('partition')!r}, found in {p}")
        upto = rec.get("upto")
        if not isinstance(upto, int) or isinstance(upto, bool):
            raise StateError(f"upto must be an integer, got {upto!r}")
        ring = rec.get("ring")
        if ring is not None:
            ok = isinstance(ring, dict) and all(
                isinstance(ring.get(k), int) and not isinstance(ring.get(k), bool)
                for k in ("anchor_offset", "anchor_count")
            )
            if not ok or ring["anchor_count"] < 1 or ring["anchor_offset"] < 0:
                raise StateError(f"bad ring anchor {ring!r}")
        for k in ("threshold", "alerts"):
            if rec.get(k) is not None and not isinstance(rec[k], dict):
                raise StateError(f"{k} must be an object or null")
        return rec

    def _apply_state(self, part: _Partition, rec: dict[str, Any], start: int) -> None:
        engine = self.engine
        sensor: str = rec["sensor"]
        part.known.add(sensor)
        if rec["threshold"] is not None:
            try:
                engine.thresholds.restore(sensor, rec["threshold"])
            except StaleStateError:
                # Written under another model: the threshold starts from the current
                # model's calibration; alerts and the ring anchor still apply.
                part.stale += 1
        if rec["alerts"] is not None:
            try:
                engine.alerts.restore(sensor, rec["alerts"])
            except StateError:
                # All or nothing: a sensor with half its state would be worse than re-warming.
                engine.thresholds.drop([sensor])
                raise
        upto = int(rec["upto"])
        if upto > part.restored_h:
            part.skip[sensor] = upto
            part.replay_until = max(part.replay_until, upto)
        ring = rec["ring"]
        if ring is not None and ring["anchor_offset"] >= start:
            slot = engine.index.slot(sensor)
            position = to_position(part.partition, int(ring["anchor_offset"]))
            engine.windows.set_anchor(slot, position, ring["anchor_count"])
            self.anchor_offset[sensor] = ring["anchor_offset"]
            self.sensor_part[sensor] = part.partition
            self.last_seen[sensor] = time.monotonic()
            part.sensors.add(sensor)
        elif sensor in engine.thresholds:
            # Evicted before the record was written: its state is kept as any eviction's.
            self.evicted_at[sensor] = (time.monotonic(), part.partition)

    def _on_revoke(self, partitions: list[int]) -> None:
        mine = [p for p in partitions if p in self.parts]
        if not mine:
            return
        self._abandon_round()
        if self._failed:
            # Closing after a failure: the consumed offsets may not all be processed, and
            # the commit would skip what was not. Release without committing.
            heads = {p: self.parts[p].committed_h for p in mine}
            self._drop(mine)
            log.warning("partitions_released_uncommitted", partitions=mine, committed_h=heads)
            return
        self._commit_round(mine, reason="revoke")
        self._drop(mine)
        log.info("partitions_revoked", partitions=mine, owned=sorted(self.parts))

    def _on_lost(self, partitions: list[int]) -> None:
        mine = [p for p in partitions if p in self.parts]
        if not mine:
            return
        # Another member owns them now: publish what is scored (byte-identical to what
        # the new owner may publish) but commit nothing.
        self._abandon_round()
        if not self._failed:
            self._drain()
        self._drop(mine)
        log.warning("partitions_lost", partitions=mine, owned=sorted(self.parts))

    def _drop(self, partitions: list[int]) -> None:
        engine = self.engine
        for p in partitions:
            part = self.parts.pop(p)
            sensors = sorted(part.known)
            for s in sensors:
                self._forget_ring(s, part)
            engine.thresholds.drop(sensors)
            engine.alerts.drop(sensors)
            for s in sensors:
                self.evicted_at.pop(s, None)
        self.health.partitions = tuple(sorted(self.parts))


def run_daemon(cfg: Config) -> int:
    """``streamer run``: 0 after a clean shutdown, 1 on a runtime failure (logged).

    ConfigError propagates (the CLI turns it into exit code 2).
    """
    configure_logging()
    try:
        daemon = Daemon(cfg)
        return daemon.run()
    except ConfigError:
        raise
    except StreamerError as exc:
        log.error("daemon_failed", error=str(exc), error_type=type(exc).__name__)
        return 1
