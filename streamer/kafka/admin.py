"""Topic checks at start-up: every topic the daemon uses exists, or is created when configured.

The state topic (per-sensor threshold and alert state) is compacted and has as
many partitions as the input topic: state for input partition p lives in state
partition p, so whoever owns p restores it by reading one partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]
from confluent_kafka.cimpl import NewTopic

from streamer.config import KafkaConfig, TopicsConfig
from streamer.errors import KafkaError
from streamer.kafka.clientlog import client_logger

__all__ = [
    "DEFAULT_MESSAGE_MAX_BYTES",
    "TAIL_LIMIT_MS",
    "TopicSetting",
    "admin_client",
    "alter_topic_command",
    "connected_admin",
    "ensure_input_topic",
    "ensure_topics",
    "message_limits",
    "partition_count",
    "state_topic_findings",
]

log = structlog.get_logger(__name__)

_TIMEOUT_S = 30.0
DEFAULT_MESSAGE_MAX_BYTES = 1_048_588
"""A topic's ``max.message.bytes`` when its configuration cannot be read (the broker default)."""
# A restore reads every version of a sensor's state the broker has not compacted yet. The
# active segment is never compacted, and by default it rolls at 1 GiB or after 7 days, and
# a rolled segment waits until half the log is dirty. Measured at 10,000 sensors (20,000
# samples/s, 2 cores, restarts every 3 minutes): with those defaults the tail grew by
# 80,000 records a minute and restores grew with uptime until one no longer finished;
# compacting any record older than a minute (max.compaction.lag.ms also rolls the active
# segment after that long), with segments rolled every minute and cleaned at 1 % dirty,
# the records read on restart stayed between 40,000 and 93,000.
STATE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "0",
    "max.compaction.lag.ms": "60000",
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.01",
}
# An existing state topic whose uncompacted tail can span longer than this is named at
# start-up (state_topic_unbounded), with the command that bounds it.
TAIL_LIMIT_MS = 3_600_000
_KAFKA_DEFAULTS = {
    "cleanup.policy": "delete",
    "segment.ms": "604800000",
    "max.compaction.lag.ms": "9223372036854775807",
}


# Client errors that no retry mends: the credentials or the TLS set-up are wrong.
_CAUSES = {
    RdKafkaError._AUTHENTICATION: "authentication failed",
    RdKafkaError.SASL_AUTHENTICATION_FAILED: "authentication failed",
    RdKafkaError._SSL: "TLS failed",
}
# How often a start-up metadata request looks for such an error while it waits.
_CAUSE_POLL_S = 0.5


class _Causes:
    """The admin client's error callback: keeps the first error that names a cause."""

    def __init__(self) -> None:
        self.first: str | None = None

    def __call__(self, err: Any) -> None:
        what = _CAUSES.get(err.code()) if isinstance(err, RdKafkaError) else None
        if what is not None and self.first is None:
            self.first = f"{what}: {err.str()}"


def admin_client(
    cfg: KafkaConfig, causes: _Causes | None = None, *, quiet: bool = False
) -> AdminClient:
    """An AdminClient on the configured cluster, its log routed through structlog.

    ``quiet``: librdkafka logs only critical lines, for a client whose every failure the
    caller reports itself (a refused connection is one ``FAIL`` line per attempt).
    """
    conf: dict[str, Any] = {**cfg.librdkafka("admin"), "bootstrap.servers": cfg.bootstrap_servers}
    if quiet:
        conf["log_level"] = 2  # syslog's LOG_CRIT
    # librdkafka's own lines through structlog, not raw to stderr (delivered on poll).
    conf["logger"] = client_logger()
    if causes is not None:
        conf["error_cb"] = causes
    return AdminClient(conf)


def connected_admin(cfg: KafkaConfig, timeout_s: float = _TIMEOUT_S) -> AdminClient:
    """An AdminClient that has reached the cluster and been let in.

    Raises:
        KafkaError: credentials or TLS refused (named, within a second or so), or the
            cluster not reached within ``timeout_s``.
    """
    causes = _Causes()
    admin = admin_client(cfg, causes)
    _list_topics(admin, causes, cfg, timeout_s)
    return admin


