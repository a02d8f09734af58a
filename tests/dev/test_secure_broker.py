"""A secured LocalBroker, as a plant runs Kafka: SCRAM over SASL_SSL, mTLS, ACLs enforced.

One secured broker serves the module. Each test gets fresh topics and a fresh group
with ACLs for ``User:streamer`` granted by the admin, a super user; every refusal
is checked next to a grant that works, so a broker that refused everything (or
allowed everything) fails here.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

# NewTopic's and the ACL types' documented home; the stubs do not re-export them.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclOperation,
    AdminClient,
    ResourceType,
)

from streamer.dev.broker import BrokerSecurity, LocalBroker, pki
from streamer.errors import KafkaError as StreamerKafkaError
from tests.helpers import Timeout
from tests.secure import allow, create_topics, grant

# The streamer password uses every special character BrokerSecurity allows, so the
# claim that they survive --add-scram and SCRAM itself is tested, not assumed.
_USERS = {"admin": "admin-secret", "streamer": "s3cret.~+/@%:!^*_-"}
_PRINCIPAL = "User:streamer"
# Generous: a cold JVM on a busy 2-core CI machine is far slower than on a laptop.
_START_TIMEOUT_S = 180.0
_TIMEOUT_S = 30.0
# librdkafka's default of 300s would turn a wrongly queued record into a hung test.
_PRODUCER_SETTINGS = {"acks": "all", "message.timeout.ms": "20000", "linger.ms": "1"}


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """A secured broker with SCRAM users admin (super user) and streamer, and mTLS."""
    secured = LocalBroker(security=BrokerSecurity(users=_USERS, super_users=["admin"], mtls=True))
    try:
        secured.start(timeout_s=_START_TIMEOUT_S)
        yield secured
    finally:
        secured.stop()


@pytest.fixture(scope="module")
def admin(broker: LocalBroker) -> AdminClient:
    """An AdminClient authenticated as the super user."""
    config: dict[str, str | int | float | bool] = {**broker.client_config("admin")}
    return AdminClient(config)


@dataclass(frozen=True)
class Grants:
    """Fresh resources and what ``User:streamer`` may do with them."""

    readable: str  # READ (which implies DESCRIBE): consume, never produce
    writable: str  # WRITE: produce, never consume
    forbidden: str  # no ACL at all
    group: str  # READ: join, fetch and commit offsets


@pytest.fixture
def grants(admin: AdminClient) -> Grants:
    """Three new topics and a group, with streamer's ACLs in force on the broker."""
    suffix = uuid.uuid4().hex
    granted = Grants(f"in-{suffix}", f"out-{suffix}", f"secret-{suffix}", f"group-{suffix}")
    create_topics(admin, granted.readable, granted.writable, granted.forbidden)
    grant(
        admin,
        [
            allow(ResourceType.TOPIC, granted.readable, AclOperation.READ),
            allow(ResourceType.GROUP, granted.group, AclOperation.READ),
            allow(ResourceType.TOPIC, granted.writable, AclOperation.WRITE),
        ],
    )
    return granted


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEM of another CA, under the very name of the broker's: trust must rest on the key."""
    directory = tmp_path_factory.mktemp("other-ca")
    keystore = directory / "ca.p12"
    store = ["-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", "other-secret"]
    keytool = pki.keytool()
    same_name = pki.CA_DNAME
    for args in (
        ["-genkeypair", "-alias", "ca", "-keyalg", "EC", "-ext", "bc:c", "-dname", same_name],
        ["-exportcert", "-alias", "ca", "-rfc", "-file", str(directory / "ca.pem")],
    ):
        subprocess.run([keytool, *args, *store], check=True, capture_output=True, timeout=60)
    return directory / "ca.pem"


