"""How the daemon's consumer is a member of its group: protocol, session and static id.

A killed member's partitions stay unserved until the group gives them to someone.
Two things shorten that wait:

- The session timeout (classic protocol): the daemon sets 6 s, the broker's minimum
  (``group.min.session.timeout.ms``), instead of librdkafka's 45 s, unless
  ``kafka.client`` says otherwise. Heartbeats come from librdkafka's own thread, so a
  busy interpreter does not delay them.
- Static membership (``group.instance.id``, ``kafka.instance_id``): a restarted daemon
  with the same id takes its dead predecessor's place, and its partitions, at once,
  without waiting for the session to time out and without a rebalance.

Two live members with the same instance id fence each other (the broker refuses the
older one's requests; the daemon exits and, restarted, fences the other in turn). The
automatic id is therefore unique per daemon by construction: the host name, the
systemd unit the daemon runs in (if any), and the lowest free slot among the daemons of
the same group on this host (a lock file held while the daemon runs). An explicit id is
locked the same way, so a second daemon with it on the same host refuses to start.

A crashed static member keeps its partitions until its session ends, unless a member
with its id joins. A restarted daemon needs seconds to load before it can serve them,
so ``release_predecessor`` runs first, before anything heavy is imported: when the group
still holds a member with this daemon's id (its dead predecessor: a live one would hold
the lock), a stand-in joins as that member and leaves at once, handing the partitions to
the other members. The daemon joins on its own once loaded, and the group rebalances.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamer.config import KafkaConfig
from streamer.errors import ConfigError
from streamer.kafka.admin import admin_client
from streamer.kafka.clientlog import client_logger

__all__ = [
    "HEARTBEAT_INTERVAL_MS",
    "SESSION_TIMEOUT_MS",
    "Membership",
    "classic",
    "leave_group",
    "release_predecessor",
    "session_defaults",
]

log = structlog.get_logger(__name__)

# The broker's default group.min.session.timeout.ms: the shortest session it accepts.
SESSION_TIMEOUT_MS = 6000
# A sixth of the session: a rebalance (a member joining or leaving) reaches the others
# at their next heartbeat, and five heartbeats may be lost before the session ends.
HEARTBEAT_INTERVAL_MS = 1000
# How long a predecessor's release may take before start-up goes on without it (the
# session then ends it, 6 s by default).
_RELEASE_TIMEOUT_S = 5.0
# After unsubscribing: how long to wait for the partitions to be unassigned, and then
# for the LeaveGroup request (sent once they are) to go out before the client closes.
_UNASSIGN_WAIT_S = 5.0
_LEAVE_SEND_S = 0.3
# Daemons of one group on one host that get an automatic id; more run without one.
_SLOTS = 64
# A static member fenced by its own earlier registration gets a new client, at most once
# in this long: after an outage longer than its session librdkafka joins under a new
# member id while a request under the old one is in flight, and the answer to that is
# fatal (confluentinc/librdkafka#3437). Fenced again so soon: another member has the id.
_REJOIN_GUARD_S = 300.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def classic(client: dict[str, Any]) -> bool:
    """Whether these client settings use the classic group protocol (librdkafka's default)."""
    return str(client.get("group.protocol", "classic")).strip().lower() == "classic"


def session_defaults(client: dict[str, Any]) -> dict[str, Any]:
    """The daemon's session settings for a consumer with ``client``'s settings.

    None under the consumer protocol (KIP-848), where the session is the broker's
    (``group.consumer.session.timeout.ms``) and librdkafka refuses these settings; none
    when ``kafka.client`` sets the session timeout itself.
    """
    if not classic(client) or "session.timeout.ms" in client:
        return {}
    out: dict[str, Any] = {"session.timeout.ms": SESSION_TIMEOUT_MS}
    if "heartbeat.interval.ms" not in client:
        out["heartbeat.interval.ms"] = HEARTBEAT_INTERVAL_MS
    return out


def _systemd_unit() -> str | None:
    """The systemd service this process runs in, from its cgroup; None outside one."""
    try:
        text = Path("/proc/self/cgroup").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        last = line.rsplit("/", 1)[-1]
        if last.endswith(".service"):
            return last.removesuffix(".service")
    return None


def _lock_path(group: str, what: str) -> Path:
    digest = hashlib.sha256(f"{group}\0{what}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"streamer-member-{digest}.lock"


def _try_lock(path: Path) -> IO[bytes] | None:
    """The open, exclusively locked file; None when another process holds it."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


class Membership:
    """The consumer's static instance id (None: a dynamic member) and the lock that keeps it.

    The lock is held until ``release``; the kernel drops it when the process dies, so a
    restarted daemon finds its slot free again.
    """

    def __init__(self, cfg: KafkaConfig) -> None:
        self.instance_id: str | None = None
        self._lock: IO[bytes] | None = None
        self._group = cfg.group_id
        self._rejoined_at: float | None = None
        wanted = cfg.instance_id
        if wanted is None:
            return
        if wanted != "auto":
            self._lock = _try_lock(_lock_path(cfg.group_id, "id:" + wanted))
            if self._lock is None:
                raise ConfigError(
                    f"kafka.instance_id {wanted!r} is used by another daemon of group "
                    f"{cfg.group_id!r} on this host; two members with one id fence each "
                    "other: give each daemon its own (or 'auto')"
                )
            self.instance_id = wanted
            return
        host = socket.gethostname() or "localhost"
        unit = _systemd_unit()
        base = _UNSAFE.sub("_", f"{host}-{unit}" if unit else host)[:180]
        for slot in range(_SLOTS):
            self._lock = _try_lock(_lock_path(cfg.group_id, f"auto:{base}:{slot}"))
            if self._lock is not None:
                self.instance_id = f"{base}-{slot}"
                return
        log.warning(
            "static_membership_off",
            reason=f"{_SLOTS} daemons of group {cfg.group_id} run on this host already",
        )

    def fenced(self, fatal: str | None) -> bool:
        """Whether the client's fatal error is this static member fenced by another with
        its id (the client reports it as _FATAL: the fencing is told in the text only)."""
        return self.instance_id is not None and fatal is not None and "fenced" in fatal.lower()

    def may_rejoin(self) -> bool:
        """Whether a fenced member may take a new client now; if so, that counts as done."""
        now = time.monotonic()
        if self._rejoined_at is not None and now - self._rejoined_at < _REJOIN_GUARD_S:
            return False
        self._rejoined_at = now
        return True

    def conflict(self) -> str:
        """What a fencing that stands means, to add to the fatal error."""
        return (
            f" (another member of group {self._group} has this daemon's instance id "
            f"{self.instance_id!r}: give each daemon its own kafka.instance_id, or set it to null)"
        )

    def release(self) -> None:
        """Let another daemon (or this one's successor) take the id."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def release_predecessor(cfg: KafkaConfig, topic: str) -> list[int] | None:
    """Hand a dead predecessor's partitions to the group's other members, at once.

    Returns the partitions it held (the stand-in was assigned), or None when there was
    nothing to do: no static id, the consumer protocol (under which the broker refuses
    a new member with an id still in use, until the session ends), no such member in
    the group, or no answer within 5 s (logged: start-up goes on, and the session
    ends the dead member). Raises ConfigError only for an explicit ``kafka.instance_id``
    another daemon on this host holds, as the daemon's own consumer would.
    """
    client = cfg.librdkafka("consumer")
    if cfg.instance_id is None or not classic(client):
        return None
    membership = Membership(cfg)
    try:
        iid = membership.instance_id
        if iid is None or not _in_group(cfg, iid):
            return None
        return _stand_in(cfg, topic, client, iid)
    except (KafkaException, TimeoutError) as exc:
        log.warning(
            "predecessor_release_failed", instance_id=membership.instance_id, error=str(exc)
        )
        return None
    finally:
        membership.release()  # the daemon's consumer takes it again


def _in_group(cfg: KafkaConfig, instance_id: str) -> bool:
    """Whether the group has a member with this static id now."""
    admin = admin_client(cfg, quiet=True)
    futures = admin.describe_consumer_groups([cfg.group_id], request_timeout=_RELEASE_TIMEOUT_S)
    group = futures[cfg.group_id].result(_RELEASE_TIMEOUT_S)
    return any(m.group_instance_id == instance_id for m in group.members)


def _stand_in(cfg: KafkaConfig, topic: str, client: dict[str, Any], iid: str) -> list[int] | None:
    """Join as ``iid`` (taking the dead member's place and assignment), then leave."""
    started = time.monotonic()
    conf: dict[str, Any] = {
        **client,
        **session_defaults(client),
        "bootstrap.servers": cfg.bootstrap_servers,
        "group.id": cfg.group_id,
        "group.instance.id": iid,
        "client.id": "streamer-release",
        "partition.assignment.strategy": "cooperative-sticky",
        # Nothing is committed or read: the partitions are only handed on.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "logger": client_logger(),
    }
    assigned: list[TopicPartition] = []

    def on_assign(consumer: Consumer, parts: list[TopicPartition]) -> None:
        assigned.extend(parts)
        consumer.incremental_assign(parts)
        consumer.pause(parts)  # no fetch: the next owner reads from the commit

    consumer = Consumer(conf)
    try:
        consumer.subscribe([topic], on_assign=on_assign)
        deadline = started + _RELEASE_TIMEOUT_S
        while not assigned and time.monotonic() < deadline:
            consumer.poll(0.05)
        leave_group(consumer)
    finally:
        consumer.close()
    if not assigned:
        return None
    parts = sorted(tp.partition for tp in assigned if tp.topic == topic)
    log.info(
        "predecessor_released",
        instance_id=iid,
        partitions=parts,
        seconds=round(time.monotonic() - started, 3),
    )
    return parts


def leave_group(consumer: Consumer) -> None:
    """Make a static member leave its group now; the caller closes the consumer next.

    librdkafka sends no LeaveGroup when a static member closes (KIP-345: a restart is
    expected to take its place). Unsubscribing first does send one, once the partitions
    are unassigned, if the client is not closed before: so this serves the client until
    they are, and a moment more. The rebalance callbacks run in here; messages still
    queued are dropped (not committed: the next owner reads them again).
    """
    consumer.unsubscribe()
    deadline = time.monotonic() + _UNASSIGN_WAIT_S
    while consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.05)
    settle = time.monotonic() + _LEAVE_SEND_S
    while time.monotonic() < settle:
        consumer.poll(0.05)
