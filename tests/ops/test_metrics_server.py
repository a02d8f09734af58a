"""The metrics HTTP server under hostile clients, on real sockets: idle and half-open
connections, early disconnects, overload. Threads stay bounded, scrapes keep answering,
and every client failure is one structured line, never a traceback."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.client import RemoteDisconnected
from typing import ClassVar

import pytest

from streamer.httpserver import BoundedHTTPServer, RequestHandler
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.ratelimit import RateLimiter
from tests.helpers import CapturedLog, Timeout
from tests.ops.helpers import http_get, scrape

REQUEST = b"GET / HTTP/1.0\r\nHost: test\r\n\r\n"


@pytest.fixture
def captured() -> CapturedLog:
    return CapturedLog()


def _metrics_server(captured: CapturedLog, **kwargs: float) -> tuple[MetricsServer, str, int]:
    health = Health(stall_after_s=30.0)
    metrics = Metrics()
    metrics.track_health(health)
    server = MetricsServer(
        metrics.registry, health, "127.0.0.1", 0, logger=captured.logger, **kwargs
    )
    host, port = server.start()
    return server, host, port


def _connect(host: str, port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection((host, port), timeout=10) for _ in range(n)]


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed or impatient client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout_s`` (EOF or a reset)."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "Traceback" not in text and "Error" not in text, text[-2000:]


class TestIdleConnections:
    def test_a_scrape_answers_while_300_idle_connections_are_held(
        self, captured: CapturedLog, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Connections that never send cost no thread, and a scrape beside them answers at once."""
        # A timeout far beyond the test's length: every idle connection is still held.
        server, host, port = _metrics_server(captured, request_timeout_s=60.0)
        threads_before = threading.active_count()
        idle = _connect(host, port, 300)
        try:
            time.sleep(0.3)  # let the server accept them all
            started = time.monotonic()
            values = scrape(f"http://{host}:{port}/metrics")
            elapsed = time.monotonic() - started
            assert values["process_resident_memory_bytes"] > 0
            assert elapsed < 2.0, f"scrape took {elapsed:.2f}s beside 300 idle connections"
            assert threading.active_count() <= threads_before
            # Still held: nothing was dropped to make room.
            assert not any(_closed_by_peer(s, 0.01) for s in idle[:20])
            assert http_get(f"http://{host}:{port}/healthz")[0] == 200
        finally:
            for s in idle:
                s.close()
            server.close()
        _no_traceback(capfd)

    def test_idle_connections_are_closed_after_the_timeout(
        self, captured: CapturedLog, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A connection with no complete request is closed request_timeout_s after connecting."""
        server, host, port = _metrics_server(captured, request_timeout_s=0.5)
        threads_before = threading.active_count()
        try:
            started = time.monotonic()
            idle = _connect(host, port, 30)
            half = socket.create_connection((host, port), timeout=10)
            half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            assert all(_closed_by_peer(s, 5.0) for s in [*idle, half])
            elapsed = time.monotonic() - started
            assert 0.45 < elapsed < 5.0  # the last one connected after `started`
            assert threading.active_count() <= threads_before
            lines = captured.wait_for("metrics_client_error", Timeout(2))
            assert {e["error"] for e in lines} == {"RequestTimeout"}
            # 31 timeouts, at most 5 lines a minute (the rate limit): the log is not flooded.
            assert len(captured.events("metrics_client_error")) == 5
            assert all(
                e["level"] == "warning" and e["peer"].startswith("127.0.0.1:") for e in lines
            )
            assert http_get(f"http://{host}:{port}/readyz")[0] == 503  # still answering
        finally:
            server.close()
        _no_traceback(capfd)

    def test_beyond_max_waiting_the_oldest_connection_is_closed(
        self, captured: CapturedLog
    ) -> None:
        """A flood of idle connections evicts the oldest rather than turning new clients away."""
        server = BoundedHTTPServer(_Slow, "127.0.0.1", 0, max_waiting=3, logger=captured.logger)
        host, port = server.start()
        try:
            first = socket.create_connection((host, port), timeout=10)
            time.sleep(0.1)
            others = _connect(host, port, 3)
            assert _closed_by_peer(first, 3.0)
            assert not any(_closed_by_peer(s, 0.05) for s in others)
            (line,) = captured.wait_for("http_client_error", Timeout(2))
            assert line["error"] == "Evicted"
            assert line["peer"] == f"127.0.0.1:{first.getsockname()[1]}"
        finally:
            server.close()


class _Slow(RequestHandler):
    """Answers 4 MB (more than any socket buffer holds) once the test releases it."""

    release: ClassVar[threading.Event]
    entered: ClassVar[threading.Event]

    def do_GET(self) -> None:  # noqa: N802 (http.server dispatches on this name)
        self.entered.set()
        assert self.release.wait(10)
        self.send_response(200)
        self.end_headers()
        for _ in range(64):
            self.wfile.write(b"x" * 65536)


class _Broken(RequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server dispatches on this name)
        raise ValueError("a bug in the handler")


@pytest.fixture
def slow() -> Iterator[type[_Slow]]:
    """A ``_Slow`` with events of its own; released at the end whatever the test did."""

    class Once(_Slow):
        release = threading.Event()
        entered = threading.Event()

    yield Once
    Once.release.set()


class TestEarlyDisconnect:
    def test_a_client_reset_mid_request_is_one_line_and_no_traceback(
        self, captured: CapturedLog, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Half a request then an RST: one metrics_client_error naming the peer, nothing printed."""
        server, host, port = _metrics_server(captured)
        try:
            client = socket.create_connection((host, port), timeout=10)
            peer = f"127.0.0.1:{client.getsockname()[1]}"
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.1)
            _reset(client)
            (line,) = captured.wait_for("metrics_client_error", Timeout(5))
            assert line["peer"] == peer and line["level"] == "warning"
            assert line["error"] in {"ConnectionResetError", "IncompleteRequest"}
            time.sleep(0.2)
            assert len(captured.events("metrics_client_error")) == 1
            assert scrape(f"http://{host}:{port}/metrics")  # unaffected
        finally:
            server.close()
        _no_traceback(capfd)

    def test_a_client_gone_before_the_answer_is_one_line_and_no_traceback(
        self, captured: CapturedLog, capfd: pytest.CaptureFixture[str], slow: type[_Slow]
    ) -> None:
        """The answer's write fails (the BrokenPipeError of the issue): one line, no traceback."""
        server = BoundedHTTPServer(slow, "127.0.0.1", 0, logger=captured.logger)
        host, port = server.start()
        try:
            client = socket.create_connection((host, port), timeout=10)
            peer = f"127.0.0.1:{client.getsockname()[1]}"
            client.sendall(REQUEST)
            assert slow.entered.wait(5)
            _reset(client)
            slow.release.set()
            (line,) = captured.wait_for("http_client_error", Timeout(5))
            assert line["error"] in {"BrokenPipeError", "ConnectionResetError"}
            assert line["peer"] == peer
            time.sleep(0.2)
            assert len(captured.events()) == 1
        finally:
            server.close()
        _no_traceback(capfd)

    def test_a_failing_handler_is_one_error_line_and_no_traceback(
        self, captured: CapturedLog, capfd: pytest.CaptureFixture[str]
    ) -> None:
        server = BoundedHTTPServer(_Broken, "127.0.0.1", 0, logger=captured.logger)
        host, port = server.start()
        try:
            with pytest.raises(RemoteDisconnected):  # closed without an answer
                http_get(f"http://{host}:{port}/")
            (line,) = captured.wait_for("http_handler_failed", Timeout(5))
            assert line["level"] == "error" and "a bug in the handler" in line["error"]
        finally:
            server.close()
        _no_traceback(capfd)


