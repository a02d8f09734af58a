"""Start-up checks against the cluster, before the daemon consumes anything.

Each says what is wrong and how to fix it: the state topic's settings (a warning),
the grants the daemon needs (an error naming the ACL command), and the output
topics' message limits (which size the producer's batches and the dead letters).
"""

from __future__ import annotations

import structlog

from streamer.config import KafkaConfig, TopicsConfig
from streamer.deadletter import DEAD_LETTER_OVERHEAD
from streamer.errors import KafkaError
from streamer.kafka.access import check_access
from streamer.kafka.admin import alter_topic_command, message_limits, state_topic_findings

__all__ = ["check_state_topic", "output_limits", "require_grants"]

log = structlog.get_logger("streamer.daemon")

_PRODUCER_MAX = 1_000_000  # librdkafka's message.max.bytes


def check_state_topic(kafka: KafkaConfig, topic: str) -> None:
    """Warn, naming the settings and the command, when the state tail can grow unbounded."""
    findings = state_topic_findings(kafka, topic, timeout_s=10.0)
    if findings is None:
        log.info("state_topic_settings_unknown", topic=topic)
    elif findings:
        log.warning(
            "state_topic_unbounded",
            topic=topic,
            settings={f.name: {"now": f.value, "wanted": f.wanted} for f in findings},
            why=sorted({f.why for f in findings}),
            command=alter_topic_command(kafka.bootstrap_servers, topic, findings),
        )


def require_grants(kafka: KafkaConfig, topics: TopicsConfig) -> None:
    """Fail, naming the grant, when an output or the state is not writable.

    Without WRITE on an output topic (or READ and WRITE on the state topic) the first
    record there fails, perhaps hours later at the first alert; the broker says now.
    A refused input or group is only logged: the daemon stays up, not ready, and
    consumes once the grant arrives (``ops.AccessWatch``).
    """
    try:
        grants = check_access(kafka, topics, timeout_s=10.0)
    except KafkaError as exc:
        log.info("kafka_access_unchecked", error=str(exc))
        return
    missing = [g for g in grants if g.held is False]
    if not missing:
        return
    user = kafka.librdkafka().get("sasl.username")
    principal = f"User:{user}" if user else "User:<this client's principal>"
    said = [f"{g.operation} on {g.resource_type} {g.name} ({g.role})" for g in missing]
    commands = [g.acl_command(principal, kafka.bootstrap_servers) for g in missing]
    log.error("kafka_access_missing", missing=said, principal=principal, grant=commands)
    # Only READ on the input and on the group may wait for their grant (not ready).
    waits = [g.operation == "READ" and g.role in ("input", "group") for g in missing]
    fatal = [s for s, w in zip(said, waits, strict=True) if not w]
    if fatal:
        raise KafkaError(
            f"{principal} lacks {'; '.join(fatal)} on {kafka.bootstrap_servers}; "
            f"grant it: {' && '.join(commands)}"
        )


def output_limits(kafka: KafkaConfig, topics: TopicsConfig) -> tuple[int, int]:
    """The smallest message limit of the output topics, and the bytes a dead letter keeps.

    A dead letter keeps the original bytes, cut to what both the DLQ topic's
    ``max.message.bytes`` and the producer's ``message.max.bytes`` accept.
    """
    t = topics
    limits = message_limits(kafka, [t.scores, t.alerts, t.dlq, t.state])
    producer_max = int(kafka.librdkafka().get("message.max.bytes", _PRODUCER_MAX))
    dlq = min(limits[t.dlq], producer_max)
    dlq_value_bytes = max(0, dlq - DEAD_LETTER_OVERHEAD - dlq // 200)
    log.info("output_limits", topics=limits, dead_letter_value_bytes=dlq_value_bytes)
    return min(*limits.values(), producer_max), dlq_value_bytes
