"""The daemon on a secured cluster: SCRAM over SASL_SSL, ACLs enforced, least privilege.

One secured broker (tests/kafka/test_secure_broker.py checks the broker itself) serves
the module. ``User:streamer`` gets exactly the documented grants (deploy/OPERATIONS.md):
READ on the input topic and the group, WRITE on scores, alerts and dead letters, READ
and WRITE on the state topic. A restart with state to read used to exit 1 at every
start (the state reader's group could not be granted); a refused login or certificate
used to surface after a 30 s metadata timeout as a "transport failure"; a missing READ
on the input left the daemon ready while it consumed nothing.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AdminClient,
    ResourceType,
)

from streamer.dev.broker import BrokerSecurity, LocalBroker
from tests.helpers import Timeout
from tests.integration.helpers import (
    REPO,
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    plant_samples,
    write_config,
)
from tests.ops.helpers import http_get, metrics_url, scrape
from tests.secure import allow, create_topics, grant, revoke

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

W, S = 16, 4
USERS = {"admin": "admin-secret", "streamer": "streamer-secret"}


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """A secured broker: SCRAM users admin (super user) and streamer, ACLs enforced."""
    secured = LocalBroker(security=BrokerSecurity(users=USERS, super_users=["admin"], mtls=True))
    try:
        secured.start(timeout_s=180)
        yield secured
    finally:
        secured.stop()


@pytest.fixture(scope="module")
def admin(broker: LocalBroker) -> AdminClient:
    """An AdminClient of the super user."""
    return AdminClient(dict(broker.client_config("admin")))


@dataclass
class Plant:
    """One test's topics and group, and a config for the daemon as ``User:streamer``."""

    topics: Topics
    group: str
    config: Path


def client_settings(broker: LocalBroker, user: str, **override: str) -> dict[str, str]:
    """librdkafka settings of ``user`` for the daemon's kafka.client (bootstrap set apart)."""
    conf = {k: str(v) for k, v in broker.client_config(user).items() if k != "bootstrap.servers"}
    conf.update(override)
    return conf


def documented_grants(
    topics: Topics, group: str, *, skip: tuple[str, str] | None = None
) -> list[AclBinding]:
    """The grants OPERATIONS.md documents, less ``skip`` (role, operation)."""
    wanted = [
        ("input", ResourceType.TOPIC, topics.input, AclOperation.READ),
        ("group", ResourceType.GROUP, group, AclOperation.READ),
        ("scores", ResourceType.TOPIC, topics.scores, AclOperation.WRITE),
        ("alerts", ResourceType.TOPIC, topics.alerts, AclOperation.WRITE),
        ("dlq", ResourceType.TOPIC, topics.dlq, AclOperation.WRITE),
        ("state", ResourceType.TOPIC, topics.state, AclOperation.READ),
        ("state", ResourceType.TOPIC, topics.state, AclOperation.WRITE),
    ]
    return [allow(kind, name, op) for role, kind, name, op in wanted if skip != (role, op.name)]


def new_plant(
    broker: LocalBroker,
    admin: AdminClient,
    model_dir: Path,
    tmp_path: Path,
    *,
    skip: tuple[str, str] | None = None,
    metrics: bool = False,
    mtls: bool = False,
    **client: str,
) -> Plant:
    """Fresh topics (made by the admin), the documented grants, a daemon config.

    ``mtls``: the daemon authenticates with a client certificate for CN=streamer on the
    mTLS listener instead of SCRAM (the same principal, so the same grants).
    """
    suffix = uuid.uuid4().hex[:12]
    names = {k: f"{k}-{suffix}" for k in ("input", "scores", "alerts", "dlq", "state")}
    create_topics(admin, *names.values())
    topics = Topics(**names, partitions=1)
    group = f"streamer-{suffix}"
    grant(admin, documented_grants(topics, group, skip=skip))
    if mtls:
        settings = broker.mtls_client_config("streamer")
        bootstrap = settings.pop("bootstrap.servers")
        settings.update(client)
    else:
        bootstrap, settings = broker.bootstrap, client_settings(broker, "streamer", **client)
    config = write_config(
        tmp_path / "c.yaml",
        bootstrap,
        topics,
        group,
        model_dir,
        kafka={"client": settings, "commit_interval_s": 1.0},
        **({"metrics": {"enabled": True, "port": 0, "stats_interval_s": 2.0}} if metrics else {}),
    )
    return Plant(topics, group, config)