class TestOverload:
    def test_with_the_queue_full_a_new_request_is_closed_at_once(
        self, captured: CapturedLog, slow: type[_Slow]
    ) -> None:
        """One worker busy, one request queued: the next is closed, not given a thread."""
        server = BoundedHTTPServer(
            slow, "127.0.0.1", 0, workers=1, queue_size=1, logger=captured.logger
        )
        host, port = server.start()
        threads = threading.active_count()
        try:
            busy, queued, extra = _connect(host, port, 3)
            busy.sendall(REQUEST)
            assert slow.entered.wait(5)
            queued.sendall(REQUEST)
            time.sleep(0.2)
            extra.sendall(REQUEST)
            assert _closed_by_peer(extra, 2.0)
            (line,) = captured.wait_for("http_client_error", Timeout(2))
            assert line["error"] == "Overloaded"
            assert threading.active_count() == threads
            slow.release.set()
            for s in (busy, queued):
                s.settimeout(10)
                assert s.recv(64).startswith(b"HTTP/1.0 200")
                s.close()
        finally:
            server.close()


class TestLimits:
    def test_rejects_bad_limits(self) -> None:
        with pytest.raises(ValueError, match="workers"):
            BoundedHTTPServer(_Broken, "127.0.0.1", 0, workers=0)
        with pytest.raises(ValueError, match="timeouts"):
            BoundedHTTPServer(_Broken, "127.0.0.1", 0, request_timeout_s=0)

    def test_client_error_lines_follow_the_rate_limit(self, captured: CapturedLog) -> None:
        """The limiter decides, per error kind, which lines are written."""
        server = BoundedHTTPServer(
            _Broken, "127.0.0.1", 0, limiter=RateLimiter(burst=2), logger=captured.logger
        )
        for i in range(5):
            server.client_error("RequestTimeout", ("127.0.0.1", 1000 + i), "idle")
        server.client_error("Evicted", ("::1", 7, 0, 0), "full")
        lines = captured.events("http_client_error")
        assert [(e["error"], e["peer"]) for e in lines] == [
            ("RequestTimeout", "127.0.0.1:1000"),
            ("RequestTimeout", "127.0.0.1:1001"),
            ("Evicted", "[::1]:7"),
        ]