# -- SCRAM over SASL_SSL --------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
class TestScramAcls:
    def test_produces_where_granted_and_is_refused_elsewhere(
        self, broker: LocalBroker, grants: Grants
    ) -> None:
        """streamer's record lands on its WRITE topic; READ-only and ungranted topics
        refuse it with TOPIC_AUTHORIZATION_FAILED."""
        results = _produce_one_each(
            broker.client_config("streamer"), grants.writable, grants.readable, grants.forbidden
        )

        assert results[grants.writable] is None
        assert _code(results[grants.readable]) == KafkaError.TOPIC_AUTHORIZATION_FAILED
        assert _code(results[grants.forbidden]) == KafkaError.TOPIC_AUTHORIZATION_FAILED

    def test_consumes_and_commits_with_granted_group(
        self, broker: LocalBroker, grants: Grants
    ) -> None:
        """streamer reads what admin wrote to its READ topic in its group and commits."""
        values = [f"record-{i}".encode() for i in range(3)]
        results = _produce_all(broker.client_config("admin"), grants.readable, values)
        assert results == [None] * len(values)

        consumer = _consumer(broker.client_config("streamer"), grants.group)
        try:
            consumer.subscribe([grants.readable])
            got = _poll_values(consumer, len(values))
            consumer.commit(asynchronous=False)
            (committed,) = consumer.committed([TopicPartition(grants.readable, 0)], timeout=10)
        finally:
            consumer.close()

        assert got == values
        assert committed.offset == len(values)

    def test_group_without_acl_is_refused(self, broker: LocalBroker, grants: Grants) -> None:
        """The READ topic is no use in a group streamer holds no ACL for."""
        consumer = _consumer(broker.client_config("streamer"), f"other-{grants.group}")
        try:
            consumer.subscribe([grants.readable])
            error = _first_error(consumer)
        finally:
            consumer.close()

        assert error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, error

    def test_write_only_topic_cannot_be_read(self, broker: LocalBroker, grants: Grants) -> None:
        """Fetching from the WRITE topic fails with TOPIC_AUTHORIZATION_FAILED."""
        consumer = _consumer(broker.client_config("streamer"), grants.group)
        try:
            consumer.assign([TopicPartition(grants.writable, 0, OFFSET_BEGINNING)])
            error = _first_error(consumer)
        finally:
            consumer.close()

        assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


# -- authentication and TLS -----------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
class TestAuthenticationAndTls:
    def test_correct_credentials_get_metadata(self, broker: LocalBroker) -> None:
        """The control for the refusals below: the same client with the right settings."""
        errors, metadata_ok = _connect(broker.client_config("streamer"), until=lambda _: False)

        assert metadata_ok
        assert not errors

    @pytest.mark.parametrize(
        ("user", "password"),
        [("streamer", "not-the-password"), ("mallory", _USERS["streamer"])],
        ids=["wrong-password", "unknown-user"],
    )
    def test_bad_credentials_fail_authentication(
        self, broker: LocalBroker, user: str, password: str
    ) -> None:
        """A wrong password or an unknown user is an authentication error, not a hang."""
        config = broker.client_config("streamer") | {
            "sasl.username": user,
            "sasl.password": password,
        }

        errors, metadata_ok = _connect(config, until=_has(KafkaError._AUTHENTICATION))

        assert not metadata_ok
        assert _has(KafkaError._AUTHENTICATION)(errors), errors

    @pytest.mark.parametrize("trust", ["other-ca", "system-store"])
    def test_client_not_trusting_the_ca_fails_verification(
        self, broker: LocalBroker, other_ca: Path, trust: str
    ) -> None:
        """The broker's certificate does not verify against another CA or the system's."""
        config = broker.client_config("streamer")
        if trust == "other-ca":
            config["ssl.ca.location"] = str(other_ca)
        else:
            del config["ssl.ca.location"]

        errors, metadata_ok = _connect(config, until=_has(KafkaError._SSL))

        assert not metadata_ok
        assert _has(KafkaError._SSL)(errors), errors
        assert any("certificate verify failed" in e.str() for e in errors), errors

    def test_plaintext_client_gets_nothing(self, broker: LocalBroker) -> None:
        """No PLAINTEXT client reaches metadata on the client port: there is no anonymous way in."""
        _, metadata_ok = _connect(
            {"bootstrap.servers": broker.bootstrap}, until=lambda e: bool(e), timeout_s=10
        )

        assert not metadata_ok


# -- mTLS -----------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
class TestMtls:
    def test_certificate_cn_is_the_principal(self, broker: LocalBroker, grants: Grants) -> None:
        """A certificate for CN=streamer gets exactly streamer's ACLs."""
        results = _produce_one_each(
            broker.mtls_client_config("streamer"),
            grants.writable,
            grants.readable,
            grants.forbidden,
        )

        assert results[grants.writable] is None
        assert _code(results[grants.readable]) == KafkaError.TOPIC_AUTHORIZATION_FAILED
        assert _code(results[grants.forbidden]) == KafkaError.TOPIC_AUTHORIZATION_FAILED

    def test_certificate_for_another_cn_gets_no_grant(
        self, broker: LocalBroker, grants: Grants
    ) -> None:
        """A valid certificate is not enough: CN=intruder holds no ACL."""
        results = _produce_one_each(broker.mtls_client_config("intruder"), grants.writable)

        assert _code(results[grants.writable]) == KafkaError.TOPIC_AUTHORIZATION_FAILED

    def test_client_without_certificate_is_refused(self, broker: LocalBroker) -> None:
        """ssl.client.auth=required: TLS without a client certificate gets no metadata."""
        config = broker.mtls_client_config("streamer")
        for key in ("ssl.certificate.location", "ssl.key.location", "ssl.key.password"):
            del config[key]

        errors, metadata_ok = _connect(config, until=lambda e: bool(e), timeout_s=15)

        assert not metadata_ok
        assert errors

    def test_certificates_are_issued_once_per_cn(self, broker: LocalBroker) -> None:
        """The same CN gets the same files back; another CN gets its own."""
        first = broker.issue_client_certificate("streamer")

        assert broker.issue_client_certificate("streamer") == first
        assert broker.issue_client_certificate("intruder").cert_path != first.cert_path
        assert first.key_path.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")


