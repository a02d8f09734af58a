"""A small HTTP server for scrapes and probes that no client can exhaust.

``ThreadingHTTPServer`` spends a thread per connection and waits without a timeout
for the request: a thousand idle or half-open connections to the metrics port are
a thousand threads, releasing them all at once stalls every other thread of the
process on the GIL, and a client that leaves early prints a traceback into the
daemon's log. Here:

- One thread owns the listening socket and every connection until its request head
  (request line and headers) has arrived, reading without blocking through a
  selector. An idle or trickling client costs a file descriptor and a few bytes,
  never a thread, and is closed ``request_timeout_s`` after it connected.
- A complete request goes on a bounded queue to a fixed pool of worker threads that
  answer it with a socket timeout of ``io_timeout_s`` (a client that stops reading
  holds a worker that long at most). With the queue full, a new request is closed
  at once. With ``max_waiting`` connections still sending their heads, a new one
  closes the oldest.
- Every failure a client causes (a timeout, a reset, an early close, an overload)
  is one structured warning with the error and the peer, at most ``burst`` per kind
  per ``interval_s`` (the next carries the count of those left out); nothing is ever
  printed as a traceback.

Every loop over connections handles a bounded batch per pass, so the server never
holds the GIL for long, and no per-connection work runs on the caller's thread.
Requests carry no body (GET, HEAD), which is all scrapes and probes send; a
connection answers one request (HTTP/1.0 semantics).
"""

from __future__ import annotations

import contextlib
import errno
import io
import queue
import selectors
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

import structlog
from structlog.typing import FilteringBoundLogger

from streamer.ratelimit import RateLimiter

__all__ = ["BoundedHTTPServer", "RequestHandler"]

log = structlog.get_logger(__name__)

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")  # the blank line after the headers (bare LF from netcat)
_RECV_BYTES = 4096
# Connections accepted, or timed out, per pass of the selector loop: other threads get
# the GIL between passes however many connections arrive or expire at once.
_BATCH = 64
_IDLE_WAKE_S = 1.0
_EMFILE_PAUSE_S = 0.05


class RequestHandler(BaseHTTPRequestHandler):
    """A ``BaseHTTPRequestHandler`` for a request whose head the server has already read.

    Subclass it as you would ``BaseHTTPRequestHandler`` (``do_GET``, ...). The request
    line and headers are read from memory; the answer goes to the socket, which has
    the server's I/O timeout. A write that fails propagates to the server, which logs
    it once; a timed-out write or a malformed request is reported to it too.
    """

    def __init__(
        self,
        head: bytes,
        sock: socket.socket,
        client_address: tuple[Any, ...],
        server: BoundedHTTPServer,
    ) -> None:
        self._head = head
        self._http = server
        # BaseRequestHandler only keeps the server; nothing here uses it as a socketserver.
        super().__init__(sock, client_address, cast(socketserver.BaseServer, server))

    def setup(self) -> None:
        """The socket and a writer that sends everything or raises; the head from memory."""
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self._head)

    def log_error(self, format: str, *args: Any) -> None:
        """Report what ``BaseHTTPRequestHandler`` would print: a timeout or a bad request."""
        kind = "TimeoutError" if args and isinstance(args[0], TimeoutError) else "BadRequest"
        self._http.client_error(kind, self.client_address, format % args)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request would drown the daemon's log (Prometheus scrapes every few s).
        return


HandlerFactory = Callable[[bytes, socket.socket, tuple[Any, ...], "BoundedHTTPServer"], Any]