def produce_as_admin(broker: LocalBroker, topic: str, samples: list[Sample]) -> None:
    """Produce samples with the admin's credentials; fills in partition and offset."""
    producer = Producer({**broker.client_config("admin"), "linger.ms": 5})

    def report(sample: Sample):  # type: ignore[no-untyped-def]
        def cb(err, msg):  # type: ignore[no-untyped-def]
            assert err is None, err
            sample.partition, sample.offset = msg.partition(), msg.offset()

        return cb

    for s in samples:
        producer.produce(topic, key=s.key, value=s.value, on_delivery=report(s))
        producer.poll(0)
    assert producer.flush(60) == 0


def wait_scored(
    broker: LocalBroker, plant: Plant, samples: list[Sample], d: DaemonProcess
) -> Counter[str]:
    """Until every window of ``samples`` is on the scores topic (read as the admin).

    Returns how often each window id was published so far.
    """
    wanted = set(expected_windows(plant.topics.input, samples, W, S))
    consumer = Consumer({**broker.client_config("admin"), "group.id": f"reader-{uuid.uuid4().hex}"})
    seen: Counter[str] = Counter()
    try:
        consumer.assign([TopicPartition(plant.topics.scores, 0, 0)])
        timeout = Timeout(120)
        while not timeout.expired and not wanted <= seen.keys() and d.proc.poll() is None:
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    seen[orjson.loads(m.value() or b"")["id"]] += 1
    finally:
        consumer.close()
    assert wanted <= seen.keys(), f"{len(wanted - seen.keys())} windows missing\n{d.tail()}"
    return seen


