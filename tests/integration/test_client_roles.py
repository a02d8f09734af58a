"""A daemon started with consumer and producer settings in ``kafka.client`` logs no
CONFWARN: each of its clients gets only the settings of its role."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import NewTopicFactory
from tests.helpers import Timeout
from tests.integration.helpers import DaemonProcess, make_topics, write_config

pytestmark = [pytest.mark.kafka]

CLIENT = {
    # Consumer only: a producer or admin client handed them warns at creation.
    "session.timeout.ms": 7000,
    "heartbeat.interval.ms": 1000,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 200,
    # Producer only: the consumer handed them warns at creation.
    "linger.ms": 5,
    "acks": -1,
    # Every client's.
    "socket.keepalive.enable": True,
}


def test_no_client_warns_about_another_role_s_settings(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    group_id: str,
    model_dir: Path,
    tmp_path: Path,
    daemons: list[DaemonProcess],
) -> None:
    topics = make_topics(new_topic, 2)
    cfg = write_config(
        tmp_path / "roles.yaml",
        kafka_bootstrap,
        topics,
        group_id,
        model_dir,
        kafka={"client": CLIENT},
    )
    daemon = DaemonProcess(cfg).start()
    daemons.append(daemon)
    daemon.wait_event("daemon_ready", Timeout(120))
    (membership,) = daemon.seen("group_membership")
    assert membership["session_timeout_ms"] == 7000  # kafka.client's, not the default
    assert daemon.stop() == 0, daemon.tail()
    warned = [line for line in daemon.lines if "CONFWARN" in line]
    assert not warned, "\n".join(warned)
    # The client's lines do reach the log (a CONFWARN would have been seen).
    assert daemon.seen("daemon_started")
