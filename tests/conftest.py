"""Shared fixtures: one real Kafka broker per test session, a fresh topic and group per test.

Set ``STREAMER_TEST_BOOTSTRAP=host:port`` to run the suite against a broker you
already have (``streamer broker start`` prints one); otherwise the session starts
its own from the cached jars and stops it at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# NewTopic's documented home; the package's stubs do not re-export it explicitly.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamer.dev.broker import LIBS_ENV, LocalBroker, ensure_jars
from tests.helpers import Timeout

if TYPE_CHECKING:
    from tests.integration.helpers import DaemonProcess

# Generous: a cold JVM on a busy 2-core CI machine is far slower than on a laptop.
_BROKER_START_TIMEOUT_S = 180.0
_ADMIN_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the session's broker.

    No skipping: if the broker cannot start, every test that needs it errors with
    the broker's log tail, because a silently skipped integration suite hides bugs.
    """
    external = os.environ.get("STREAMER_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    broker = LocalBroker()
    try:
        yield broker.start(timeout_s=_BROKER_START_TIMEOUT_S)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    """An AdminClient on the session broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


NewTopicFactory = Callable[..., str]


@pytest.fixture
def new_topic(kafka_admin: AdminClient) -> Iterator[NewTopicFactory]:
    """Factory: ``new_topic(partitions=1, config=None) -> name`` of a fresh uuid-named topic.

    Returns only once every partition has a leader, so the test can produce at once.
    The topics are deleted after the test (without waiting for it).
    """
    created: list[str] = []

    def make(partitions: int = 1, *, config: dict[str, str] | None = None) -> str:
        name = f"test-{uuid.uuid4().hex}"
        spec = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        futures = kafka_admin.create_topics(
            [spec], operation_timeout=_ADMIN_TIMEOUT_S, request_timeout=_ADMIN_TIMEOUT_S
        )
        futures[name].result(timeout=_ADMIN_TIMEOUT_S)
        created.append(name)
        _wait_for_leaders(kafka_admin, name, partitions, Timeout(_ADMIN_TIMEOUT_S))
        return name

    yield make
    if created:
        kafka_admin.delete_topics(created, operation_timeout=0)


def _wait_for_leaders(admin: AdminClient, topic: str, partitions: int, timeout: Timeout) -> None:
    while True:
        meta = admin.list_topics(topic, timeout=max(timeout.remaining, 0.1)).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 for p in meta.partitions.values())
        ):
            return
        if timeout.expired:
            raise AssertionError(f"topic {topic} has no leader for every partition: {meta}")
        # Creation is asynchronous on the controller; metadata catches up in milliseconds.
        time.sleep(min(timeout.remaining, 0.05))


@pytest.fixture
def group_id() -> str:
    """A fresh consumer group id, so no test sees another's committed offsets."""
    return f"test-group-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conv1d model (window 16, stride 4) trained on simulated normal data.

    One for the whole session: the tests read it and never change it.
    """
    from tests.integration.helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def broker_cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for ``broker start``/``stop`` with its own state dir, reusing the fetched jars.

    ``STREAMER_CACHE`` points at the test's folder, so its detached broker's state file
    is its own (the session broker and other sessions' are left alone); the jars stay in
    the shared cache (``STREAMER_KAFKA_LIBS``), fetched once. Whatever the test did, no
    detached broker is left behind.
    """
    env = dict(os.environ)
    env["STREAMER_CACHE"] = str(tmp_path / "cache")
    env[LIBS_ENV] = str(ensure_jars())
    yield env
    subprocess.run(
        [sys.executable, "-m", "streamer.dev.broker", "stop"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemon processes a test starts; any still running at its end are killed."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.__exit__()
