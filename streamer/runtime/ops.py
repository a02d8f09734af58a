"""What operators see and drive: metrics and health, the watchdog, access refusals, reloads.

``Services`` runs the metrics server and the systemd watchdog; ``AccessWatch`` turns
the consumer's authorization refusals into /readyz and rate-limited log lines;
``Reloads`` loads a new model in the background (SIGHUP, or a changed checkpoint)
and swaps it in between batches; ``Gauges`` refreshes lag, queue and sensor gauges
and writes the periodic ``stats`` line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from streamer.config import Config, MetricsConfig
from streamer.errors import InferenceError
from streamer.kafka.source import CLUSTER_REFUSED, GROUP_REFUSED, TOPIC_REFUSED
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.model.backend import worker_threads
from streamer.notify import Notifier, Watchdog, watchdog_interval_s
from streamer.reload import CheckpointWatcher, ModelReloader, ReloadOutcome
from streamer.runtime.backpressure import Backpressure
from streamer.runtime.counters import Counters
from streamer.runtime.heap import SensorGrowth, settle_heap
from streamer.runtime.partitions import PartitionTable

if TYPE_CHECKING:  # the engine imports torch
    from streamer.engine import Engine

__all__ = ["AccessWatch", "Gauges", "Reloads", "Services", "Watermarks"]

log = structlog.get_logger("streamer.daemon")

# A refusal by the broker (authorization) is logged again this often while it lasts.
_ACCESS_REPEAT_S = 30.0


class Watermarks(Protocol):
    """The consumer, as the gauges see it (``kafka.source.Source``)."""

    def watermarks(self, partition: int) -> tuple[int, int]:
        """Low and high watermark of an input partition (cached; -1 when unknown)."""

    def refusals(self) -> dict[int, str]:
        """Authorization refusals in force: partition (or group/topic/cluster key) -> why."""


class Services:
    """The metrics server and the systemd watchdog, for the daemon's lifetime."""

    def __init__(self, metrics: Metrics, health: Health, notifier: Notifier) -> None:
        self.metrics = metrics
        self.health = health
        self.notifier = notifier
        self._server: MetricsServer | None = None
        self._watchdog: Watchdog | None = None

    def start(self, mc: MetricsConfig) -> None:
        """Listen for scrapes (if enabled) and ping the watchdog (if systemd set one)."""
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

    def stop(self) -> None:
        """Stop pinging, stop listening, close the notify socket."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._server is not None:
            self._server.close()
        self.notifier.close()


class AccessWatch:
    """Not ready while the broker refuses our input or group; say so, at a bounded rate.

    A fetch refused for lack of READ leaves a partition assigned and the loop healthy,
    consuming nothing: without this, the instance would report ready while its backlog
    grows.
    """

    def __init__(self, health: Health, group_id: str, input_topic: str) -> None:
        self.health = health
        self.group_id = group_id
        self.input = input_topic
        self._logged = 0.0

    def what(self, key: int) -> str:
        """What a key of Source.refusals() names: the group, the topic, or a partition."""
        if key == GROUP_REFUSED:
            return f"group {self.group_id}"
        if key == TOPIC_REFUSED:
            return f"topic {self.input}"
        if key == CLUSTER_REFUSED:
            return "cluster"
        return f"{self.input}[{key}]"

    def check(self, refused: dict[int, str]) -> None:
        """Update /readyz from the refusals in force; log a change, or a lasting one again."""
        reason = (
            None
            if not refused
            else "; ".join(f"{self.what(p)}: {why}" for p, why in sorted(refused.items()))
        )
        now = time.monotonic()
        if reason is not None and (
            reason != self.health.access_refused or now - self._logged >= _ACCESS_REPEAT_S
        ):
            self._logged = now
            log.error(
                "kafka_access_refused",
                reason=reason,
                hint="check the grants with `streamer check-access --config ...`",
            )
        elif reason is None and self.health.access_refused is not None:
            log.info("kafka_access_granted", was=self.health.access_refused)
        self.health.access_refused = reason


class Reloads:
    """Model reloads: requested by a signal or a changed file, applied between batches."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        device: str,
        notifier: Notifier,
        metrics: Metrics,
        health: Health,
    ) -> None:
        model = engine.model
        self.path = cfg.model.path
        self.input = cfg.topics.input
        self.engine = engine
        self.notifier = notifier
        self.metrics = metrics
        self.health = health
        self.reloader = ModelReloader(
            cfg.model.path,
            device,
            model.window,
            model.channels,
            cfg.threshold,
            backend=model.backend,
            threads=worker_threads(cfg.inference),
        )
        self.watcher = CheckpointWatcher(cfg.model.path) if cfg.model.watch_interval_s > 0 else None
        self.watch_every_s = cfg.model.watch_interval_s
        self._next_watch = time.monotonic()

    def request(self, trigger: str) -> None:
        """Start loading the checkpoint in the background."""
        if self.watcher is not None:
            self.watcher.rebase()  # the files as they are now are what this load reads
        log.info("model_reload_started", trigger=trigger, path=str(self.path))
        self.notifier.reloading(f"loading model from {self.path}")
        self.reloader.request(trigger)

    def poll(self, now: float) -> None:
        """Apply a finished load; every ``model.watch_interval_s``, look at the files."""
        outcome = self.reloader.take()
        if outcome is not None:
            self.apply(outcome)
        if self.watcher is not None and now >= self._next_watch:
            self._next_watch = now + self.watch_every_s
            if self.watcher.changed():
                self.request("file_changed")

    def apply(self, out: ReloadOutcome) -> None:
        """Swap in a validated model between batches, or keep the running one and say why."""
        running = self.engine.worker.model_version
        ctx = {"trigger": out.trigger, "path": str(self.path)}
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
        self.notifier.ready(f"consuming {self.input} with model {self.engine.model.version}")