# -- the broker's own traffic ---------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
class TestInternalTraffic:
    def test_transaction_markers_reach_the_partition(
        self, broker: LocalBroker, admin: AdminClient
    ) -> None:
        """A committed transaction becomes readable, which needs the coordinator to write
        its markers through the INTERNAL listener as the broker's own principal."""
        topic = f"tx-{uuid.uuid4().hex}"
        create_topics(admin, topic)
        values = [f"tx-{i}".encode() for i in range(3)]
        producer = Producer(
            broker.client_config("admin")
            | _PRODUCER_SETTINGS
            | {"transactional.id": f"tx-{uuid.uuid4().hex}"}
        )
        producer.init_transactions(_TIMEOUT_S)
        producer.begin_transaction()
        for value in values:
            producer.produce(topic, value=value)
        producer.commit_transaction(_TIMEOUT_S)

        consumer = _consumer(
            broker.client_config("admin"),
            f"tx-reader-{uuid.uuid4().hex}",
            {"isolation.level": "read_committed"},
        )
        try:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            got = _poll_values(consumer, len(values))
        finally:
            consumer.close()

        assert got == values

    def test_no_plaintext_listener_and_no_anonymous_super_user(self, broker: LocalBroker) -> None:
        """Every listener authenticates, so User:ANONYMOUS neither exists nor is a super user."""
        props = dict(
            line.split("=", 1)
            for line in (broker.run_dir / "server.properties").read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
        protocols = dict(
            pair.split(":") for pair in props["listener.security.protocol.map"].split(",")
        )

        assert "PLAINTEXT" not in protocols.values(), protocols
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert "ANONYMOUS" not in props["super.users"]
        assert "User:admin" in props["super.users"].split(";")


@pytest.mark.kafka
@pytest.mark.slow
class TestRestart:
    def test_restart_keeps_users_listeners_and_topics(self, tmp_path: Path) -> None:
        """After a restart on the same run dir the SCRAM users (stored at format time)
        still log in, and both listeners are back at their addresses."""
        security = BrokerSecurity(users={"admin": "admin-secret"}, super_users=["admin"], mtls=True)
        with LocalBroker(tmp_path / "broker", security=security) as restarted:
            restarted.start(timeout_s=_START_TIMEOUT_S)
            addresses = (restarted.bootstrap, restarted.mtls_bootstrap)
            config: dict[str, str | int | float | bool] = {**restarted.client_config("admin")}
            create_topics(AdminClient(config), "durable")

            restarted.restart(timeout_s=_START_TIMEOUT_S)

            assert (restarted.bootstrap, restarted.mtls_bootstrap) == addresses
            results = _produce_one_each(restarted.client_config("admin"), "durable")
            assert results == {"durable": None}
            # CN=admin maps to User:admin, the super user, on the mTLS listener too.
            results = _produce_one_each(restarted.mtls_client_config("admin"), "durable")
            assert results == {"durable": None}


# -- without a broker -----------------------------------------------------------


class TestBrokerSecurityValidation:
    @pytest.mark.parametrize(
        ("security", "message"),
        [
            (lambda: BrokerSecurity(users={"bad name": "pw"}), "user name 'bad name'"),
            (lambda: BrokerSecurity(users={"alice": "pass,word"}), "password of 'alice'"),
            (lambda: BrokerSecurity(users={"alice": ""}), "password of 'alice'"),
            (lambda: BrokerSecurity(super_users="admin"), "not one string"),
            (lambda: BrokerSecurity(super_users=["a]b"]), "super user"),
            (lambda: BrokerSecurity(users={"localbroker-internal": "pw"}), "reserved"),
        ],
        ids=["space-in-name", "comma-in-password", "empty-password", "str", "bracket", "reserved"],
    )
    def test_unsafe_settings_are_refused(self, security: object, message: str) -> None:
        """What --add-scram, X.500 names or JAAS would misread is refused up front."""
        with pytest.raises(StreamerKafkaError, match=message):
            security()  # type: ignore[operator]

    def test_copies_its_inputs(self) -> None:
        """Mutating the caller's dict does not change the broker's users."""
        users = {"alice": "alice-secret"}
        security = BrokerSecurity(users=users, super_users=["alice"])
        users["mallory"] = "x"

        assert dict(security.users) == {"alice": "alice-secret"}
        assert security.super_users == ("alice",)

    def test_plain_broker_has_no_secure_clients(self) -> None:
        """A plain broker's secured-client helpers fail clearly instead of half-working."""
        plain = LocalBroker()
        with pytest.raises(StreamerKafkaError, match="not secured"):
            plain.client_config("admin")
        with pytest.raises(StreamerKafkaError, match="no mTLS listener"):
            _ = plain.mtls_bootstrap
        with pytest.raises(StreamerKafkaError, match="no SCRAM user 'bob'"):
            LocalBroker(security=BrokerSecurity(users={"alice": "pw"})).client_config("bob")

    def test_keytool_failure_is_an_error_quoting_its_output(self, tmp_path: Path) -> None:
        """A failing keytool raises KafkaError with what it said, and no password."""
        fake = tmp_path / "keytool"
        fake.write_text("#!/bin/sh\necho 'keytool error: java.lang.Exception: boom' >&2\nexit 1\n")
        fake.chmod(0o755)
        authority = pki.Pki(str(fake))

        with pytest.raises(StreamerKafkaError, match="boom") as raised:
            authority.ensure_server()
        assert authority.store_password not in str(raised.value)

    def test_key_extraction_rejects_garbage(self) -> None:
        """A keystore that is not the PKCS#12 keytool writes is an error, not an IndexError."""
        with pytest.raises(StreamerKafkaError, match="PKCS#12"):
            pki.pkcs12_encrypted_key(b"\x30\x03\x02\x01\x03")


# -- helpers --------------------------------------------------------------------


def _produce_all(
    config: dict[str, str], topic: str, values: list[bytes]
) -> list[KafkaError | None]:
    """Produce ``values`` in order; return each delivery's error (None: delivered)."""
    results: list[KafkaError | None] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        results.append(err)

    producer = Producer(config | _PRODUCER_SETTINGS)
    for value in values:
        producer.produce(topic, value=value, on_delivery=on_delivery)
    remaining = producer.flush(_TIMEOUT_S)
    assert remaining == 0, f"{remaining} records neither delivered nor failed"
    return results


def _produce_one_each(config: dict[str, str], *topics: str) -> dict[str, KafkaError | None]:
    """Produce one record to each topic with one producer; return each delivery's error."""
    results: dict[str, KafkaError | None] = {}

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        results[str(msg.topic())] = err

    producer = Producer(config | _PRODUCER_SETTINGS)
    for topic in topics:
        producer.produce(topic, value=b"{}", on_delivery=on_delivery)
    remaining = producer.flush(_TIMEOUT_S)
    assert remaining == 0, f"{remaining} records neither delivered nor failed"
    assert set(results) == set(topics), results
    return results


def _code(error: KafkaError | None) -> int | None:
    return None if error is None else int(error.code())


def _consumer(config: dict[str, str], group: str, extra: dict[str, str] | None = None) -> Consumer:
    return Consumer(
        config
        | {
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
            "fetch.wait.max.ms": "50",
        }
        | (extra or {})
    )


def _poll_values(consumer: Consumer, expected: int) -> list[bytes]:
    """Poll until ``expected`` records arrived; fail on any consumer error."""
    values: list[bytes] = []
    timeout = Timeout(_TIMEOUT_S)
    while len(values) < expected and not timeout.expired:
        msg = consumer.poll(min(timeout.remaining, 0.5))
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        values.append(msg.value() or b"")
    return values


def _first_error(consumer: Consumer) -> KafkaError:
    """Poll until the consumer reports an error; fail if a record or nothing comes."""
    timeout = Timeout(_TIMEOUT_S)
    while not timeout.expired:
        msg = consumer.poll(min(timeout.remaining, 0.5))
        if msg is None:
            continue
        error = msg.error()
        assert error is not None, f"read a record: {msg.value()!r}"
        if error.code() != KafkaError._PARTITION_EOF:
            return error
    raise AssertionError(f"no error within {_TIMEOUT_S}s")


def _has(code: int) -> Callable[[list[KafkaError]], bool]:
    return lambda errors: any(e.code() == code for e in errors)


def _connect(
    config: dict[str, str],
    *,
    until: Callable[[list[KafkaError]], bool],
    timeout_s: float = 20.0,
) -> tuple[list[KafkaError], bool]:
    """Ask for metadata; return the errors the client reported and whether it got any.

    Stops at the first metadata, or once ``until(errors)`` holds, or at the deadline.
    Connection errors reach only ``error_cb``, served by ``poll``.
    """
    errors: list[KafkaError] = []
    producer = Producer(config | {"error_cb": errors.append})
    timeout = Timeout(timeout_s)
    while not timeout.expired:
        try:
            # Short tries: a refused client never gets metadata, and its errors only
            # arrive through poll() between tries.
            producer.list_topics(timeout=min(timeout.remaining, 0.5))
        except KafkaException:
            pass
        else:
            producer.poll(0)
            return errors, True
        producer.poll(0.1)
        if until(errors):
            break
    return errors, False
