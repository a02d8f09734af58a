"""Topic checks at start-up: every topic the daemon uses exists, or is created when configured.

The state topic (per-sensor threshold and alert state) is compacted and has as
many partitions as the input topic: state for input partition p lives in state
partition p, so whoever owns p restores it by reading one partition.
"""

from __future__ import annotations

import time
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
    "admin_client",
    "connected_admin",
    "ensure_topics",
    "message_limits",
    "partition_count",
]

log = structlog.get_logger(__name__)

_TIMEOUT_S = 30.0
DEFAULT_MESSAGE_MAX_BYTES = 1_048_588
"""A topic's ``max.message.bytes`` when its configuration cannot be read (the broker default)."""
STATE_TOPIC_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}


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


def admin_client(cfg: KafkaConfig, causes: _Causes | None = None) -> AdminClient:
    """An AdminClient on the configured cluster, its log routed through structlog."""
    conf: dict[str, Any] = {**cfg.librdkafka(), "bootstrap.servers": cfg.bootstrap_servers}
    # librdkafka's own lines through structlog, not raw to stderr (delivered on poll).
    conf["logger"] = client_logger()
    if causes is not None:
        conf["error_cb"] = causes
    # Consumer/producer-only settings make the admin client warn; drop the obvious ones.
    for key in list(conf):
        if key.startswith(("enable.auto", "auto.offset", "partition.assignment", "acks")):
            del conf[key]
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
        futures = admin.create_topics(specs, operation_timeout=timeout_s, request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as exc:
                # Another instance may have created it at the same moment: fine.
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaError(f"cannot create topic {name}: {exc}") from exc
            log.info("topic_created", topic=name)
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
