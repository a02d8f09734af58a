"""Configuration: one frozen pydantic model per section, loaded and validated once.

Every component receives its own section, never the whole config. Errors name the
offending key as a dotted path (``stream.window``) and say why, so a bad file stops
start-up with a message an operator can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streamer.client_settings import (
    is_secret_client_key,
    name_problem,
    read_by,
    setting_number,
    value_problem,
)
from streamer.errors import ConfigError

__all__ = [
    "AlertsConfig",
    "Config",
    "CsvConfig",
    "InferenceConfig",
    "KafkaConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MissingPolicy",
    "ModelConfig",
    "NoveltyConfig",
    "StreamConfig",
    "ThresholdConfig",
    "TopicsConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
]

MissingPolicy = Literal["refuse", "skip", "fill"]
"""``csv.missing``: what reading a CSV does with a gap in a channel column."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Section(BaseModel):
    """Base of every section: immutable, unknown keys rejected (typos fail loudly)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_FILE_REF = "file:"


def _resolve_secret(key: str, raw: str) -> str:
    """Resolve ``${ENV}`` and ``file:/path`` references so secrets stay out of the YAML."""
    match = _ENV_REF.match(raw)
    if match:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"{key}: environment variable {name} is not set")
        return os.environ[name]
    if raw.startswith(_FILE_REF):
        path = Path(raw[len(_FILE_REF) :])
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{key}: cannot read secret file {path}: {exc.strerror}") from exc
    return raw


class KafkaConfig(_Section):
    """Where the cluster is and how to talk to it."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "streamer"
    # librdkafka settings passed through verbatim (security.protocol, sasl.*, ssl.*, ...),
    # checked on load by name (case-sensitive) and value (streamer.client_settings). Values
    # of secret keys (a name holding password, secret or passphrase, in any case, or one of
    # SECRET_CLIENT_KEYS) may be ``${ENV_VAR}`` or ``file:/path``; held as SecretStr.
    client: dict[str, str | int | float | bool | SecretStr] = Field(default_factory=dict)
    create_topics: bool = False
    topic_partitions: PositiveInt = 1
    consume_batch: PositiveInt = 2000
    poll_timeout_ms: PositiveInt = 100
    # How often the daemon checkpoints state and commits (also on revoke and shutdown);
    # it consumes on while a round's records are delivered. Longer: less overhead, more
    # to replay after a crash. A round that takes long (many changed sensors) pushes the
    # next one to at least 9x the loop time it took, so rounds never take more than a
    # tenth of the loop's time.
    commit_interval_s: PositiveFloat = 5.0
    # Reading the state back on assignment fails when it reads nothing for this long. A
    # restore that keeps advancing is not cut short, however long the topic's uncompacted
    # tail (it says how far it got every 5 s, and /readyz shows it).
    restore_timeout_s: PositiveFloat = 60.0
    # Where a clean stop leaves each owned partition's state (runtime.snapshot), so that
    # the next start on this host reads that file rather than the state topic when nothing
    # changed since. Unset: $STATE_DIRECTORY/snapshots under systemd (StateDirectory=),
    # else none. Relative to the config file's folder when written in it.
    state_snapshot_dir: Path | None = None
    # At start-up, how long to wait for the cluster to answer (list or create the
    # topics) before stopping with "cannot reach Kafka at ...".
    connect_timeout_s: PositiveFloat = 30.0
    # Backpressure: while the inference queue is full the daemon stops calling consume, and
    # librdkafka keeps what it prefetched (and stops fetching at queued.max.messages.kbytes).
    # If the queue is still full after this long, the partitions are paused in the client,
    # which discards the prefetched messages (fetched again on resume) but lets consume
    # serve rebalances while the worker is stalled. 0 pauses at once.
    pause_after_s: NonNegativeFloat = 5.0
    # Static group membership (group.instance.id): a daemon restarted within the session
    # timeout gets its partitions back at once, without a rebalance. "auto": one per
    # daemon, stable across its restarts (streamer.kafka.membership); null: none. Two
    # live daemons of a group with the same id fence each other.
    instance_id: str | None = "auto"

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", value):
            raise ValueError(f"must be 1 to 200 of A-Z a-z 0-9 . _ - (or null), got {value!r}")
        return value

    @model_validator(mode="after")
    def _pause_within_poll_interval(self) -> KafkaConfig:
        # librdkafka leaves the group if consume is not called for max.poll.interval.ms.
        raw = self.client.get("max.poll.interval.ms", 300_000)
        interval_ms = setting_number(raw)
        if interval_ms is None:  # refused by the client check already; kept for safety
            raise ValueError(f"client max.poll.interval.ms {raw!r} is not a number")
        if self.pause_after_s * 1000.0 >= interval_ms / 2:
            raise ValueError(
                f"pause_after_s={self.pause_after_s} must be under half of the client's "
                f"max.poll.interval.ms ({interval_ms:g} ms): holding consumption longer "
                "risks leaving the group"
            )
        return self

    @field_validator("client", mode="before")
    @classmethod
    def _client(cls, value: Any) -> Any:
        """Every key known to librdkafka with a value it reads; secrets as SecretStr.

        Checked here, when the config is loaded, so that ``check-config`` and start-up
        name the key, rather than the Kafka client's creation later (with the canonical
        name of an alias) or never (a mis-cased secret key was printed, not refused).
        All problems are reported at once; values of secret keys never appear.
        """
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        problems: list[str] = []
        for key, raw in value.items():
            if not isinstance(key, str):
                problems.append(f"setting names must be strings, got {key!r}")
                continue
            problem = name_problem(key)
            if problem is not None:
                problems.append(problem)
                continue
            if is_secret_client_key(key):
                if isinstance(raw, SecretStr):
                    out[key] = raw
                elif isinstance(raw, str | int | float) and not isinstance(raw, bool):
                    try:
                        out[key] = SecretStr(_resolve_secret(key, str(raw)))
                    except ValueError as exc:
                        problems.append(str(exc))
                else:
                    problems.append(f"{key!r} must be a string")
                continue
            problem = value_problem(key, raw)
            if problem is not None:
                problems.append(problem)
            out[key] = raw
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def librdkafka(self, role: str | None = None) -> dict[str, Any]:
        """The client settings with secrets revealed, for handing to confluent-kafka only.

        ``role`` (consumer, producer or admin): only the settings such a client reads,
        since librdkafka warns at every start about each one it ignores.
        """
        return {
            key: (val.get_secret_value() if isinstance(val, SecretStr) else val)
            for key, val in self.client.items()
            if role is None or read_by(role, key)
        }