class Gauges:
    """Lag, queue, partition and sensor gauges (about once a second) and the stats line."""

    def __init__(
        self,
        metrics: Metrics,
        notifier: Notifier,
        engine: Engine,
        table: PartitionTable,
        backpressure: Backpressure,
        counters: Counters,
        commits: Callable[[], int],
    ) -> None:
        self.metrics = metrics
        self.notifier = notifier
        self.engine = engine
        self.table = table
        self.backpressure = backpressure
        self.counters = counters
        self.commits = commits
        self._last = (time.monotonic(), 0, 0)
        self.growth = SensorGrowth()

    def lag(self, source: Watermarks | None) -> dict[int, int]:
        """Messages behind the partition's high watermark, per owned partition (cached)."""
        out: dict[int, int] = {}
        if source is None:
            return out
        for p, part in self.table.parts.items():
            _, hi = source.watermarks(p)
            if hi >= 0:
                # Before the first message, the position is after the last commit's H.
                out[p] = max(0, hi - (max(part.consumed, part.committed_h) + 1))
        return out

    def refresh(self, source: Watermarks | None) -> None:
        """Set every gauge from the loop's state (reads the consumer's cached watermarks)."""
        m = self.metrics
        parts = self.table.parts
        m.set_lag(self.lag(source))
        m.queue_depth.set(self.engine.worker.queue_depth)
        m.queued_windows.set(self.engine.worker.queued_windows)
        m.partitions_assigned.set(len(parts))
        m.partitions_paused.set(len(parts) if self.backpressure.paused else 0)
        m.alerts_open.set(self.engine.alerts.open_count())
        m.sensors.set(len(self.table.sensor_part))
        sensors = len(self.engine.thresholds)
        if self.growth.due(sensors):
            # Many new sensors' long-lived state: out of the cyclic collector's way.
            settle_heap("sensors", rethaw=False, sensors=sensors)
            self.growth.settled = sensors

    def log_stats(self, source: Watermarks | None) -> None:
        """The ``stats`` line (rates since the last one) and the systemd status text."""
        now = time.monotonic()
        st = self.counters
        last = self._last
        dt_s = max(now - last[0], 1e-9)
        lag = sum(self.lag(source).values())
        messages_per_s = round((st.messages - last[1]) / dt_s, 1)
        windows_per_s = round((st.windows - last[2]) / dt_s, 1)
        parts = sorted(self.table.parts)
        model = self.engine.model.version
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
            commits=self.commits(),
            model=model,
        )
        self.notifier.status(
            f"{messages_per_s} msg/s, {windows_per_s} windows/s, lag {lag}, "
            f"partitions {parts}, model {model}"
        )
        self._last = (now, st.messages, st.windows)