class _Connection:
    """An accepted connection: the socket, and the request head while it arrives."""

    __slots__ = ("address", "deadline", "head", "sock", "waiting")

    def __init__(self, sock: socket.socket, address: tuple[Any, ...], deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.head = bytearray()
        self.waiting = True  # registered with the selector, head incomplete


_LISTENER = object()
_WAKE = object()


class BoundedHTTPServer:
    """Serves a ``RequestHandler`` subclass with a fixed number of threads, whatever clients do.

    Args:
        handler: the ``RequestHandler`` subclass (called with head, socket, address, server).
        host, port: where to listen (port 0: an ephemeral port, see ``start``).
        workers: threads answering complete requests.
        queue_size: complete requests waiting for a worker; more are closed at once.
        max_waiting: connections whose head is still arriving; one more closes the oldest.
        request_timeout_s: from accept to the end of the request head.
        io_timeout_s: the socket timeout while a worker answers.
        backlog: the listen backlog (connections the kernel holds before accept).
        max_head_bytes: a longer request head is refused.
        name: prefix of the thread names.
        client_error_event: the event name of client error lines.
        limiter: the rate limit of client error lines, per error kind.
        logger: where the lines go (the module's structlog logger by default).
    """

    def __init__(
        self,
        handler: HandlerFactory,
        host: str,
        port: int,
        *,
        workers: int = 4,
        queue_size: int = 16,
        max_waiting: int = 1024,
        request_timeout_s: float = 5.0,
        io_timeout_s: float = 5.0,
        backlog: int = 128,
        max_head_bytes: int = 16384,
        name: str = "http",
        client_error_event: str = "http_client_error",
        limiter: RateLimiter | None = None,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        for what, value in (
            ("workers", workers),
            ("queue_size", queue_size),
            ("max_waiting", max_waiting),
            ("backlog", backlog),
            ("max_head_bytes", max_head_bytes),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        if request_timeout_s <= 0 or io_timeout_s <= 0:
            raise ValueError(
                f"timeouts must be positive, got request_timeout_s={request_timeout_s} "
                f"and io_timeout_s={io_timeout_s}"
            )
        self._handler = handler
        self._address = (host, port)
        self._workers = workers
        self._queue_size = queue_size
        self._max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self._io_timeout_s = io_timeout_s
        self._backlog = backlog
        self._max_head_bytes = max_head_bytes
        self._name = name
        self._event = client_error_event
        self._limiter = limiter if limiter is not None else RateLimiter()
        self._log: FilteringBoundLogger = logger if logger is not None else log
        # Unbounded as a queue; the selector thread, its only producer, keeps it to
        # queue_size (workers only take from it, so a qsize() check cannot go stale
        # upward), and close() can always add a stop marker per worker.
        self._requests: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._order: deque[_Connection] = deque()  # accept order = deadline order
        self._waiting = 0
        self._closing = False
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen, start the threads; returns the bound (host, port). Raises OSError."""
        host, port = self._address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=self._backlog)
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._threads = [threading.Thread(target=self._serve, name=f"{self._name}-accept")]
        self._threads += [
            threading.Thread(target=self._work, name=f"{self._name}-worker-{i}")
            for i in range(self._workers)
        ]
        for t in self._threads:
            t.daemon = True  # a stuck client never holds up the process' exit
            t.start()
        bound = listener.getsockname()
        return str(bound[0]), int(bound[1])

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close the connections still sending, let the workers finish."""
        if not self._threads:
            return
        self._closing = True
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        acceptor, workers = self._threads[0], self._threads[1:]
        acceptor.join(timeout_s)
        while True:  # requests nobody will answer now
            try:
                conn = self._requests.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                _close(conn.sock)
        for _ in workers:
            self._requests.put(None)
        deadline = time.monotonic() + timeout_s
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._threads = []

    # -- reporting -----------------------------------------------------------------------

    def client_error(self, kind: str, address: tuple[Any, ...] | None, detail: str) -> None:
        """Log one line for a failure a client caused, within the rate limit of ``kind``."""
        suppressed = self._limiter.allow(kind)
        if suppressed is None:
            return
        extra = {"suppressed": suppressed} if suppressed else {}
        self._log.warning(self._event, error=kind, peer=_peer(address), detail=detail, **extra)

    # -- the selector thread: accept, read heads, time out -------------------------------

    def _serve(self) -> None:
        assert self._selector is not None and self._wake_r is not None
        selector, wake = self._selector, self._wake_r
        try:
            while not self._closing:
                for key, _events in selector.select(self._select_timeout()):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        with contextlib.suppress(OSError):
                            wake.recv(64)
                    else:
                        self._read(key.data)
                self._expire()
        except Exception as exc:  # a bug here must not print a traceback nor go unnoticed
            self._log.error("http_server_failed", server=self._name, error=repr(exc))
        finally:
            for conn in self._order:
                if conn.waiting:
                    _close(conn.sock)
            self._order.clear()
            selector.close()
            if self._listener is not None:
                self._listener.close()

    def _select_timeout(self) -> float:
        if not self._order:
            return _IDLE_WAKE_S
        return min(_IDLE_WAKE_S, max(0.0, self._order[0].deadline - time.monotonic()))

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        for _ in range(_BATCH):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.client_error(type(exc).__name__, None, f"accept failed: {exc}")
                # Out of descriptors: the listener stays readable, so free one (the oldest
                # waiting connection) or pause, rather than spin on accept.
                if exc.errno in (errno.EMFILE, errno.ENFILE) and not self._evict_oldest(
                    "out of file descriptors"
                ):
                    time.sleep(_EMFILE_PAUSE_S)
                return
            sock.setblocking(False)
            if self._waiting >= self._max_waiting:
                self._evict_oldest(f"{self._max_waiting} connections already sending")
            conn = _Connection(sock, address, time.monotonic() + self.request_timeout_s)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._order.append(conn)
            self._waiting += 1

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(conn, type(exc).__name__, str(exc))
            return
        if not data:
            # Closed with nothing sent is a port check (load balancer, `nc -z`), not an error.
            kind = "IncompleteRequest" if conn.head else None
            self._drop(conn, kind, f"closed after {len(conn.head)} bytes of request head")
            return
        start = max(0, len(conn.head) - 3)
        conn.head += data
        if any(conn.head.find(end, start) >= 0 for end in _HEAD_ENDS):
            self._hand_over(conn)
        elif len(conn.head) > self._max_head_bytes:
            self._drop(conn, "RequestTooLarge", f"no end of headers in {len(conn.head)} bytes")

    def _hand_over(self, conn: _Connection) -> None:
        self._unregister(conn)
        if self._requests.qsize() >= self._queue_size:
            _close(conn.sock)
            self.client_error(
                "Overloaded", conn.address, f"{self._queue_size} requests already wait"
            )
            return
        try:
            conn.sock.settimeout(self._io_timeout_s)  # blocking, bounded, from here on
        except OSError as exc:
            _close(conn.sock)
            self.client_error(type(exc).__name__, conn.address, str(exc))
            return
        self._requests.put(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        order = self._order
        for _ in range(_BATCH):
            if not order or order[0].deadline > now:
                return
            conn = order.popleft()
            if conn.waiting:
                detail = f"no complete request within {self.request_timeout_s} s"
                self._drop(conn, "RequestTimeout", detail)

    def _evict_oldest(self, reason: str) -> bool:
        while self._order:
            conn = self._order.popleft()
            if conn.waiting:
                self._drop(conn, "Evicted", reason)
                return True
        return False

    def _drop(self, conn: _Connection, kind: str | None, detail: str) -> None:
        self._unregister(conn)
        _close(conn.sock)
        if kind is not None:
            self.client_error(kind, conn.address, detail)

    def _unregister(self, conn: _Connection) -> None:
        assert self._selector is not None
        if conn.waiting:
            conn.waiting = False
            self._waiting -= 1
            self._selector.unregister(conn.sock)

    # -- worker threads: answer complete requests ----------------------------------------

    def _work(self) -> None:
        while True:
            conn = self._requests.get()
            if conn is None:
                return
            try:
                self._handler(bytes(conn.head), conn.sock, conn.address, self)
            except OSError as exc:  # reset, broken pipe: the client went away mid-answer
                self.client_error(type(exc).__name__, conn.address, str(exc))
            except Exception as exc:  # a bug in a handler: one line, never a traceback print
                suppressed = self._limiter.allow("handler_failed")
                if suppressed is not None:
                    extra = {"suppressed": suppressed} if suppressed else {}
                    self._log.error(
                        "http_handler_failed",
                        server=self._name,
                        peer=_peer(conn.address),
                        error=repr(exc),
                        **extra,
                    )
            finally:
                conn.head = bytearray()
                _close(conn.sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _peer(address: tuple[Any, ...] | None) -> str:
    if not address:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