class TopicsConfig(_Section):
    """Input and output topic names."""

    input: str = "sensors"
    scores: str = "sensor-scores"
    alerts: str = "sensor-alerts"
    dlq: str = "sensor-dlq"
    # Compacted changelog of per-sensor threshold, alert and ring state (one record per
    # sensor, partition = its input partition); restored on partition assignment.
    state: str = "sensor-state"


class StreamConfig(_Section):
    """Shape of the stream: channels, window and stride, and the sample field names."""

    channels: list[str] = Field(
        default_factory=lambda: ["temp", "pressure", "vibration", "flow", "current"]
    )
    window: Annotated[int, Field(ge=2, le=65536)] = 64
    stride: PositiveInt = 8
    # A gap longer than this between two samples of a sensor resets its window:
    # a window that spans an outage would mix two regimes and score as an anomaly.
    max_gap_s: PositiveFloat = 300.0
    sensor_field: str = "sensor"
    timestamp_field: str = "ts"
    values_field: str = "values"
    max_message_bytes: PositiveInt = 65536
    # Bound on the replay after a restart: a sensor whose oldest held sample is this many
    # messages behind its partition's position is evicted (its window restarts). Must
    # exceed window x sensors per partition, or every window is evicted before it fills.
    max_replay_messages: PositiveInt = 1_000_000
    # A sample whose timestamp is more than this ahead of the wall clock is dead-lettered
    # (bad_timestamp): one sample from year 9999 would otherwise lock its sensor out (every
    # later sample looks out of order) and move its partition's clock.
    max_future_s: PositiveFloat = 300.0
    # Sensors with a ring buffer per instance. A new sensor beyond it takes the place of
    # the least recently seen sensor that has not filled a window yet; with none left, its
    # samples are dead-lettered (sensor_limit). Sensors that fill windows are never
    # displaced by new ids. Bounds memory under a flood of new ids.
    max_sensors: PositiveInt = 100_000
    # A sensor with no message for this long (wall clock) is evicted at the next commit
    # round, whatever its timestamps say: ids that arrive once cannot pin the commit.
    max_idle_s: PositiveFloat = 3600.0
    # A sensor silent this long (no message for this many seconds of wall clock, or its
    # newest sample this far behind its partition's clock) has the samples of its
    # partial window saved with its state, so that it no longer holds the commit back:
    # a restart then replays only what came after, and the window still completes when
    # the sensor speaks again (before max_gap_s resets it). 0: never.
    park_after_s: Annotated[float, Field(ge=0)] = 30.0
    # What an evicted sensor learned (threshold, alert state) is kept for this long, and
    # for at most max_sensors evicted sensors, so that it continues if the sensor returns;
    # then it is forgotten (a tombstone clears its state record) and it re-warms.
    evicted_state_ttl_s: PositiveFloat = 86400.0

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one channel name")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate channel names {dupes}")
        return value

    @model_validator(mode="after")
    def _stride(self) -> StreamConfig:
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


