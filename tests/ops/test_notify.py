"""The sd_notify client and the health-gated watchdog, against real AF_UNIX sockets."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from streamer.notify import Notifier, Watchdog, watchdog_interval_s
from tests.helpers import Timeout
from tests.ops.helpers import NotifyListener, notify_listener


class TestNotifier:
    """Messages reach the socket named by NOTIFY_SOCKET, path or abstract."""

    def test_abstract_namespace(self) -> None:
        """An '@' address is the abstract namespace; fields arrive in one datagram."""
        with notify_listener() as listener:
            notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
            assert notifier.enabled
            assert notifier.ready("consuming\nsensors")
            got = listener.read(2.0, count=1)
            assert got == [{"READY": "1", "STATUS": "consuming sensors"}]
            notifier.close()

    def test_filesystem_path(self) -> None:
        """A path address works too (the usual /run/systemd/notify)."""
        # A short directory: AF_UNIX paths are limited to 107 bytes.
        folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
        try:
            listener = NotifyListener(os.path.join(folder, "notify"))
            notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
            notifier.stopping()
            notifier.watchdog()
            assert listener.read(2.0, count=2) == [{"STOPPING": "1"}, {"WATCHDOG": "1"}]
            listener.close()
        finally:
            shutil.rmtree(folder)

    def test_reloading_carries_monotonic_time(self) -> None:
        """RELOADING=1 comes with MONOTONIC_USEC, as systemd's reload protocol asks."""
        with notify_listener() as listener:
            Notifier({"NOTIFY_SOCKET": listener.env_value}).reloading()
            (fields,) = listener.read(2.0, count=1)
            assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0

    def test_without_socket_is_a_no_op(self) -> None:
        """Outside systemd every call returns False and nothing fails."""
        notifier = Notifier({})
        assert not notifier.enabled
        assert not notifier.ready() and not notifier.watchdog()

    def test_send_failure_does_not_raise(self) -> None:
        """A vanished socket makes notify return False; the daemon carries on."""
        listener = NotifyListener()
        notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
        listener.close()
        assert notifier.watchdog() is False
        assert notifier.status("still running") is False


class TestWatchdogInterval:
    """WATCHDOG_USEC and WATCHDOG_PID are read as sd_watchdog_enabled(3) does."""

    def test_interval(self) -> None:
        """WATCHDOG_USEC in microseconds becomes seconds; absent or zero means none."""
        assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
        assert watchdog_interval_s({}) is None
        assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
        assert watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None

    def test_pid_must_be_ours(self) -> None:
        """A WATCHDOG_PID of another process means the watchdog is not for us."""
        env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
        assert watchdog_interval_s(env) == 1.0
        assert watchdog_interval_s({**env, "WATCHDOG_PID": "1"}) is None


class TestWatchdog:
    """Pings flow every half interval while healthy and stop while not."""

    def test_pings_only_while_healthy(self) -> None:
        """Unhealthy: no WATCHDOG=1 for several periods; healthy again: pings resume."""
        healthy = threading.Event()
        healthy.set()
        with notify_listener() as listener:
            notifier = Notifier({"NOTIFY_SOCKET": listener.env_value})
            dog = Watchdog(notifier, 0.2, healthy.is_set).start()
            try:
                assert dog.period_s == 0.1
                assert len(listener.read(0.55)) >= 3
                healthy.clear()
                listener.read(0.15)  # a ping decided just before the flip may still land
                assert listener.read(0.5) == []
                healthy.set()
                listener.wait_for("WATCHDOG", Timeout(2))
            finally:
                dog.stop()
