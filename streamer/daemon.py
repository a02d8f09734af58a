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
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import numpy as np
import structlog
from confluent_kafka import KafkaException
from numpy.typing import NDArray

from streamer.codec import OFFSET_BITS, Decoder
from streamer.config import Config
from streamer.deadletter import DEAD_LETTER_OVERHEAD
from streamer.engine import Engine
from streamer.errors import ConfigError, InferenceError, KafkaError, StreamerError
from streamer.kafka.access import check_access
from streamer.kafka.admin import (
    alter_topic_command,
    ensure_topics,
    message_limits,
    state_topic_findings,
)
from streamer.kafka.reachability import Reachability
from streamer.kafka.sink import Sink
from streamer.kafka.source import CLUSTER_REFUSED, GROUP_REFUSED, TOPIC_REFUSED, Source
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.model.checkpoint import load_checkpoint
from streamer.model.train import resolve_device
from streamer.notify import Notifier, Watchdog, watchdog_interval_s
from streamer.reload import CheckpointWatcher, ModelReloader, ReloadOutcome
from streamer.runtime.backpressure import Backpressure
from streamer.runtime.checkpoint import Checkpointer
from streamer.runtime.counters import Counters
from streamer.runtime.ingest import Ingest
from streamer.runtime.partitions import PartitionTable
from streamer.runtime.publisher import Publisher
from streamer.runtime.recovery import Recovery
from streamer.runtime.rounds import FLUSH_TIMEOUT_S, CommitRounds
from streamer.runtime.state import STATE_VERSION

__all__ = [
    "STATE_VERSION",
    "Daemon",
    "SensorGrowth",
    "configure_logging",
    "run_daemon",
    "settle_heap",
]

log = structlog.get_logger("streamer.daemon")

_OFFSET_MASK = (1 << OFFSET_BITS) - 1
# A refusal by the broker (authorization) is logged again this often while it lasts.
_ACCESS_REPEAT_S = 30.0
_PRODUCER_MAX = 1_000_000  # librdkafka's message.max.bytes
# Gauges (lag, queue depth, ...) are refreshed this often; Prometheus scrapes every 15 s
# or so, and the refresh reads the consumer, so it is kept off the per-batch path.
_GAUGE_REFRESH_S = 1.0
# With scores in flight and no new message, wait this long for the oldest batch's scores
# before polling Kafka again (short: messages arriving meanwhile wait in librdkafka).
_RESULT_WAIT_S = 0.002
# The next commit round starts at least this many times the last round's duration later.
_COMMIT_SPACING = 9.0
# An interval round over at most this many sensors (its partitions' sensors and
# evictions, an upper bound on the records) copies their state at H and serialises and
# produces a slice of it per loop iteration; a larger one produces them all at H.
_DEFER_STATES_MAX = 20_000


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