Preset = Literal["seed-dense", "dense", "conv1d", "lstm", "gru", "cnn-lstm"]


class TrainConfig(_Section):
    """Model architecture and training loop settings used by ``streamer train``."""

    preset: Preset = "conv1d"
    fft: bool = False
    scaler: Literal["standard", "minmax"] = "standard"
    hidden: PositiveInt = 32
    latent: PositiveInt = 16
    epochs: PositiveInt = 60
    batch_size: PositiveInt = 64
    learning_rate: PositiveFloat = 1e-3
    patience: PositiveInt = 8
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    train_stride: PositiveInt = 1
    seed: int = 0
    calibration_samples: PositiveInt = 5000
    # How a window's reconstruction becomes its score: the mean or the maximum of the
    # per-channel errors (with max, one misbehaving channel is enough), or the squared
    # Mahalanobis distance of the per-channel mean residuals from their distribution on
    # normal windows, in units of its 99th percentile there (small shifts in channels
    # that normally move together count; a noisy channel weighs as its noise).
    score: Literal["mean", "max", "mahalanobis"] = "mean"
    # When set, each channel's error is divided by this quantile of its errors on the
    # training windows, so every channel speaks in units of its own normal error and a
    # channel that was nearly constant in training cannot drown out the others.
    channel_scale_quantile: Annotated[float, Field(gt=0, le=1)] | None = None


class ModelConfig(_Section):
    """Where the trained model lives and where it runs."""

    path: Path = Path("models/current")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # ONNX Runtime (CPU only, imports in a fraction of torch's time) or torch (CPU, CUDA);
    # auto: ONNX Runtime on the CPU when the checkpoint has a graph (streamer.model.backend).
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    # The daemon reloads the model when the checkpoint files change (checked this often)
    # and on SIGHUP; 0 turns the file watch off (SIGHUP still reloads).
    watch_interval_s: Annotated[float, Field(ge=0)] = 5.0


