"""The loopback ports a broker listens on, picked free once and then kept."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from streamer.dev.broker.jvm import _HOST
from streamer.errors import KafkaError


def free_port(exclude: Sequence[int] = ()) -> int:
    """A port on 127.0.0.1 that nothing listens on now and that is not in ``exclude``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


class ListenerPorts:
    """The client, controller and (on a secured broker) internal and mTLS ports.

    Args:
        requested: the client port the caller fixed, or ``None`` to pick a free one.
        secured: the broker has an internal listener for its own traffic.
        mtls: the broker also has an mTLS client listener.

    Ports stay picked until :meth:`forget`, so a restarted broker comes back at the
    same address.
    """

    def __init__(self, requested: int | None, *, secured: bool, mtls: bool) -> None:
        if requested is not None and not 0 < requested < 65536:
            raise KafkaError(f"port must be between 1 and 65535, got {requested}")
        self.requested = requested
        self._secured = secured
        self._mtls = mtls
        self.client: int | None = None
        self.controller: int | None = None
        self.internal: int | None = None
        self.mtls: int | None = None

    @property
    def picked(self) -> bool:
        """Whether the client and controller ports are chosen."""
        return self.client is not None and self.controller is not None

    def ensure(self) -> tuple[int, int]:
        """The client and controller ports, choosing every port first if they are unset."""
        if self.client is None or self.controller is None:
            return self._pick()
        return self.client, self.controller

    def _pick(self) -> tuple[int, int]:
        client = self.requested or free_port()
        controller = free_port(exclude=(client,))
        self.client, self.controller = client, controller
        if self._secured:
            taken = [client, controller]
            self.internal = free_port(exclude=taken)
            if self._mtls:
                self.mtls = free_port(exclude=[*taken, self.internal])
        return client, controller

    def forget(self) -> None:
        """Drop every port, so the next :meth:`ensure` chooses new ones."""
        self.client = self.controller = None
        self.internal = self.mtls = None

    def client_address(self) -> str:
        """``host:port`` of the client listener."""
        return _address(self.client)

    def mtls_address(self) -> str:
        """``host:port`` of the mTLS listener."""
        return _address(self.mtls)


def _address(port: int | None) -> str:
    if port is None:
        raise KafkaError("the broker has no address yet: call start() first")
    return f"{_HOST}:{port}"