class Daemon:
    """One streamer instance: the wiring of consume, score, publish, checkpoint, commit.

    The pieces are ``streamer.runtime``'s: the partition table, ingest, the publisher,
    the commit rounds and their state writer, recovery and backpressure. The daemon
    builds them, runs the loop that drives them, and answers signals, rebalances and
    reloads.
    """

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
        self.stats = Counters()
        self.table = PartitionTable(
            self.engine,
            cfg.stream,
            self.metrics,
            self.stats,
            limit_log_every_s=cfg.metrics.stats_interval_s,
        )
        self.recovery = Recovery(cfg.kafka, self.topics.state, self.table, self.health, self.stats)
        self.backpressure = Backpressure(
            self.engine.worker,
            cfg.kafka.pause_after_s,
            lambda: list(self.table.parts),
            self._paused,
        )
        self.growth = SensorGrowth()
        self._access_logged = 0.0
        self._stop_requested = False
        # Set once the loop raised: from then on nothing is committed (see run).
        self._failed = False
        self._stop_signal = ""
        self._signals = 0
        # Built in run(), once the producer and consumer exist.
        self.sink: Sink | None = None
        self.source: Source | None = None
        self.publisher: Publisher | None = None
        self.rounds: CommitRounds | None = None
        self.checkpointer: Checkpointer | None = None
        self.ingest: Ingest | None = None
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
            max_batch, dlq_value_bytes = self._output_limits()
            self.sink = Sink(cfg.kafka, max_batch_bytes=max_batch, reachability=self.reachability)
            self._wire(self.sink, dlq_value_bytes)
            self.source = Source(
                cfg.kafka,
                self.topics.input,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
                reachability=self.reachability,
            )
            self.rounds = CommitRounds(
                self.sink,
                self.source,
                self._writer(),
                defer_max=_DEFER_STATES_MAX,
                on_done=self.metrics.commit_done,
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

    def _wire(self, sink: Sink, dlq_value_bytes: int) -> None:
        """Build the pieces that produce: the publisher, the state writer, ingest."""
        self.publisher = Publisher(
            sink,
            self.topics,
            self.channels,
            self.metrics,
            self.stats,
            complete=self.engine.complete,
            on_published=self._batch_published,
            on_scored=self.table.changed,
            dead_letter_value_bytes=dlq_value_bytes,
        )
        self.checkpointer = Checkpointer(
            self.table, self.engine, sink, self.topics.state, self.stats
        )
        self.ingest = Ingest(
            self.cfg,
            self.decoder,
            self.table,
            self.engine,
            self.publisher,
            self.metrics,
            self.stats,
        )

    def _writer(self) -> Checkpointer:
        assert self.checkpointer is not None
        return self.checkpointer

    def _batch_published(self) -> None:
        if self.rounds is not None:
            self.rounds.batch_published()

    def _paused(self) -> None:
        self.stats.pauses += 1

    def _loop(self) -> int:
        assert self.sink is not None and self.source is not None
        assert self.publisher is not None and self.rounds is not None and self.ingest is not None
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
        publisher, rounds, backpressure = self.publisher, self.rounds, self.backpressure
        ready = False
        while not self._stop_requested:
            self.health.beat()
            worker.raise_if_failed()
            backpressure.update(self.source)
            # Held (paused, not in the client): no consume; the worker is waited on below
            # and the messages wait in librdkafka.
            batch = None
            if backpressure.consuming:
                # Consume even while paused in the client: it serves rebalances. With scores
                # in flight, do not wait in consume: wait on the worker below.
                busy = backpressure.paused or bool(publisher.pending)
                batch = self.source.consume(batch_n, 0.0 if busy else poll_s)
                for answer in self.source.commit_results():
                    rounds.answered(answer)
            if not ready:
                ready = True
                self.notifier.ready(f"consuming {self.topics.input}")
                log.info("daemon_ready", input=self.topics.input)
            if batch:
                self.ingest.process(batch)
            if backpressure.paused:
                publisher.publish_done(block_s=0.05)
            else:
                publisher.publish_done(block_s=0.0 if batch else _RESULT_WAIT_S)
            self.sink.poll(0)
            if self._reload_requested:
                self._reload_requested = False
                self._request_reload("signal")
            outcome = self.reloader.take()
            if outcome is not None:
                self._apply_reload(outcome)
            now = time.monotonic()
            if rounds.round is None and now >= next_commit:
                assert self.checkpointer is not None
                self.checkpointer.tombstones(self.table.expire_evicted())
                waiting = len(publisher.pending)
                rounds.start(list(self.table.parts), reason="interval", waiting=waiting)
            if rounds.round is not None:
                stalled = rounds.advance()
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
        log.info(
            "shutdown_started", signal=self._stop_signal, pending_batches=len(publisher.pending)
        )
        self.notifier.stopping("draining, flushing and committing")
        rounds.abandon()
        rounds.run(list(self.table.parts), reason="shutdown", drain=publisher.drain)
        # Leaving the group revokes everything: the callback finds nothing left to commit.
        self.source.close()
        self.source = None
        self.sink.flush(FLUSH_TIMEOUT_S)
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

    def _output_limits(self) -> tuple[int, int]:
        """The smallest limit of the output topics, and the bytes a dead letter keeps.

        A dead letter keeps the original bytes, cut to what both the DLQ topic's
        ``max.message.bytes`` and the producer's ``message.max.bytes`` accept.
        """
        t = self.topics
        limits = message_limits(self.cfg.kafka, [t.scores, t.alerts, t.dlq, t.state])
        producer_max = int(self.cfg.kafka.librdkafka().get("message.max.bytes", _PRODUCER_MAX))
        dlq = min(limits[t.dlq], producer_max)
        dlq_value_bytes = max(0, dlq - DEAD_LETTER_OVERHEAD - dlq // 200)
        log.info("output_limits", topics=limits, dead_letter_value_bytes=dlq_value_bytes)
        return min(*limits.values(), producer_max), dlq_value_bytes

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
        for p, part in self.table.parts.items():
            _, hi = self.source.watermarks(p)
            if hi >= 0:
                # Before the first message, the position is after the last commit's H.
                out[p] = max(0, hi - (max(part.consumed, part.committed_h) + 1))
        return out

    def _refresh_gauges(self) -> None:
        m = self.metrics
        parts = self.table.parts
        m.set_lag(self._lag())
        m.queue_depth.set(self.engine.worker.queue_depth)
        m.queued_windows.set(self.engine.worker.queued_windows)
        m.partitions_assigned.set(len(parts))
        m.partitions_paused.set(len(parts) if self.backpressure.paused else 0)
        m.alerts_open.set(self.engine.alerts.open_count())
        m.sensors.set(len(self.table.sensor_part))
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

    def _log_stats(self, last: tuple[float, int, int]) -> tuple[float, int, int]:
        now = time.monotonic()
        st = self.stats
        dt_s = max(now - last[0], 1e-9)
        lag = sum(self._lag().values())
        messages_per_s = round((st.messages - last[1]) / dt_s, 1)
        windows_per_s = round((st.windows - last[2]) / dt_s, 1)
        parts = sorted(self.table.parts)
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
            **self.backpressure.fields(),
            paused=self.backpressure.paused,
            partitions=parts,
            sensors=len(self.table.sensor_part),
            commits=self.rounds.commits if self.rounds is not None else 0,
            model=self.engine.model.version,
        )
        self.notifier.status(
            f"{messages_per_s} msg/s, {windows_per_s} windows/s, lag {lag}, "
            f"partitions {parts}, model {self.engine.model.version}"
        )
        return now, st.messages, st.windows

    # -- rebalances ------------------------------------------------------------------------

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
        self.recovery.assign(partitions, self.source.committed(partitions))
        if self.backpressure.client_paused:
            self.source.pause(partitions)
        owned = sorted(self.table.parts)
        self.health.partitions = tuple(owned)
        log.info("partitions_assigned", partitions=partitions, owned=owned)
        settle_heap("assigned")

    def _on_revoke(self, partitions: list[int]) -> None:
        mine = [p for p in partitions if p in self.table.parts]
        if not mine:
            return
        if self.rounds is not None:
            self.rounds.abandon()
        if self._failed or self.rounds is None or self.publisher is None:
            # Closing after a failure: the consumed offsets may not all be processed, and
            # the commit would skip what was not. Release without committing.
            heads = {p: self.table.parts[p].committed_h for p in mine}
            self._drop(mine)
            log.warning("partitions_released_uncommitted", partitions=mine, committed_h=heads)
            return
        self.rounds.run(mine, reason="revoke", drain=self.publisher.drain)
        self._drop(mine)
        log.info("partitions_revoked", partitions=mine, owned=sorted(self.table.parts))

    def _on_lost(self, partitions: list[int]) -> None:
        mine = [p for p in partitions if p in self.table.parts]
        if not mine:
            return
        # Another member owns them now: publish what is scored (byte-identical to what
        # the new owner may publish) but commit nothing.
        if self.rounds is not None:
            self.rounds.abandon()
        if not self._failed and self.publisher is not None:
            self.publisher.drain()
        self._drop(mine)
        log.warning("partitions_lost", partitions=mine, owned=sorted(self.table.parts))

    def _drop(self, partitions: list[int]) -> None:
        self.table.drop(partitions)
        self.health.partitions = tuple(sorted(self.table.parts))


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