def check_access(plant: Plant) -> subprocess.CompletedProcess[str]:
    """``streamer check-access`` on the plant's config."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", "check-access", "--config", str(plant.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestLeastPrivilege:
    """With exactly the documented grants, the daemon works across restarts."""

    def test_restart_with_state_to_read_and_check_access(
        self,
        broker: LocalBroker,
        admin: AdminClient,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """check-access passes; a clean restart scores each window once, a SIGKILL loses none."""
        plant = new_plant(broker, admin, model_dir, tmp_path)
        shown = check_access(plant)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "MISSING" not in shown.stdout and shown.stdout.count("ok ") == 12, shown.stdout
        samples = plant_samples(2, 120, seed=21)
        produce_as_admin(broker, plant.topics.input, samples[:80])
        first = DaemonProcess(plant.config).start()
        daemons.append(first)
        wait_scored(broker, plant, samples[:80], first)
        assert first.stop() == 0, first.tail()
        # The restart reads the state topic back: it used to exit 1 here, every time.
        produce_as_admin(broker, plant.topics.input, samples[80:160])
        second = DaemonProcess(plant.config).start()
        daemons.append(second)
        restored = second.wait_event("state_restored", Timeout(60))
        assert restored["sensors"] == 2, restored
        seen = wait_scored(broker, plant, samples[:160], second)
        assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]
        # Killed: what it had not committed is replayed by the next start, nothing lost.
        second.stop(signal.SIGKILL)
        produce_as_admin(broker, plant.topics.input, samples[160:])
        third = DaemonProcess(plant.config).start()
        daemons.append(third)
        third.wait_event("state_restored", Timeout(60))
        wait_scored(broker, plant, samples, third)
        assert third.stop() == 0, third.tail()

    def test_mtls_client_scores_every_window_across_a_sigkill(
        self,
        broker: LocalBroker,
        admin: AdminClient,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """Authenticated by its certificate (CN=streamer): scored, killed, restarted, scored."""
        plant = new_plant(broker, admin, model_dir, tmp_path, mtls=True)
        samples = plant_samples(2, 100, seed=23)
        produce_as_admin(broker, plant.topics.input, samples[:60])
        first = DaemonProcess(plant.config).start()
        daemons.append(first)
        wait_scored(broker, plant, samples[:60], first)
        first.stop(signal.SIGKILL)
        produce_as_admin(broker, plant.topics.input, samples[60:])
        second = DaemonProcess(plant.config).start()
        daemons.append(second)
        wait_scored(broker, plant, samples, second)
        assert second.stop() == 0, second.tail()


class TestCausesNamed:
    """A refused login, certificate or grant is named in the daemon's own words, fast."""

    def test_wrong_password(
        self, broker: LocalBroker, admin: AdminClient, model_dir: Path, tmp_path: Path
    ) -> None:
        plant = new_plant(broker, admin, model_dir, tmp_path, **{"sasl.password": "wrong"})
        self._fails_naming(plant, "authentication failed", "sasl.username=streamer")
        self._check_access_fails_naming(plant, "authentication failed", "sasl.username=streamer")

    def test_untrusted_ca(
        self, broker: LocalBroker, admin: AdminClient, model_dir: Path, tmp_path: Path
    ) -> None:
        # The system's trust store: it does not hold the test CA.
        plant = new_plant(broker, admin, model_dir, tmp_path, **{"ssl.ca.location": "probe"})
        self._fails_naming(plant, "TLS failed", "certificate verify failed")
        self._check_access_fails_naming(plant, "TLS failed", "certificate verify failed")

    def test_no_acl_on_the_input_topic(
        self, broker: LocalBroker, admin: AdminClient, model_dir: Path, tmp_path: Path
    ) -> None:
        """A topic the user may not describe is hidden: said so, not "create it"."""
        plant = new_plant(broker, admin, model_dir, tmp_path, skip=("input", "READ"))
        self._fails_naming(plant, plant.topics.input, "not visible to this user")
        shown = check_access(plant)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert self._missing(shown) == [
            ("READ", f"topic {plant.topics.input}"),
            ("DESCRIBE", f"topic {plant.topics.input}"),
        ], shown.stdout

    @pytest.mark.parametrize("role", ["scores", "alerts", "dlq", "state"])
    def test_missing_write_on_an_output(
        self, broker: LocalBroker, admin: AdminClient, model_dir: Path, tmp_path: Path, role: str
    ) -> None:
        """No WRITE on an output: start-up fails naming it and the grant, not at the first alert.

        check-access lists exactly that one grant as missing.
        """
        plant = new_plant(broker, admin, model_dir, tmp_path, skip=(role, "WRITE"))
        topic = getattr(plant.topics, role)
        if role != "state":  # the state keeps READ, which lets the user describe it
            grant(admin, [allow(ResourceType.TOPIC, topic, AclOperation.DESCRIBE)])
        shown = check_access(plant)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert self._missing(shown) == [("WRITE", f"topic {topic}")], shown.stdout
        assert "the broker allows this user" in shown.stdout, shown.stdout
        assert f"--operation Write --topic {topic}" in shown.stdout, shown.stdout
        self._fails_naming(plant, f"WRITE on topic {topic}", f"--operation Write --topic {topic}")

    @staticmethod
    def _missing(shown: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
        """(operation, resource) of each MISSING line of check-access."""
        out = []
        for line in shown.stdout.splitlines():
            if line.startswith("MISSING"):
                _, op, kind, name = line.split(maxsplit=4)[:4]
                out.append((op, f"{kind} {name}"))
        return out

    @staticmethod
    def _check_access_fails_naming(plant: Plant, *words: str) -> None:
        started = time.monotonic()
        shown = check_access(plant)
        elapsed = time.monotonic() - started
        assert shown.returncode == 1, shown.stdout + shown.stderr
        for word in words:
            assert word in shown.stderr, shown.stderr
        assert USERS["streamer"] not in shown.stdout + shown.stderr
        assert elapsed < 15, elapsed

    @staticmethod
    def _fails_naming(plant: Plant, *words: str) -> None:
        timeout = Timeout(60)
        daemon = DaemonProcess(plant.config).start()
        try:
            failed = daemon.wait_event("daemon_failed", timeout)
            ready = daemon.wait_event("daemon_starting", timeout)
        finally:
            daemon.__exit__()
        for word in words:
            assert word in failed["error"], failed
        assert USERS["streamer"] not in "\n".join(daemon.lines)

        # Named within 15 s of start-up (it used to take a 30 s metadata timeout).
        def at(ev: dict[str, str]) -> dt.datetime:
            return dt.datetime.fromisoformat(ev["timestamp"])

        assert (at(failed) - at(ready)).total_seconds() < 15, (ready, failed)

    def test_missing_read_on_group_is_not_ready_and_said(
        self,
        broker: LocalBroker,
        admin: AdminClient,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """No READ on the group: check-access names it; the daemon says why it is not ready."""
        plant = new_plant(broker, admin, model_dir, tmp_path, skip=("group", "READ"), metrics=True)
        shown = check_access(plant)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert f"--operation Read --group {plant.group}" in shown.stdout, shown.stdout
        daemon = DaemonProcess(plant.config).start()
        daemons.append(daemon)
        timeout = Timeout(90)
        base = metrics_url(daemon, timeout)
        refused = daemon.wait_event("kafka_access_refused", timeout)
        assert "GROUP_AUTHORIZATION_FAILED" in refused["reason"], refused
        assert f"group {plant.group}:" in refused["reason"], refused
        status, body = http_get(base + "/readyz")
        assert status == 503 and b"GROUP_AUTHORIZATION_FAILED" in body, body
        self._refusal_holds(daemon, base, timeout)
        assert daemon.stop() == 0, daemon.tail()

    @staticmethod
    def _refusal_holds(daemon: DaemonProcess, base: str, timeout: Timeout) -> None:
        """The refusal is said again (every 30 s) and the daemon stays not ready meanwhile.

        The client reports a refusal once, while the broker refuses every fetch or join:
        a refusal that expired after 15 s used to turn /readyz to 200, consuming nothing.
        """
        while len(daemon.seen("kafka_access_refused")) < 2:
            assert not timeout.expired, daemon.tail()
            assert not daemon.seen("kafka_access_granted"), daemon.tail()
            assert http_get(base + "/readyz")[0] == 503
            time.sleep(0.5)
        assert not daemon.seen("kafka_access_granted"), daemon.tail()
        assert http_get(base + "/readyz")[0] == 503

    def test_missing_read_on_input_is_not_ready_and_listed(
        self,
        broker: LocalBroker,
        admin: AdminClient,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """DESCRIBE but no READ on the input: check-access names it; /readyz 503, logged."""
        plant = new_plant(broker, admin, model_dir, tmp_path, skip=("input", "READ"), metrics=True)
        grant(admin, [allow(ResourceType.TOPIC, plant.topics.input, AclOperation.DESCRIBE)])
        shown = check_access(plant)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        missing = [line for line in shown.stdout.splitlines() if line.startswith("MISSING")]
        assert len(missing) == 1 and "READ" in missing[0] and plant.topics.input in missing[0]
        assert f"--operation Read --topic {plant.topics.input}" in shown.stdout
        samples = plant_samples(1, 40, seed=22)
        produce_as_admin(broker, plant.topics.input, samples)
        daemon = DaemonProcess(plant.config).start()
        daemons.append(daemon)
        timeout = Timeout(120)
        base = metrics_url(daemon, timeout)
        daemon.wait_event("partitions_assigned", timeout)
        refused = daemon.wait_event("kafka_access_refused", timeout)
        assert "TOPIC_AUTHORIZATION_FAILED" in refused["reason"], refused
        status, body = http_get(base + "/readyz")
        assert status == 503 and b"TOPIC_AUTHORIZATION_FAILED" in body, body
        # The backlog shows, though nothing was fetched (it used to read 0).
        lag = None
        while lag is None and not timeout.expired:
            lag = scrape(base + "/metrics").get('streamer_consumer_lag_messages{partition="0"}')
            time.sleep(0.5)
        assert lag == len(samples), lag
        self._refusal_holds(daemon, base, timeout)
        # The grant arrives: the daemon consumes and turns ready, without a restart.
        grant(admin, [allow(ResourceType.TOPIC, plant.topics.input, AclOperation.READ)])
        wait_scored(broker, plant, samples, daemon)
        daemon.wait_event("kafka_access_granted", timeout)
        assert http_get(base + "/readyz")[0] == 200
        assert daemon.stop() == 0, daemon.tail()


class TestRefusedWhileRunning:
    """A grant withdrawn from a running daemon, then given back: nothing is lost."""

    def test_output_refused_then_granted_loses_nothing(
        self,
        broker: LocalBroker,
        admin: AdminClient,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        plant = new_plant(broker, admin, model_dir, tmp_path)
        samples = plant_samples(2, 120, seed=24)
        produce_as_admin(broker, plant.topics.input, samples[:80])
        first = DaemonProcess(plant.config).start()
        daemons.append(first)
        wait_scored(broker, plant, samples[:80], first)
        write = allow(ResourceType.TOPIC, plant.topics.scores, AclOperation.WRITE)
        revoke(admin, write)
        # DESCRIBE stays, as an operator who withdrew WRITE alone would leave it.
        grant(admin, [allow(ResourceType.TOPIC, plant.topics.scores, AclOperation.DESCRIBE)])
        produce_as_admin(broker, plant.topics.input, samples[80:])
        failed = first.wait_event("daemon_failed", Timeout(90))
        assert plant.topics.scores in failed["error"], failed
        assert "authorization" in failed["error"].lower(), failed
        assert first.proc.wait(60) == 1, first.tail()
        grant(admin, [write])
        second = DaemonProcess(plant.config).start()
        daemons.append(second)
        wait_scored(broker, plant, samples, second)
        assert second.stop() == 0, second.tail()
