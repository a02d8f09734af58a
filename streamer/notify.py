"""A tiny sd_notify(3) client: READY, STATUS, RELOADING, STOPPING and the watchdog.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: an AF_UNIX
datagram socket, a filesystem path or, with a leading ``@``, a name in the
abstract namespace. Each datagram holds newline-separated ``KEY=value`` lines.
Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a no-op, so the
daemon calls these unconditionally.

With ``WatchdogSec=`` systemd also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``)
and kills the service unless ``WATCHDOG=1`` arrives within that interval.
``Watchdog`` pings every half interval from a thread, but only while a health
check passes: the daemon's check is "the main loop completed an iteration
recently", so a stuck loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

__all__ = ["Notifier", "Watchdog", "watchdog_interval_s"]

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            # e.g. "vsock:..." (systemd >= 253, for VMs): not needed on a host.
            log.warning("notify_socket_unsupported", notify_socket=raw)
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._lock = threading.Lock()  # the main loop and the watchdog thread both send
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured."""
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; False if not sent (never raises)."""
        if self._sock is None or self._address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with self._lock:
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            # systemd gone or the socket full: the service keeps working regardless.
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; ``ready()`` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started."""
        return self.notify("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(*_status(status))

    def watchdog(self) -> bool:
        """One watchdog keep-alive."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(status: str | None) -> list[str]:
    # One line: a newline would start a new (bogus) field.
    return [] if status is None else ["STATUS=" + " ".join(status.split())]


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd asked for, or None when there is none for this process."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # meant for another process (we were started by one that had it)
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Watchdog:
    """Sends WATCHDOG=1 every ``interval_s / 2`` while ``healthy()`` is true."""

    def __init__(self, notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._notifier = notifier
        self.period_s = interval_s / 2.0
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Start pinging (returns self)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop pinging (at shutdown: systemd's stop timeout takes over)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        withheld = False
        while not self._stop.wait(self.period_s):
            if self._healthy():
                self._notifier.watchdog()
                if withheld:
                    withheld = False
                    log.info("watchdog_resumed")
            elif not withheld:
                withheld = True
                log.warning("watchdog_withheld", reason="main loop made no progress")