class InferenceConfig(_Section):
    """Inference worker: queue bound and micro-batching."""

    max_batch: PositiveInt = 512
    # Every forward pass runs on zero-padded chunks of exactly this many windows, so a
    # window's score is bit-identical however the windows around it were batched
    # (replays after a crash then reproduce byte-identical records).
    chunk: PositiveInt = 64
    max_wait_ms: Annotated[float, Field(ge=0)] = 2.0
    queue_size: PositiveInt = 64
    # Windows waiting for the worker, at most (each holds window x channels float32s):
    # consumption pauses at this many as at queue_size batches. A batch's windows vary
    # from a few to one per message, so a bound in batches alone bounds neither memory
    # nor the time a new sample waits behind the queue. 8,192 is a quarter of a second of
    # work for a small CPU model, enough to keep the worker busy across a burst of windows
    # that fall due together (held consumption keeps the input prefetched meanwhile).
    max_queued_windows: PositiveInt = 8192
    # Model threads; 0: every usable CPU with ONNX Runtime (its threads sleep between
    # passes), one fewer with torch (its threads spin; the consumer thread keeps a core).
    threads: Annotated[int, Field(ge=0)] = 0
    # On CPU, run the model as a TorchScript trace (checked bit for bit against the
    # module): the whole forward pass then runs without holding the GIL.
    trace: bool = True


class ThresholdConfig(_Section):
    """Adaptive threshold per sensor; see streamer.scoring.thresholds."""

    method: Literal["spot", "dspot", "quantile", "fixed"] = "dspot"
    risk: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    level: Annotated[float, Field(gt=0, lt=1)] = 0.98
    depth: PositiveInt = 50
    # spot/dspot: most recent peaks kept per sensor (8 bytes each). About 1 - level of
    # normal windows are peaks, so each sensor fills this over its first few 10,000s.
    max_peaks: Annotated[int, Field(ge=10)] = 1000
    quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99
    window: PositiveInt = 1000
    # Above 1: the window learns only scores below the threshold, so at margin 1 the
    # quantile would ratchet down until everything alarms.
    margin: Annotated[float, Field(gt=1)] = 1.5
    value: PositiveFloat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ThresholdConfig:
        if self.method == "fixed" and self.value is None:
            raise ValueError("method 'fixed' needs threshold.value")
        if self.method in ("spot", "dspot") and self.risk >= 1 - self.level:
            raise ValueError(
                f"risk ({self.risk}) must be below 1 - level ({1 - self.level:.4g}): "
                "the alarm level must lie beyond the initial quantile"
            )
        return self

    def params(self) -> dict[str, Any]:
        """Constructor arguments for the chosen method."""
        if self.method == "spot":
            return {"risk": self.risk, "level": self.level, "max_peaks": self.max_peaks}
        if self.method == "dspot":
            return {
                "risk": self.risk,
                "level": self.level,
                "depth": self.depth,
                "max_peaks": self.max_peaks,
            }
        if self.method == "quantile":
            return {"quantile": self.quantile, "window": self.window, "margin": self.margin}
        return {"value": self.value}


class AlertsConfig(_Section):
    """Alert debounce: open after k anomalous of the last m windows, close after n normal."""

    open_after: PositiveInt = 3
    open_within: PositiveInt = 5
    close_after: PositiveInt = 10
    top_channels: PositiveInt = 3

    @model_validator(mode="after")
    def _k_of_m(self) -> AlertsConfig:
        if self.open_within < self.open_after:
            raise ValueError(
                f"open_within ({self.open_within}) must be >= open_after ({self.open_after})"
            )
        return self


class NoveltyConfig(_Section):
    """History novelty as the window score (``streamer.scoring.novelty``); off by default.

    When enabled, a window's score is how unlike the sensor's own recent history its
    newest rows are (0 to 1, see the module), in place of the model's reconstruction
    error; the model still names the channels an alert reports. Each sensor keeps
    ``history + 2 * points * max(scales) + 256`` rows per scale of (channels + 1)
    values, 8 bytes each (147 KB for one channel with the defaults), and costs 0.1 to
    0.4 ms of CPU per row: meant for slow series. The history is not part of the state
    record, so after a restart a sensor scores 0 for its first ``learning_rows`` rows
    again.
    """

    enabled: bool = False
    points: Annotated[int, Field(ge=2)] = 16
    scales: Annotated[list[PositiveInt], Field(min_length=1)] = Field(
        default_factory=lambda: [1, 16]
    )
    history: PositiveInt = 4000
    cap: PositiveFloat = 4.0
    refractory: Annotated[int, Field(ge=0)] = 200
    spatial_tolerance: Annotated[float, Field(ge=0)] | None = 0.05
    min_count: Annotated[int, Field(ge=2)] = 30
    learning_rows: Annotated[int, Field(ge=0)] = 750