def _list_topics(admin: AdminClient, causes: _Causes, cfg: KafkaConfig, timeout_s: float) -> Any:
    """Cluster metadata; fails at once, naming it, when credentials or TLS are refused.

    A refused login or certificate otherwise shows only as a metadata timeout ("broker
    transport failure") after ``timeout_s``: the admin client reports the cause through
    its error callback, served by ``poll``, so the wait is cut into short requests.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(min(_CAUSE_POLL_S, left), 0.01))
        except KafkaException as exc:
            admin.poll(0)
            if causes.first is not None:
                raise KafkaError(_explain(cfg, causes.first)) from exc
            if left <= _CAUSE_POLL_S:
                raise KafkaError(
                    f"cannot reach Kafka at {cfg.bootstrap_servers} to list topics: {exc}"
                ) from exc


def _explain(cfg: KafkaConfig, cause: str) -> str:
    """The refusal, with the settings it concerns (never a secret's value)."""
    client = cfg.librdkafka()
    said = [
        f"{k}={client[k]}"
        for k in ("security.protocol", "sasl.mechanisms", "sasl.username", "ssl.ca.location")
        if k in client
    ]
    return f"Kafka at {cfg.bootstrap_servers} refused the connection: {cause}" + (
        f" (with {', '.join(said)})" if said else ""
    )


def partition_count(cfg: KafkaConfig, topic: str, timeout_s: float = _TIMEOUT_S) -> int:
    """Number of partitions of ``topic`` (KafkaError if it does not exist)."""
    try:
        meta = admin_client(cfg).list_topics(topic, timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise KafkaError(f"cannot read metadata of {topic}: {exc}") from exc
    if meta is None or meta.error is not None:
        raise KafkaError(f"topic {topic} does not exist")
    return len(meta.partitions)


def ensure_topics(cfg: KafkaConfig, topics: TopicsConfig, timeout_s: float = _TIMEOUT_S) -> int:
    """Check (or create) every topic; returns the input topic's partition count.

    Missing topics are created when ``kafka.create_topics`` is set (input, scores,
    alerts and DLQ with ``kafka.topic_partitions`` partitions; the state topic
    compacted, with the input's count); otherwise KafkaError names them all.
    """
    causes = _Causes()
    admin = admin_client(cfg, causes)
    meta = _list_topics(admin, causes, cfg, timeout_s)
    existing = {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}
    wanted = [topics.input, topics.scores, topics.alerts, topics.dlq, topics.state]
    missing = [t for t in dict.fromkeys(wanted) if t not in existing]
    if missing and not cfg.create_topics:
        raise KafkaError(
            f"topic(s) {', '.join(missing)} do not exist on {cfg.bootstrap_servers}, or are "
            "not visible to this user (a cluster with ACLs lists only the topics it may "
            "DESCRIBE): create them, grant access, or set kafka.create_topics: true"
        )
    if missing:
        n_input = existing.get(topics.input, cfg.topic_partitions)
        specs = []
        for name in missing:
            if name == topics.state:
                specs.append(NewTopic(name, num_partitions=n_input, config=STATE_TOPIC_CONFIG))
            else:
                specs.append(NewTopic(name, num_partitions=cfg.topic_partitions))
        _create_topics(admin, specs, timeout_s)
        meta = admin.list_topics(timeout=timeout_s)
        existing = {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}
    n_input = existing[topics.input]
    n_state = existing.get(topics.state, 0)
    if n_state < n_input:
        raise KafkaError(
            f"state topic {topics.state} has {n_state} partitions, fewer than the "
            f"{n_input} of input topic {topics.input}; it needs at least as many"
        )
    return n_input


def _create_topics(admin: AdminClient, specs: list[NewTopic], timeout_s: float) -> None:
    """Create ``specs``; one that another client created meanwhile is fine."""
    futures = admin.create_topics(specs, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as exc:
            # Another instance may have created it at the same moment: fine.
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise KafkaError(f"cannot create topic {name}: {exc}") from exc
        log.info("topic_created", topic=name)


def ensure_input_topic(cfg: KafkaConfig, topic: str, timeout_s: float = _TIMEOUT_S) -> int:
    """Check (or create) the input topic before writing samples to it; its partition count.

    What ``ensure_topics`` does for the input alone, for a producer (``streamer
    produce``): created with ``kafka.topic_partitions`` partitions when
    ``kafka.create_topics`` is set (the daemon later creates the state topic with as
    many). Fails like ``ensure_topics``: the cluster not reached within ``timeout_s``
    ("cannot reach Kafka at ..."), credentials or TLS refused, or the topic missing.
    """
    causes = _Causes()
    # Quiet: a command line tool says "cannot reach Kafka at ..." once, not once per retry.
    admin = admin_client(cfg, causes, quiet=True)
    meta = _list_topics(admin, causes, cfg, timeout_s).topics.get(topic)
    if meta is not None and meta.error is None:
        return len(meta.partitions)
    if not cfg.create_topics:
        raise KafkaError(
            f"topic {topic} does not exist on {cfg.bootstrap_servers}, or is not visible to "
            "this user: create it, grant access, or set kafka.create_topics: true"
        )
    _create_topics(admin, [NewTopic(topic, num_partitions=cfg.topic_partitions)], timeout_s)
    return cfg.topic_partitions


@dataclass(frozen=True, slots=True)
class TopicSetting:
    """A topic setting that should change: its value now, the value wanted, and why."""

    name: str
    value: str
    wanted: str
    why: str


def state_topic_findings(
    cfg: KafkaConfig, topic: str, timeout_s: float = _TIMEOUT_S
) -> list[TopicSetting] | None:
    """Settings of the state topic that let its uncompacted tail (and restores) grow.

    None when the topic's configuration cannot be read (DescribeConfigs is not among
    the grants the daemon needs).
    """
    admin = admin_client(cfg)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        entries = admin.describe_configs([res], request_timeout=timeout_s)[res].result(
            timeout=timeout_s
        )
    except KafkaException:
        return None

    def value(key: str) -> str:
        entry = entries.get(key)
        found = entry.value if entry is not None else None
        return str(found) if found is not None else _KAFKA_DEFAULTS[key]

    out = []
    policy = value("cleanup.policy")
    if "compact" not in policy.split(","):
        out.append(
            TopicSetting(
                "cleanup.policy",
                policy,
                "compact",
                "without compaction every version of each sensor's state is kept until "
                "retention deletes it, the latest included",
            )
        )
    # For a compacted topic the broker rolls the active segment after the lesser of the two.
    try:
        span = min(int(value("segment.ms")), int(value("max.compaction.lag.ms")))
    except ValueError:
        span = TAIL_LIMIT_MS + 1
    if span > TAIL_LIMIT_MS:
        why = (
            f"the uncompacted tail can span {span / 3_600_000:,.1f} h of state records, all "
            "read by every restart and takeover"
        )
        for key in ("max.compaction.lag.ms", "segment.ms"):
            out.append(TopicSetting(key, value(key), STATE_TOPIC_CONFIG[key], why))
    return out


def alter_topic_command(bootstrap: str, topic: str, settings: list[TopicSetting]) -> str:
    """The ``kafka-configs.sh`` command that sets ``settings`` on ``topic``."""
    pairs = ",".join(f"{s.name}={s.wanted}" for s in settings)
    return (
        f"kafka-configs.sh --bootstrap-server {bootstrap} --command-config admin.properties "
        f"--alter --entity-type topics --entity-name {topic} --add-config {pairs}"
    )


def message_limits(
    cfg: KafkaConfig, topics: list[str], timeout_s: float = _TIMEOUT_S
) -> dict[str, int]:
    """Each topic's ``max.message.bytes``: the largest record batch the broker accepts.

    A topic whose configuration cannot be read (no DescribeConfigs permission, which the
    daemon does not require) gets the broker default, said once at start-up: a refusal
    for size is resized anyway (``Sink.produce(shrink=...)``).
    """
    admin = admin_client(cfg)
    names = list(dict.fromkeys(topics))
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    out = dict.fromkeys(names, DEFAULT_MESSAGE_MAX_BYTES)
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
    except KafkaException as exc:
        log.info("topic_limits_unknown", topics=names, error=str(exc))
        return out
    for res, fut in futures.items():
        try:
            entry = fut.result(timeout=timeout_s).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                out[res.name] = int(entry.value)
        except (KafkaException, ValueError) as exc:
            log.info("topic_limits_unknown", topics=[res.name], error=str(exc))
    return out
