"""Helpers for the operations tests: a notify socket, HTTP probes, a metrics scrape."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Timeout
from tests.integration.helpers import DaemonProcess


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str | None = None) -> None:
        # Abstract namespace by default: no path length limit, nothing left on disk.
        self.env_value = address or f"@streamer-test-{uuid.uuid4().hex}"
        bind_to = "\0" + self.env_value[1:] if self.env_value.startswith("@") else self.env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.received: list[tuple[float, dict[str, str]]] = []

    def read(self, timeout_s: float, count: int | None = None) -> list[dict[str, str]]:
        """Datagrams arriving within ``timeout_s`` (or the first ``count``), parsed into fields."""
        out: list[dict[str, str]] = []
        timeout = Timeout(timeout_s)
        while not timeout.expired and (count is None or len(out) < count):
            self.sock.settimeout(max(timeout.remaining, 0.001))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.received.append((time.monotonic(), fields))
            out.append(fields)
        return out

    def wait_for(self, key: str, timeout: Timeout) -> dict[str, str]:
        """The first datagram from now on carrying ``key``."""
        while not timeout.expired:
            for fields in self.read(min(timeout.remaining, 0.2)):
                if key in fields:
                    return fields
        raise AssertionError(f"no {key} within {timeout.timeout_s}s; got {self.received[-5:]}")

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notify_listener() -> Iterator[NotifyListener]:
    """A NotifyListener closed after use."""
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET, 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {sample name with sorted labels: value}, e.g. ``x_total{kind="a"}``."""
    status, body = http_get(url)
    assert status == 200, body[:500]
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def metrics_url(daemon: DaemonProcess, timeout: Timeout) -> str:
    """Base URL of the daemon's metrics server (it binds port 0 and logs the port)."""
    ev = daemon.wait_event("metrics_listening", timeout)
    return f"http://{ev['host']}:{ev['port']}"


def swap_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new link renamed over the old one)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