class LoggingConfig(_Section):
    """The daemon's log lines (JSON on a pipe or journald, a console on a terminal)."""

    # debug adds a line per commit round and per heap settle. STREAMER_LOG_LEVEL, when
    # set, overrides this (as does --log-level).
    level: Literal["debug", "info", "warning"] = "info"


class MetricsConfig(_Section):
    """Prometheus metrics and health endpoints."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108  # 0: an ephemeral port (logged)
    stats_interval_s: PositiveFloat = 30.0
    # The main loop counts as stalled after this long without completing an iteration:
    # /healthz answers 503 and the systemd watchdog pings stop. An iteration is one
    # consume (kafka.poll_timeout_ms) plus, now and then, a commit round; a partition
    # restore counts as progress while it reads. Keep this well above those.
    stall_after_s: PositiveFloat = 30.0
    # /readyz answers 503 once the Kafka clients have reached no broker for this long
    # (its body says "kafka": "unreachable for N s"); /healthz ignores Kafka.
    unready_after_s: PositiveFloat = 10.0


class CsvConfig(_Section):
    """How training and scoring CSV files are read."""

    separator: str = ","
    timestamp_column: str | None = "timestamp"
    # Columns to read as channels; default: the stream channels.
    columns: list[str] | None = None
    # A gap in a channel column (an empty cell, NaN, NA, N/A, null, None): refuse stops
    # with the file, line and column; skip drops the row (train and score never cut a
    # window across it); fill carries the channel's last value forward (rows before its
    # first value are dropped). See streamer.data.
    missing: MissingPolicy = "refuse"


class Config(_Section):
    """The whole configuration file."""

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    csv: CsvConfig = Field(default_factory=CsvConfig)
    novelty: NoveltyConfig = Field(default_factory=NoveltyConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def redacted(self) -> dict[str, Any]:
        """A JSON-friendly dump with every secret masked, safe to print or log."""
        data = self.model_dump(mode="json")
        client = data["kafka"]["client"]
        for key in list(client):
            if is_secret_client_key(key):  # held as SecretStr already; masked in any case
                client[key] = "**********"
        return data


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.yaml)"
        elif "input" in err and err["type"] not in {"missing"}:
            shown = err["input"]
            if not isinstance(shown, dict | list):
                msg = f"{msg} (got {shown!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Validate a mapping (as read from YAML) into a Config, or raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: top level must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


ENV_PREFIX = "STREAMER__"
"""``STREAMER__SECTION__KEY=value`` in the environment overrides ``section.key``."""


def _set(data: dict[str, Any], dotted: str, raw: str, origin: str) -> None:
    """Set ``section.key`` (any depth) to ``raw`` read as YAML (``8``, ``true``, ``[a, b]``)."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{origin}: {dotted!r} is not section.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: {dotted}: not a valid value: {exc}") from exc
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: Path | str | None,
    *,
    sets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate a YAML config file; ConfigError names the file, key and reason.

    ``path`` None: the built-in defaults. Then, in this order, ``STREAMER__SECTION__KEY``
    variables of ``env`` (default: the process environment) and ``sets``
    (``section.key=value``, as ``--set`` gives them) override single keys. A relative
    ``model.path`` or ``kafka.state_snapshot_dir`` written in the file is relative to the
    file's folder.
    """
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return parse_config(data, source)
        for section, key in (("model", "path"), ("kafka", "state_snapshot_dir")):
            part = data.get(section)
            if isinstance(part, dict) and isinstance(part.get(key), str):
                written = Path(part[key])
                if not written.is_absolute():
                    part[key] = str(path.parent / written)
    environment = os.environ if env is None else env
    for name in sorted(environment):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set(data, dotted, environment[name], f"environment {name}")
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(data, key.strip(), raw, f"--set {key.strip()}")
    return parse_config(data, source)
