"""``streamer check-access``: does the configured user hold every permission the daemon needs?

The broker tells a client which operations it may perform on a topic or a group
(``include_authorized_operations``), so every permission is checked without
writing anything. The daemon needs, and is documented to need, exactly:

| resource | operations |
|---|---|
| input topic | READ, DESCRIBE |
| scores, alerts and DLQ topics | WRITE, DESCRIBE |
| state topic | READ, WRITE, DESCRIBE |
| the consumer group (``kafka.group_id``) | READ (implies DESCRIBE) |

DESCRIBE on a topic is implied by READ or WRITE in Kafka's authorizer; it is
listed because a topic the user may not describe is hidden from it, which the
daemon would otherwise report as a topic that does not exist. The idempotent
producer needs IDEMPOTENT_WRITE on the cluster, which Kafka 3+ implies from WRITE
on any topic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient  # type: ignore[attr-defined]

from streamer.config import KafkaConfig, TopicsConfig
from streamer.errors import KafkaError
from streamer.kafka.admin import connected_admin

__all__ = ["Grant", "Held", "check_access", "held_operations", "required_grants"]


@dataclass(frozen=True, slots=True)
class Grant:
    """One permission the daemon needs: a resource, an operation, and whether it is held."""

    resource_type: str  # "topic" or "group"
    name: str
    operation: str  # READ, WRITE, DESCRIBE
    role: str  # what the daemon uses it for
    held: bool | None = None  # None: could not be checked
    detail: str = ""

    def acl_command(self, principal: str, bootstrap: str) -> str:
        """The ``kafka-acls.sh`` command that grants it."""
        kind = "--topic" if self.resource_type == "topic" else "--group"
        return (
            f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config admin.properties "
            f"--add --allow-principal {principal} --operation {self.operation.capitalize()} "
            f"{kind} {self.name}"
        )


def required_grants(topics: TopicsConfig, group_id: str) -> list[Grant]:
    """Every permission the daemon needs, in the order check-access reports them."""
    need: list[tuple[str, str, tuple[str, ...]]] = [
        (topics.input, "input", ("READ", "DESCRIBE")),
        (topics.scores, "scores", ("WRITE", "DESCRIBE")),
        (topics.alerts, "alerts", ("WRITE", "DESCRIBE")),
        (topics.dlq, "dead letters", ("WRITE", "DESCRIBE")),
        (topics.state, "state", ("READ", "WRITE", "DESCRIBE")),
    ]
    out: list[Grant] = []
    seen: set[tuple[str, str]] = set()
    for name, role, ops in need:
        for op in ops:
            if (name, op) not in seen:
                seen.add((name, op))
                out.append(Grant("topic", name, op, role))
    out.append(Grant("group", group_id, "READ", "group"))
    return out


def _operations(ops: Iterable[Any] | None) -> set[str] | None:
    if ops is None:
        return None
    names = {op.name for op in ops if isinstance(op, AclOperation)}
    if "ALL" in names:
        names |= {"READ", "WRITE", "DESCRIBE"}
    # Kafka's authorizer implies DESCRIBE from READ, WRITE, DELETE and ALTER.
    if names & {"READ", "WRITE", "DELETE", "ALTER"}:
        names.add("DESCRIBE")
    return names


# Answers of a coordinator that is not ready yet (a fresh cluster creates the offsets
# topic on the first group request): asked again until the timeout, not a refusal.
_NOT_READY = frozenset(
    {
        RdKafkaError.NOT_COORDINATOR,
        RdKafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        RdKafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)
_RETRY_S = 0.25

Held = dict[tuple[str, str], tuple[set[str] | None, str]]
"""(resource type, name) -> (operations the broker allows, or None: not reported; reason)."""


def _reason(exc: KafkaException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def held_operations(
    admin: AdminClient, topics: Sequence[str], group: str | None, timeout_s: float
) -> Held:
    """The operations the broker allows the caller on each topic and on the group.

    A topic the caller may not describe is reported as unknown or unauthorised: its
    operations are then the empty set, with the broker's answer as the reason.
    """
    deadline = time.monotonic() + timeout_s
    held: Held = {}
    names = list(dict.fromkeys(topics))
    if names:
        futures = admin.describe_topics(
            TopicCollection(names), include_authorized_operations=True, request_timeout=timeout_s
        )
        for name, fut in futures.items():
            try:
                desc = fut.result(timeout=timeout_s)
                held[("topic", name)] = (_operations(desc.authorized_operations), "")
            except KafkaException as exc:
                held[("topic", name)] = (set(), _reason(exc))
    while group is not None:
        left = max(deadline - time.monotonic(), 0.1)
        gfut = admin.describe_consumer_groups(
            [group], include_authorized_operations=True, request_timeout=left
        )[group]
        try:
            gdesc = gfut.result(timeout=left)
            held[("group", group)] = (_operations(gdesc.authorized_operations), "")
            break
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, RdKafkaError) else None
            if code in _NOT_READY and time.monotonic() + _RETRY_S < deadline:
                time.sleep(_RETRY_S)
                continue
            held[("group", group)] = (set(), _reason(exc))
            break
    return held


def check_access(cfg: KafkaConfig, topics: TopicsConfig, timeout_s: float = 15.0) -> list[Grant]:
    """Each required grant, with whether the configured user holds it.

    A refusal for one resource is a grant not held, with the broker's reason in
    ``detail``.

    Raises:
        KafkaError: the login or the certificate is refused (named at once), the
            cluster cannot be reached, or a request timed out after it was reached.
    """
    admin = connected_admin(cfg, timeout_s)
    grants = required_grants(topics, cfg.group_id)
    topic_names = [g.name for g in grants if g.resource_type == "topic"]
    try:
        held = held_operations(admin, topic_names, cfg.group_id, timeout_s)
    except KafkaException as exc:
        raise KafkaError(f"cannot check the grants on {cfg.bootstrap_servers}: {exc}") from exc
    out = []
    for g in grants:
        ops, detail = held[(g.resource_type, g.name)]
        ok = None if ops is None else g.operation in ops
        if ok is False and not detail:
            allowed = ", ".join(sorted(ops or ())) or "nothing"
            detail = f"the broker allows this user {allowed} on it"
        out.append(
            Grant(g.resource_type, g.name, g.operation, g.role, ok, detail if not ok else "")
        )
    return out
