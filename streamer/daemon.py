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
partition is paused, its state read on a thread of its own and installed a slice per
loop iteration (the partitions already held go on meanwhile), then it is resumed from
C_p. The thresholds and alerts are restored, the anchors are set on the ring buffers
(a parked sensor's ring is restored whole), and a window is emitted only if its last
offset is above ``max(h, upto)`` of its sensor. The replay from C_p rebuilds the rings
(the anchors keep the stride phase of the original run), so a clean restart emits
every window exactly once and a crash re-emits only byte-identical records.

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

Where each piece lives (``streamer.runtime``): ``ingest`` (consumed batch -> rings and
dead letters), ``publisher`` (scored batches -> records, in order), ``rounds`` (the
commit round), ``checkpoint`` and ``state`` (the state records), ``partitions`` and
``eviction`` (who is held where, and who goes), ``recovery`` (restore on
assignment), ``backpressure``, ``startup`` (cluster checks), ``ops`` (metrics server,
watchdog, access refusals, reloads, gauges). This module builds them and runs the loop.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import structlog

from streamer.codec import Decoder, position_labels
from streamer.config import Config
from streamer.engine import Engine
from streamer.errors import ConfigError, InputError, StreamerError
from streamer.kafka.admin import ensure_topics
from streamer.kafka.reachability import Reachability
from streamer.kafka.sink import Sink
from streamer.kafka.source import Source
from streamer.metrics import Health, Metrics
from streamer.model.artifact import LoadedModel
from streamer.notify import Notifier
from streamer.runtime.backpressure import Backpressure
from streamer.runtime.checkpoint import Checkpointer
from streamer.runtime.counters import Counters
from streamer.runtime.heap import settle_heap, trim_heap
from streamer.runtime.ingest import Ingest
from streamer.runtime.logs import configure_logging
from streamer.runtime.modelload import ModelLoad
from streamer.runtime.ops import AccessWatch, Gauges, Reloads, Services
from streamer.runtime.partitions import PartitionTable
from streamer.runtime.phases import StartupPhases
from streamer.runtime.publisher import Publisher
from streamer.runtime.recovery import Recovery
from streamer.runtime.rounds import BUSY_WAIT_S, FLUSH_TIMEOUT_S, CommitRounds
from streamer.runtime.snapshot import snapshot_dir
from streamer.runtime.startup import check_state_topic, output_limits, require_grants

__all__ = ["Daemon", "run_daemon"]

log = structlog.get_logger("streamer.daemon")

# Gauges (lag, queue depth, ...) are refreshed this often; Prometheus scrapes every 15 s
# or so, and the refresh reads the consumer, so it is kept off the per-batch path.
_GAUGE_REFRESH_S = 1.0
# With scores in flight and no new message, wait this long for the oldest batch's scores
# before polling Kafka again (short: messages arriving meanwhile wait in librdkafka).
_RESULT_WAIT_S = 0.002
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
# The inference thread needs the GIL briefly after each chunk's forward pass (to hand its
# scores back) while the consumer thread decodes and publishes in Python; waiting out
# 5 ms each time halved the worker's pace in a burst (aligned p99 69 -> 60 ms at 0.5 ms).
_GIL_SWITCH_S = 0.0005
# Owed threshold refits (``ThresholdBank.settle``) done per loop pass while no scores
# are in flight: a message arriving meanwhile waits at most about this long (plus one
# refit, 0.05-0.5 ms) in librdkafka.
_SETTLE_S = 0.001
# The next commit round starts at least this many times the last round's duration later.
_COMMIT_SPACING = 9.0
# An interval round over at most this many sensors (its partitions' sensors and
# evictions, an upper bound on the records) copies their state at H and serialises and
# produces a slice of it per loop iteration; a larger one produces them all at H.
_DEFER_STATES_MAX = 20_000


def _build_engine(cfg: Config, model: LoadedModel, device: str, metrics: Metrics) -> Engine:
    """The engine on ``model``, with the stream's, thresholds', alerts' and inference settings."""
    return Engine(
        model,
        max_gap_s=cfg.stream.max_gap_s,
        threshold=cfg.threshold,
        alerts=cfg.alerts,
        inference=cfg.inference,
        device=device,
        stride=cfg.stream.stride,
        position_label=position_labels,
        on_batch=metrics.inference_batch_done,
        novelty=cfg.novelty,
    )


def _start_kafka(
    cfg: Config, model_load: ModelLoad, subscribe: Callable[[], None]
) -> tuple[int, int]:
    """Topics, subscription and cluster checks; the output limits (``output_limits``)."""
    ensure_topics(cfg.kafka, cfg.topics, timeout_s=cfg.kafka.connect_timeout_s)
    model_load.raise_if_failed()
    # The group join runs in the client's threads while the rest is checked and the model
    # loads; its assignment is served by the loop's first consume.
    subscribe()
    check_state_topic(cfg.kafka, cfg.topics.state)
    require_grants(cfg.kafka, cfg.topics)
    return output_limits(cfg.kafka, cfg.topics)


def _log_configured(cfg: Config, model: LoadedModel, device: str, load_s: float) -> None:
    """The ``daemon_configured`` line: the model, the stream and the Kafka settings in use."""
    log.info(
        "daemon_configured",
        model=model.version,
        backend=model.backend,
        device=device,
        window=model.window,
        stride=cfg.stream.stride,
        channels=list(cfg.stream.channels),
        input=cfg.topics.input,
        group=cfg.kafka.group_id,
        bootstrap=cfg.kafka.bootstrap_servers,
        kafka_client=cfg.redacted()["kafka"]["client"],  # secrets masked
        load_s=round(load_s, 3),
    )


class Daemon:
    """One streamer instance: the wiring of consume, score, publish, checkpoint, commit.

    The pieces are ``streamer.runtime``'s, each handed its collaborators: the partition
    table, ingest, the publisher, the commit rounds and their state writer, recovery,
    backpressure and the operator-facing services. The daemon builds them, runs the
    loop that drives them, and answers signals and rebalances.
    """

    # Built by build(), once the model is loaded (run() overlaps the load with the
    # cluster checks and the group join).
    engine: Engine
    table: PartitionTable
    recovery: Recovery
    backpressure: Backpressure
    reloads: Reloads
    gauges: Gauges

    def __init__(self, cfg: Config) -> None:
        """Starts loading the model on a thread; contacts no broker (``run`` does)."""
        self.cfg = cfg
        self.topics = cfg.topics
        self.metrics = Metrics()
        self.phases = StartupPhases(self.metrics)
        self.phases.mark("imported")
        log.info("daemon_starting", input=cfg.topics.input, group=cfg.kafka.group_id)
        self.model_load = ModelLoad(cfg, lambda: self.phases.mark("model_loaded"))
        # The model's channels: fit_to_stream refuses a model whose channels differ.
        self.channels = list(cfg.stream.channels)
        self.decoder = Decoder(cfg.stream)
        self.health = Health(cfg.metrics.stall_after_s)
        self.metrics.track_health(self.health)
        # /readyz turns 503 after this long with no broker reachable (metrics.unready_after_s).
        self.health.unready_after_s = cfg.metrics.unready_after_s
        # Shared by consumer and producer: one kafka_unreachable line per outage, and Health.
        self.reachability = Reachability(on_change=self.health.set_broker_down_since)
        self.notifier = Notifier()
        self.stats = Counters()
        self.snapshot_dir = snapshot_dir(cfg.kafka.state_snapshot_dir, os.environ)
        self.services = Services(self.metrics, self.health, self.notifier)
        self.access = AccessWatch(self.health, cfg.kafka.group_id, self.topics.input)
        self._built = False
        self._reload_requested = False
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
        self.ingest: Ingest | None = None
        self.writer: Checkpointer | None = None

    def build(self) -> None:
        """Wait for the model; build the engine and what holds per-sensor state (once).

        ``run`` calls it once the cluster is checked and the consumer subscribed.
        """
        if self._built:
            return
        cfg = self.cfg
        loaded = self.model_load.wait()
        model, device = loaded.model, loaded.device
        self.engine = _build_engine(cfg, model, device, self.metrics)
        self.metrics.model_in_use(model.version, loaded.seconds)
        self.health.model_version = model.version
        self.table = PartitionTable(
            self.engine.sensors,
            cfg.stream,
            self.metrics,
            self.stats,
            limit_log_every_s=cfg.metrics.stats_interval_s,
        )
        self.recovery = Recovery(
            cfg.kafka,
            self.topics.state,
            self.table,
            self.health,
            self.stats,
            self.metrics,
            self.snapshot_dir,
        )
        self.backpressure = Backpressure(
            self.engine.worker,
            cfg.kafka.pause_after_s,
            # Restoring partitions stay paused whatever the queue does (Recovery resumes them).
            self.table.serving,
            self.stats.count_pause,
        )
        self.reloads = Reloads(cfg, self.engine, device, self.notifier, self.metrics, self.health)
        self.gauges = Gauges(
            self.metrics,
            self.notifier,
            self.engine,
            self.table,
            self.backpressure,
            self.stats,
            lambda: self.rounds.commits if self.rounds is not None else 0,
        )
        self._built = True
        _log_configured(cfg, model, device, loaded.seconds)

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

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; 0 after a clean shutdown. Raises StreamerError on failure."""
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.services.start(cfg.metrics)
            try:
                limits = _start_kafka(cfg, self.model_load, self._subscribe)
                self.phases.mark("checked")
            except BaseException as exc:
                self._failed = True  # nothing was processed: nothing may be committed
                # A broken model is the error to report, not what Kafka said meanwhile.
                model_failure = self.model_load.failure(wait_s=30.0)
                if model_failure is not None and model_failure is not exc:
                    raise model_failure from None
                raise
            self.build()
            self._connect(*limits)
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
            if self._built:
                self.recovery.close()
                self.engine.close()
            self.services.stop()
            if self.sink is not None:
                self.sink.close()
            if self.source is not None:
                with contextlib.suppress(StreamerError):
                    self.source.close()

    def _subscribe(self) -> None:
        """The consumer, subscribed: it joins the group from here on."""
        self.source = Source(
            self.cfg.kafka,
            self.topics.input,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
            reachability=self.reachability,
        )
        self.phases.mark("subscribed")

    def _connect(self, max_batch: int, dlq_value_bytes: int) -> None:
        """The producer, and the pieces that use it and the consumer."""
        cfg = self.cfg
        assert self.source is not None
        sink = self.sink = Sink(
            cfg.kafka, max_batch_bytes=max_batch, reachability=self.reachability
        )
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
        self.ingest = Ingest(
            cfg, self.decoder, self.table, self.engine, self.publisher, self.metrics, self.stats
        )
        writer = self.writer = Checkpointer(
            self.table, self.engine.sensors, sink, self.topics.state, self.stats
        )
        self.rounds = CommitRounds(
            sink, self.source, writer, defer_max=_DEFER_STATES_MAX, on_done=self.metrics.commit_done
        )

    def _batch_published(self) -> None:
        if not self.phases.reported:
            self.phases.scored(backend=self.engine.worker.backend)
        if self.rounds is not None:
            self.rounds.batch_published()

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> int:
        """Consume, score, publish and run commit rounds until a stop is asked; then shut down."""
        sink, source = self.sink, self.source
        publisher, rounds, ingest, writer = self.publisher, self.rounds, self.ingest, self.writer
        assert sink is not None and source is not None and ingest is not None
        assert publisher is not None and rounds is not None and writer is not None
        cfg = self.cfg
        batch_n = cfg.kafka.consume_batch
        poll_s = cfg.kafka.poll_timeout_ms / 1000.0
        commit_every = cfg.kafka.commit_interval_s
        stats_every = cfg.metrics.stats_interval_s
        next_commit = time.monotonic() + commit_every
        next_stats = time.monotonic() + stats_every
        next_gauges = time.monotonic()
        worker = self.engine.worker
        backpressure = self.backpressure
        ready = False
        while not self._stop_requested:
            self.health.beat()
            worker.raise_if_failed()
            backpressure.update(source)
            # Held (paused, not in the client): no consume; the worker is waited on below
            # and the messages wait in librdkafka.
            batch = None
            if backpressure.consuming:
                # Consume even while paused in the client: it serves rebalances. With scores
                # in flight, do not wait in consume: wait on the worker below.
                busy = backpressure.paused or bool(publisher.pending) or self.recovery.installing
                batch = source.consume(batch_n, 0.0 if busy else poll_s)
                for answer in source.commit_results():
                    rounds.answered(answer)
            if not ready:
                ready = True
                self.notifier.ready(f"consuming {self.topics.input}")
                log.info("daemon_ready", input=self.topics.input)
            if batch:
                if self.phases.at("restored") is not None:
                    self.phases.mark("fetched")
                ingest.process(batch)
            if self.recovery.pending:
                self._restored(source, self.recovery.step())
            wait_s = 0.05 if backpressure.paused else 0.0 if batch else _RESULT_WAIT_S
            publisher.publish_done(block_s=wait_s)
            idle = not publisher.pending
            if idle:  # between bursts: the refits their new peaks owe
                self.engine.thresholds.settle(_SETTLE_S)
            sink.poll(0)
            if self._reload_requested:
                self._reload_requested = False
                self.reloads.request("signal")
            now = time.monotonic()
            self.reloads.poll(now)
            if rounds.round is None and now >= next_commit + (0.0 if idle else BUSY_WAIT_S):
                writer.tombstones(self.table.expire_evicted())
                rounds.start(list(self.table.parts), "interval", waiting=len(publisher.pending))
            if rounds.round is not None:
                stalled = rounds.advance(busy=not idle)
                if stalled is not None:
                    # With many changed sensors a round's checkpoint takes seconds of the
                    # loop's time. Space rounds so that they take at most a tenth of it.
                    next_commit = time.monotonic() + max(commit_every, _COMMIT_SPACING * stalled)
            if now >= next_gauges:
                self.gauges.refresh(source)
                self.access.check(source.refusals())
                next_gauges = now + _GAUGE_REFRESH_S
            if now >= next_stats:
                self.gauges.log_stats(source)
                next_stats = now + stats_every
        return self._shut_down(sink, source, publisher, rounds)

    def _shut_down(
        self, sink: Sink, source: Source, publisher: Publisher, rounds: CommitRounds
    ) -> int:
        """Drain, commit every partition, leave the group and flush; 0 (a clean shutdown)."""
        log.info(
            "shutdown_started", signal=self._stop_signal, pending_batches=len(publisher.pending)
        )
        self.notifier.stopping("draining, flushing and committing")
        self.recovery.close()
        rounds.abandon()
        rounds.run(list(self.table.parts), reason="shutdown", drain=publisher.drain)
        if self.snapshot_dir is not None and self.writer is not None:
            # Each owned partition's state, beside the daemon, for the next start here.
            state = self.topics.state
            self.writer.save_snapshots(
                self.snapshot_dir, self.cfg.kafka.group_id, lambda p: source.end_offset(state, p)
            )
        # Leaving the group revokes everything: the callback finds nothing left to commit.
        source.close()
        self.source = None
        sink.flush(FLUSH_TIMEOUT_S)
        self.gauges.log_stats(None)
        log.info("shutdown_complete")
        return 0

    # -- rebalances ------------------------------------------------------------------------

    def _on_assign(self, partitions: list[int]) -> None:
        if not partitions:
            return
        if self._stop_requested or self._failed or not self._built:
            # Leaving the group (SIGTERM, or after a failure) can still bring an incremental
            # assignment, revoked again a moment later. Restoring it would ask the busy
            # coordinator for commits (a 30 s timeout seen while the group rebalanced);
            # left unrestored, its revocation commits nothing, and the next owner replays.
            log.info("partitions_assigned_while_leaving", partitions=partitions)
            return
        assert self.source is not None
        self.phases.mark("assigned")
        # Nothing of theirs is fetched until their state is in place; the partitions held
        # already go on meanwhile (the loop installs the state a slice at a time).
        self.source.pause(partitions)
        self.recovery.begin(partitions, self.source.committed(partitions))
        restoring = self.recovery.pending
        log.info(
            "partitions_assigned",
            partitions=partitions,
            owned=sorted(set(self.table.parts).union(restoring)),
            restoring=restoring,
        )

    def _restored(self, source: Source, ready: list[tuple[int, int]]) -> None:
        """Partitions whose state is in place: fetch them from their commit."""
        if not ready:
            return
        for p, offset in ready:
            # A message fetched before the pause was dropped by ingest: fetch it again.
            source.seek(p, offset)
        if not self.backpressure.client_paused:
            source.resume([p for p, _ in ready])
        owned = sorted(self.table.serving())
        self.health.partitions = tuple(owned)
        log.info("partitions_restored", partitions=[p for p, _ in ready], owned=owned)
        if not self.recovery.pending:
            self.phases.mark("restored")
        # The restored state is long-lived: out of the cyclic collector's way, walking
        # only what was made since the last settle (a full one would stall the loop).
        settle_heap("assigned", rethaw=False)
        trim_heap()

    def _on_revoke(self, partitions: list[int]) -> None:
        if not self._built:  # a start-up that failed before the model: nothing held
            return
        self.recovery.cancel(partitions)
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
        if not self._built:
            return
        self.recovery.cancel(partitions)
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
        self.health.partitions = tuple(sorted(self.table.serving()))
        trim_heap()


def run_daemon(cfg: Config) -> int:
    """``streamer run``: 0 after a clean shutdown, 1 on a runtime failure (logged).

    ConfigError and InputError (a model directory that is missing or unusable)
    propagate: the CLI turns them into exit code 2.
    """
    configure_logging(level=cfg.logging.level)
    sys.setswitchinterval(_GIL_SWITCH_S)
    try:
        daemon = Daemon(cfg)
        return daemon.run()
    except (ConfigError, InputError):
        raise
    except StreamerError as exc:
        log.error("daemon_failed", error=str(exc), error_type=type(exc).__name__)
        # The log may go to a file or journald: the reason also goes to stderr, once.
        print(f"streamer: {exc}", file=sys.stderr)
        return 1
