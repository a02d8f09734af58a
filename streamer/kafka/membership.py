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
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any

import structlog

from streamer.config import KafkaConfig
from streamer.errors import ConfigError

__all__ = [
    "HEARTBEAT_INTERVAL_MS",
    "SESSION_TIMEOUT_MS",
    "Membership",
    "classic",
    "session_defaults",
]

log = structlog.get_logger(__name__)

# The broker's default group.min.session.timeout.ms: the shortest session it accepts.
SESSION_TIMEOUT_MS = 6000
# A sixth of the session: a rebalance (a member joining or leaving) reaches the others
# at their next heartbeat, and five heartbeats may be lost before the session ends.
HEARTBEAT_INTERVAL_MS = 1000
# Daemons of one group on one host that get an automatic id; more run without one.
_SLOTS = 64
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

    def release(self) -> None:
        """Let another daemon (or this one's successor) take the id."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
