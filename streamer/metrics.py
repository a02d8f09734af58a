"""Prometheus metrics, and the ``/metrics``, ``/healthz`` and ``/readyz`` HTTP endpoints.

Every series lives in the daemon's own registry (never prometheus-client's global
one), so two daemons in one test process, or a library user, never collide.
Labels are bounded: DLQ error kinds (a fixed set), input partitions, reload
results. Nothing is labelled per sensor: a plant with 50,000 sensors would
otherwise make 50,000 series per metric.

The daemon increments counters once per consumed or published batch, never per
message; the per-window end-to-end latency goes into an ``ArrayHistogram``, which
takes a numpy array per observation. Gauges that need a look at the consumer
(lag, queue depth, paused partitions, open alerts) are refreshed by the main
loop about once a second rather than read from the HTTP thread, because the
Kafka client and the engine are not thread-safe.

Health is the main loop's heartbeat: ``/healthz`` answers 200 while the loop
completed an iteration within ``metrics.stall_after_s`` (else 503), and the
systemd watchdog pings are sent only under the same condition
(``streamer.notify``). ``/readyz`` answers 200 once partitions are assigned and
the model is loaded, and not while the Kafka clients have reached no broker for
longer than ``Health.unready_after_s`` (the reason is in the body).

The endpoints are served by ``streamer.httpserver.BoundedHTTPServer``: a fixed
number of threads however many connections arrive, timeouts on idle and slow
clients, and one rate-limited ``metrics_client_error`` line per client failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import orjson
from numpy.typing import NDArray
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from structlog.typing import FilteringBoundLogger

from streamer.codec import DLQ_KINDS
from streamer.errors import StreamerError
from streamer.httpserver import BoundedHTTPServer, RequestHandler

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS_S",
    "UNREADY_AFTER_S",
    "ArrayHistogram",
    "Health",
    "Metrics",
    "MetricsServer",
    "metric_names",
]

PREFIX = "streamer"
BATCH_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 .. 16384 windows
INFERENCE_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# Sample timestamp to score acknowledged: milliseconds when live, hours for a backlog.
LATENCY_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
RELOAD_RESULTS = ("ok", "failed", "unchanged")
# /readyz turns 503 once the Kafka clients have reached no broker for this long
# (metrics.unready_after_s): long enough that a broker restart or a leader move does not
# take every instance out of a load balancer at once.
UNREADY_AFTER_S = 10.0
# A scrape or probe must send its request within this long of connecting, and read the
# answer without pausing longer than this; otherwise the connection is closed.
REQUEST_TIMEOUT_S = 5.0


class ArrayHistogram(Collector):
    """A Prometheus histogram observed a numpy array at a time (one call per batch).

    ``prometheus_client.Histogram.observe`` takes one value under a lock; per
    window on the hot path that would cost more than the window's bookkeeping.
    Here a batch is bucketed with one ``searchsorted`` and one ``bincount``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(not np.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be finite and non-empty, got {buckets!r}")
        self.name = name
        self.documentation = documentation
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._labels = [repr(b) for b in bounds] + ["+Inf"]  # as prometheus-client writes le
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # the HTTP thread collects while the main thread observes
        registry.register(self)

    def observe(self, values: NDArray[np.floating[Any]] | Sequence[float]) -> None:
        """Add every finite value of ``values`` to the histogram."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        # side="left": bucket i counts values <= bound i, Prometheus' "le" semantics.
        counts = np.bincount(
            np.searchsorted(self._bounds, v, side="left"), minlength=self._counts.size
        )
        total = float(v.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    @property
    def count(self) -> int:
        """Observations so far."""
        with self._lock:
            return int(self._counts.sum())

    def describe(self) -> Iterable[Metric]:
        """The family without samples (registration needs only the name)."""
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        """Cumulative buckets, count and sum, as Prometheus expects."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        family = HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )
        return [family]


class Health:
    """The main loop's heartbeat and what readiness needs; read from other threads.

    Plain attribute writes and reads are atomic under the GIL, so the loop's
    ``beat()`` costs one ``time.monotonic()`` call and no lock.
    """

    __slots__ = (
        "_last_beat",
        "access_refused",
        "broker_down_since",
        "model_version",
        "partitions",
        "restoring",
        "stall_after_s",
        "unready_after_s",
    )

    def __init__(self, stall_after_s: float, unready_after_s: float = UNREADY_AFTER_S) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}")
        if unready_after_s <= 0:
            raise ValueError(f"unready_after_s must be positive, got {unready_after_s}")
        self.stall_after_s = stall_after_s
        self.unready_after_s = unready_after_s
        self._last_beat = time.monotonic()
        self.partitions: tuple[int, ...] = ()
        self.model_version: str | None = None
        # time.monotonic() since when the Kafka clients reach no broker; None: they do.
        # Written by streamer.kafka.reachability (through set_broker_down_since).
        self.broker_down_since: float | None = None
        # Why the broker refuses this instance its input or group (authorization), if it
        # does: the instance is then not ready, whatever else holds.
        self.access_refused: str | None = None
        # What a state restore in progress has read so far (shown by /readyz). Partitions
        # being restored are not yet among ``partitions``; those already held still serve.
        self.restoring: str | None = None

    def beat(self) -> None:
        """The main loop completed an iteration."""
        self._last_beat = time.monotonic()

    def set_broker_down_since(self, since: float | None) -> None:
        """The Kafka clients reach no broker since ``since`` (monotonic); None: they do again."""
        self.broker_down_since = since

    @property
    def since_progress_s(self) -> float:
        """Seconds since the last heartbeat."""
        return time.monotonic() - self._last_beat

    @property
    def broker_down_s(self) -> float | None:
        """Seconds for which no broker has been reachable, or None while one is."""
        since = self.broker_down_since  # read once: the Kafka thread may clear it meanwhile
        return None if since is None else time.monotonic() - since

    @property
    def healthy(self) -> bool:
        """Whether the loop made progress within ``stall_after_s``."""
        return self.since_progress_s <= self.stall_after_s

    @property
    def ready(self) -> bool:
        """Partitions assigned, a model loaded, and a broker reached within ``unready_after_s``."""
        down_s = self.broker_down_s
        return (
            bool(self.partitions)
            and self.model_version is not None
            and (down_s is None or down_s <= self.unready_after_s)
            and self.access_refused is None
        )


def _name(n: str) -> str:
    return f"{PREFIX}_{n}"


class Metrics:
    """Every series the daemon exports, in one registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = self.registry = registry if registry is not None else CollectorRegistry()
        # Process (RSS, CPU, open fds), Python GC and version: cheap, and what an
        # operator looks at first when a long-running process misbehaves.
        process_collector.ProcessCollector(registry=reg)
        platform_collector.PlatformCollector(registry=reg)
        gc_collector.GCCollector(registry=reg)

        self._input_series(reg)
        self._scoring_series(reg)
        self._kafka_series(reg)
        self._model_series(reg)
        self._lag_partitions: set[int] = set()

    def _input_series(self, reg: CollectorRegistry) -> None:
        """Input: messages, samples, dead letters, sensors evicted, refused and expired."""
        self.messages_consumed = Counter(
            _name("messages_consumed"), "Input messages consumed.", registry=reg
        )
        self.samples_decoded = Counter(
            _name("samples_decoded"), "Input messages decoded into valid samples.", registry=reg
        )
        self.dead_letters = Counter(
            _name("dead_letters"),
            "Input messages sent to the dead-letter topic, by error kind.",
            ["kind"],
            registry=reg,
        )
        self._dead_by_kind = {k: self.dead_letters.labels(kind=k) for k in DLQ_KINDS}
        self.sensors_evicted = Counter(
            _name("sensors_evicted"),
            "Sensors whose window was dropped: silent (timestamps), idle (wall clock), "
            "replay_bound, or sensor_limit (room for a new sensor under stream.max_sensors).",
            ["reason"],
            registry=reg,
        )
        self.sensors_parked = Counter(
            _name("sensors_parked"),
            "Silent sensors whose partial window was saved with their state "
            "(stream.park_after_s), so that they no longer hold their partition's commit back.",
            registry=reg,
        )
        self.sensors_refused = Counter(
            _name("sensors_refused"),
            "Samples of new sensors dead-lettered (sensor_limit): stream.max_sensors reached "
            "and every sensor seen in the same batch.",
            registry=reg,
        )
        self.sensors_expired = Counter(
            _name("sensors_expired"),
            "Evicted sensors whose learned state was forgotten (stream.evicted_state_ttl_s, "
            "or more evicted sensors than stream.max_sensors).",
            registry=reg,
        )
        self.dead_letters_truncated = Counter(
            _name("dead_letters_truncated"),
            "Dead letters whose value (or key) was cut to fit the dead-letter topic's limit.",
            registry=reg,
        )

    def _scoring_series(self, reg: CollectorRegistry) -> None:
        """Scoring: windows, alerts, inference batches and latency, end-to-end latency."""
        self.windows_scored = Counter(
            _name("windows_scored"), "Windows scored and published.", registry=reg
        )
        self.windows_skipped = Counter(
            _name("windows_skipped"),
            "Windows rebuilt during a replay and not published again (already published).",
            registry=reg,
        )
        self.alerts_opened = Counter(_name("alerts_opened"), "Alerts opened.", registry=reg)
        self.alerts_closed = Counter(_name("alerts_closed"), "Alerts closed.", registry=reg)
        self.alerts_open = Gauge(
            _name("alerts_open"), "Alerts open now on this instance's sensors.", registry=reg
        )
        self.inference_batch = Histogram(
            _name("inference_batch_windows"),
            "Windows per forward pass of the inference worker.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.inference_latency = Histogram(
            _name("inference_latency_seconds"),
            "Duration of one forward pass (one micro-batch).",
            buckets=INFERENCE_BUCKETS_S,
            registry=reg,
        )
        self.end_to_end = ArrayHistogram(
            _name("end_to_end_latency_seconds"),
            "Sample timestamp of a window's last sample to its score acknowledged by Kafka.",
            LATENCY_BUCKETS_S,
            reg,
        )

    def _kafka_series(self, reg: CollectorRegistry) -> None:
        """The Kafka side: lag, the worker queue, partitions, sensors, commit rounds."""
        self.consumer_lag = Gauge(
            _name("consumer_lag_messages"),
            "Messages in the input partition after the last one consumed.",
            ["partition"],
            registry=reg,
        )
        self.queue_depth = Gauge(
            _name("inference_queue_depth"), "Window batches waiting for the worker.", registry=reg
        )
        self.queued_windows = Gauge(
            _name("inference_queued_windows"), "Windows waiting for the worker.", registry=reg
        )
        self.partitions_assigned = Gauge(
            _name("partitions_assigned"), "Input partitions assigned.", registry=reg
        )
        self.partitions_restoring = Gauge(
            _name("partitions_restoring"),
            "Input partitions assigned whose state is still being restored (not yet consumed).",
            registry=reg,
        )
        self.state_restore_records = Gauge(
            _name("state_restore_records"),
            "State records read so far by the restores in progress (0: none in progress).",
            registry=reg,
        )
        self.partitions_paused = Gauge(
            _name("partitions_paused"),
            "Input partitions paused for backpressure (queue to the worker full).",
            registry=reg,
        )
        self.sensors = Gauge(_name("sensors"), "Sensors with a live window buffer.", registry=reg)
        self.commits = Counter(_name("commits"), "Offset commit rounds completed.", registry=reg)
        self.commit_round = Histogram(
            _name("commit_round_seconds"),
            "Duration of a commit round, from H taken to offsets committed (checkpoint "
            "the state at H, wait for every record to be acknowledged, commit).",
            buckets=INFERENCE_BUCKETS_S,
            registry=reg,
        )
        self.commit_stall = Histogram(
            _name("commit_stall_seconds"),
            "Loop time a commit round took (snapshot, state records, sending the commit); "
            "interval rounds consume on while records are acknowledged and the commit "
            "is answered, shutdown and revocation rounds wait.",
            buckets=INFERENCE_BUCKETS_S,
            registry=reg,
        )

    def _model_series(self, reg: CollectorRegistry) -> None:
        """The model in use, reloads, and health."""
        self.model = Info(_name("model"), "The model scoring now.", registry=reg)
        self.startup_seconds = Gauge(
            _name("startup_seconds"),
            "Seconds each start-up phase took (the `startup` log line), and total: process "
            "start to the first score published.",
            ["phase"],
            registry=reg,
        )
        self.model_load_seconds = Gauge(
            _name("model_load_seconds"),
            "Duration of loading and validating the current model.",
            registry=reg,
        )
        self.model_loaded = Gauge(
            _name("model_loaded_timestamp_seconds"),
            "Unix time the current model started scoring.",
            registry=reg,
        )
        self.model_reloads = Counter(
            _name("model_reloads"),
            "Model reload attempts by result: ok, failed (the old model keeps scoring), "
            "unchanged (same version).",
            ["result"],
            registry=reg,
        )
        self._reload_results = {r: self.model_reloads.labels(result=r) for r in RELOAD_RESULTS}
        self.seconds_since_progress = Gauge(
            _name("seconds_since_progress"),
            "Seconds since the main loop last completed an iteration (health).",
            registry=reg,
        )
        self.ready = Gauge(
            _name("ready"),
            "1 when partitions are assigned, the model loaded and Kafka reachable (/readyz).",
            registry=reg,
        )
        self.kafka_unreachable = Gauge(
            _name("kafka_unreachable_seconds"),
            "Seconds for which the Kafka clients have reached no broker (0 while they do).",
            registry=reg,
        )

    # -- hooks for the daemon -----------------------------------------------------------

    def dead_letter(self, kind: str) -> None:
        """Count one dead letter (a rare path: one call per bad message is fine)."""
        child = self._dead_by_kind.get(kind)
        if child is None:  # a kind added to the codec later; the set stays bounded
            child = self._dead_by_kind[kind] = self.dead_letters.labels(kind=kind)
        child.inc()

    def inference_batch_done(self, windows: int, seconds: float) -> None:
        """Called by the inference worker after each forward pass (thread-safe)."""
        self.inference_batch.observe(windows)
        self.inference_latency.observe(seconds)

    def commit_done(self, seconds: float, stalled_s: float) -> None:
        """A commit round completed in ``seconds``, of which the loop spent ``stalled_s``."""
        self.commits.inc()
        self.commit_round.observe(seconds)
        self.commit_stall.observe(stalled_s)

    def model_in_use(self, version: str, load_s: float) -> None:
        """A model started scoring."""
        self.model.info({"version": version})
        self.model_load_seconds.set(load_s)
        self.model_loaded.set(time.time())

    def reload_result(self, result: str) -> None:
        """Count one reload attempt (``ok``, ``failed`` or ``unchanged``)."""
        self._reload_results[result].inc()

    def set_lag(self, lag: dict[int, int]) -> None:
        """Per-partition lag; partitions no longer assigned drop out of the export."""
        for p in self._lag_partitions - set(lag):
            self.consumer_lag.remove(str(p))
        for p, n in lag.items():
            self.consumer_lag.labels(partition=str(p)).set(n)
        self._lag_partitions = set(lag)

    def track_health(self, health: Health) -> None:
        """Export the heartbeat and readiness, computed at scrape time."""
        self.seconds_since_progress.set_function(lambda: health.since_progress_s)
        self.ready.set_function(lambda: 1.0 if health.ready else 0.0)
        self.kafka_unreachable.set_function(lambda: health.broker_down_s or 0.0)


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (``_total``, ``_bucket``, ... included)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    out: set[str] = set()
    for family in registry.collect():
        out.add(family.name)
        out.update(family.name + s for s in suffixes.get(family.type, ("",)))
        out.update(s.name for s in family.samples)
    return out


# -- HTTP --------------------------------------------------------------------------------


class _Handler(RequestHandler):
    server_version = "streamer"
    # Set on a subclass per server (MetricsServer.start): the handler has no other way in.
    registry: ClassVar[CollectorRegistry]
    health: ClassVar[Health]

    def do_GET(self) -> None:  # noqa: N802 (http.server dispatches on this name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            h = self.health
            healthy = h.healthy
            body: dict[str, Any] = {
                "healthy": healthy,
                "seconds_since_progress": round(h.since_progress_s, 3),
            }
            self._json(200 if healthy else 503, body)
        elif path == "/readyz":
            h = self.health
            ready = h.ready
            body = {"ready": ready, "partitions": list(h.partitions), "model": h.model_version}
            down_s = h.broker_down_s
            if down_s is not None:
                body["kafka"] = f"unreachable for {down_s:.1f} s"
            refused = h.access_refused
            if refused is not None:
                body["access"] = refused
            restoring = h.restoring
            if restoring is not None:
                body["restoring"] = restoring
            self._json(200 if ready else 503, body)
        else:
            self._json(404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, orjson.dumps(body) + b"\n", "application/json")

    def _send(self, code: int, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a ``BoundedHTTPServer``.

    ``logger`` receives the ``metrics_client_error`` lines (the module's logger by
    default); ``request_timeout_s`` bounds how long a client may take to send its
    request and to read the answer.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        host: str,
        port: int,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self._registry = registry
        self._health = health
        self._host = host
        self._port = port
        self._request_timeout_s = request_timeout_s
        self._logger = logger
        self._server: BoundedHTTPServer | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve on background threads; returns the bound (host, port).

        Port 0 binds an ephemeral port. Raises StreamerError if the address is unusable.
        """
        handler = type(
            "_BoundHandler", (_Handler,), {"registry": self._registry, "health": self._health}
        )
        server = BoundedHTTPServer(
            handler,
            self._host,
            self._port,
            request_timeout_s=self._request_timeout_s,
            io_timeout_s=self._request_timeout_s,
            name="metrics",
            client_error_event="metrics_client_error",
            logger=self._logger,
        )
        try:
            host, port = server.start()
        except OSError as exc:
            raise StreamerError(
                f"metrics: cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        self._server = server
        return host, port

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
