"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for local use.

Development, the test suite, CI and ``streamer demo`` all run against a genuine
broker rather than a fake: the jars come from Maven Central through Maven (fetched
once into ``${STREAMER_CACHE:-~/.cache/streamer}/kafka/<version>/libs``) and run on
the local Java 17+, so no Docker and no download outside the package registries is
needed.

Library use::

    with LocalBroker() as broker:
        bootstrap = broker.start()

A secured broker, as a plant's cluster runs one (SASL_SSL with SCRAM-SHA-512 users,
optionally an mTLS listener, ACLs enforced by KRaft's StandardAuthorizer)::

    security = BrokerSecurity(users={"admin": "a-secret", "streamer": "s-secret"},
                              super_users=["admin"], mtls=True)
    with LocalBroker(security=security) as broker:
        broker.start()
        admin = AdminClient(broker.client_config("admin"))
        producer = Producer(broker.mtls_client_config("streamer"))

Command line (``python -m streamer.kafka.localbroker``, also behind
``streamer broker``): ``fetch`` pre-fetches the jars, ``start`` launches a detached
broker and prints its bootstrap address, ``status`` prints it again, ``stop`` ends it.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, cast

import structlog

from streamer.errors import KafkaError

__all__ = [
    "DEFAULT_VERSION",
    "LIBS_ENV",
    "BrokerSecurity",
    "ClientCertificate",
    "LocalBroker",
    "cache_root",
    "ensure_jars",
    "main",
]

_log = structlog.get_logger(__name__)

DEFAULT_VERSION: Final = "4.1.1"
"""Kafka release run by default; its broker jars need Java 17 or newer."""

LIBS_ENV: Final = "STREAMER_KAFKA_LIBS"
"""Environment variable naming a ready ``libs`` directory, which skips the Maven fetch."""

# Every Kafka 4.x release up to 4.4 pulls in slf4j-api 1.7.x and no logging backend,
# so the log4j2 binding for slf4j 1.x is the one that makes the broker log at all.
# The log4j version follows what kafka-server itself depends on, so Maven does not mix
# two log4j-core versions on one class path.
_LOG4J_VERSIONS: Final = {"4.1.1": "2.24.3", "4.2.0": "2.25.3", "4.4.0": "2.25.5"}
_LOG4J_FALLBACK: Final = "2.24.3"
# Pinned: without a version Maven resolves whatever plugin release its metadata names.
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

_STARTED_MARKER: Final = "Kafka Server started"
_HOST: Final = "127.0.0.1"
_NODE_ID: Final = 1
_FETCH_TIMEOUT_S: Final = 1800.0
_FORMAT_TIMEOUT_S: Final = 120.0
_BIND_RETRIES: Final = 3
_TAIL_LINES: Final = 40

# Measured on a busy shared 2-core machine, start() to "Kafka Server started" with
# formatting, median of 4: default JVM flags 7.8s; serial GC and C1-only compilation
# 4.8s; plus the class-data-sharing archive (see _cds_archive) 3.1s (2.0s when idle).
# A broker for tests and demos never runs long enough for C2 to pay back its compiles.
_JVM_FLAGS: Final = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    # Kafka's own shutdown hook logs the clean shutdown; log4j's would close the
    # log file under it. The file appender flushes every line, so nothing is lost.
    "-Dlog4j2.shutdownHookEnabled=false",
)

_LOG4J2_CONFIG: Final = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_path}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Per-partition state changes and request traces drown the useful lines.
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def cache_root() -> Path:
    """Return streamer's cache directory: ``$STREAMER_CACHE`` or ``~/.cache/streamer``."""
    env = os.environ.get("STREAMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamer"


def _kafka_jar_name(version: str) -> str:
    return f"kafka_2.13-{version}.jar"


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise KafkaError(
            "java not found on PATH or in JAVA_HOME: the local Kafka broker needs Java 17+ "
            "(e.g. apt-get install openjdk-17-jre-headless)"
        )
    return found


def _pom(version: str) -> str:
    log4j = _LOG4J_VERSIONS.get(version, _LOG4J_FALLBACK)
    return f"""\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by streamer.kafka.localbroker to fetch the Kafka broker jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.streamer</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so concurrent processes fetch or start only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            # The server log grows to megabytes; the tail is all an error message needs.
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            return _tail(handle.read().decode("utf-8", "replace"), lines)
    except FileNotFoundError:
        return f"({path.name} was not written)"


def _error_lines(log: str, limit: int = 20) -> str:
    """The ERROR lines of a Kafka log with the exception message and causes under each."""
    picked: list[str] = []
    previous_was_error = False
    for line in log.splitlines():
        if " ERROR " in line or line.startswith("Caused by:") or previous_was_error:
            picked.append(line)
        previous_was_error = " ERROR " in line
    return "\n".join(picked[:limit]) if picked else "(none)"


def ensure_jars(version: str = DEFAULT_VERSION, cache_dir: Path | None = None) -> Path:
    """Return the directory holding the Kafka broker jars, fetching them with Maven once.

    ``cache_dir`` defaults to :func:`cache_root`; when it is not given and
    ``$STREAMER_KAFKA_LIBS`` names a directory, that directory is used as is (tests
    point a throwaway cache there to reuse the jars already fetched). The fetch runs
    ``mvn dependency:copy-dependencies`` into a staging directory that is renamed
    into place only when complete, under a file lock, so a crashed or concurrent
    fetch never leaves a half-filled ``libs``.

    Raises:
        KafkaError: java or mvn is missing, or Maven failed (its output tail is in
            the message).
    """
    jar = _kafka_jar_name(version)
    if cache_dir is None:
        override = os.environ.get(LIBS_ENV)
        if override:
            libs = Path(override).expanduser()
            if not (libs / jar).is_file():
                raise KafkaError(f"${LIBS_ENV}={override} holds no {jar}")
            return libs
        cache_dir = cache_root()
    version_dir = cache_dir / "kafka" / version
    libs = version_dir / "libs"
    if (libs / jar).is_file():
        return libs

    _java()  # Maven needs it too; fail with the clearer message first.
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError(
            "mvn not found on PATH: the Kafka jars are fetched from Maven Central with "
            "Maven 3.6+ (e.g. apt-get install maven)"
        )
    with _file_lock(version_dir / ".lock"):
        if (libs / jar).is_file():  # another process fetched while we waited
            return libs
        staging = version_dir / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        pom = version_dir / "pom.xml"
        pom.write_text(_pom(version), encoding="utf-8")
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom),
            f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        _log.info("kafka_jars_fetching", version=version, libs=str(libs))
        started = time.monotonic()
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_FETCH_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise KafkaError(
                f"mvn did not fetch Kafka {version} within {exc.timeout:.0f}s"
            ) from exc
        if result.returncode != 0 or not (staging / jar).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise KafkaError(
                f"mvn failed to fetch Kafka {version} (exit {result.returncode}): "
                f"{' '.join(cmd)}\n{_tail(result.stdout + result.stderr)}"
            )
        shutil.rmtree(libs, ignore_errors=True)  # a leftover without the Kafka jar
        staging.rename(libs)
        _log.info(
            "kafka_jars_fetched",
            version=version,
            jars=sum(1 for _ in libs.glob("*.jar")),
            elapsed_s=round(time.monotonic() - started, 1),
        )
    return libs


def _classpath(libs: Path) -> str:
    # An explicit sorted list rather than 'libs/*' keeps the class path identical
    # from run to run whatever order the directory lists in.
    return os.pathsep.join(str(jar) for jar in sorted(libs.glob("*.jar")))


def _cds_archive(libs: Path, java: str, classpath: str) -> Path:
    """Where the class-data-sharing archive for this JDK build and class path lives.

    A dynamic CDS archive (about 50 MB) holds the classes Kafka loads at start-up,
    already parsed and verified; the first broker dumps it at its clean exit and
    later JVMs map it, which cuts about 1.5s from every start. The name hashes what
    the JVM checks before using an archive, so a JDK upgrade or a new jar set makes
    (and later uses) a new one instead of being refused.
    """
    real = Path(java).resolve()
    parts = [str(real), classpath]
    for path in (real, real.parent.parent / "lib" / "server" / "libjvm.so"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            parts.append(f"{stat.st_mtime_ns}:{stat.st_size}")
    key = "\0".join(parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return libs.parent / "cds" / f"kafka-{digest}.jsa"


def _adopt_cds(partial: Path | None, clean_exit: bool) -> None:
    """Move an archive dumped at a clean JVM exit into place; drop anything else."""
    if partial is None:
        return
    final = partial.with_name(partial.name.split(".", 1)[0] + ".jsa")
    try:
        if clean_exit and partial.is_file() and partial.stat().st_size > 0:
            # Another broker may have won the race: either archive is as good.
            partial.replace(final)
            _log.info("kafka_cds_archive_written", path=str(final))
            # Archives of a replaced JDK or jar set are dead weight (50 MB each), and
            # so are partials whose JVM was killed long ago.
            for other in final.parent.iterdir():
                stale_partial = other.suffix == ".partial" and (
                    time.time() - other.stat().st_mtime > 86400
                )
                if stale_partial or (other.suffix == ".jsa" and other != final):
                    other.unlink(missing_ok=True)
        else:
            partial.unlink(missing_ok=True)
    except OSError as exc:  # the archive only saves time; never fail a stop over it
        _log.warning("kafka_cds_archive_failed", path=str(partial), error=str(exc))


def _free_port(exclude: Sequence[int] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def _cluster_id() -> str:
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without padding. Like
    # Kafka's own Uuid.randomUuid(), skip ids starting with "-": the storage tool's
    # argument parser would read one as an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


def _server_properties(
    data_dir: Path, port: int, controller_port: int, secure: _SecureListeners | None = None
) -> str:
    settings: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": _NODE_ID,
        # A static voter set: with one voter there is nothing to reconfigure, and
        # formatting then needs neither --standalone nor --initial-controllers.
        "controller.quorum.voters": f"{_NODE_ID}@{_HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{_HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        # One broker: every replicated internal topic must make do with one replica.
        "default.replication.factor": 1,
        "min.insync.replicas": 1,
        "offsets.topic.replication.factor": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        # 50 partitions each by default: creating them is seconds of a first group
        # join on a small machine, and one broker gains nothing from spreading.
        "offsets.topic.num.partitions": 4,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.num.partitions": 1,
        "num.partitions": 1,
        # After a crash the controller refuses the restarted broker's registration
        # until the dead incarnation's session expires (9s by default): shorter, so
        # a kill-and-restart fault test waits seconds, not tens of seconds.
        "broker.session.timeout.ms": 4000,
        "broker.heartbeat.interval.ms": 1000,
        # Tests create their topics explicitly: a typo must fail, not invent a topic.
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": 0,
        # Fewer threads than the defaults (3 and 8) for a machine with a few cores.
        "num.network.threads": 2,
        "num.io.threads": 4,
    }
    if secure is not None:
        # Keys already present (the listeners) keep their place; the rest follow.
        settings.update(secure.settings(port, controller_port))
    lines = ["# Written by streamer.kafka.localbroker; rewritten on every start."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


# -- security: SCRAM users, TLS, mTLS, ACLs -----------------------------------

# The broker's own principal, for the controller channel and inter-broker traffic
# (see _SecureListeners). It is a super user, so no user or certificate may take it.
_INTERNAL_USER: Final = "localbroker-internal"
_SCRAM_MECHANISM: Final = "SCRAM-SHA-512"
# The client certificate's CN becomes the principal name, as plants map it.
_MTLS_PRINCIPAL_RULES: Final = "RULE:^CN=([^,]+).*$/$1/,DEFAULT"
# Names go into --add-scram's "[name=...,password=...]", into X.500 names and into
# JAAS options, none of which this module escapes: allow only characters none of
# them treat specially, and say so, rather than quote and hope.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PASSWORD_RE: Final = re.compile(r"[A-Za-z0-9._~+/@%:!^*-]{1,128}")

_KEYTOOL_TIMEOUT_S: Final = 60.0
_STORE_ENV: Final = "STREAMER_KEYTOOL_STORE_PASS"
_CA_ENV: Final = "STREAMER_KEYTOOL_CA_PASS"
# The CA lives as long as this process; a week and a day of back-dating absorb any
# clock skew between the JVM and OpenSSL without making the material worth keeping.
_CERT_VALIDITY_DAYS: Final = "7"
_CERT_START: Final = "-1d"
_CA_DNAME: Final = "CN=streamer LocalBroker throwaway CA"
_SERVER_DNAME: Final = "CN=localhost"
_SERVER_SAN: Final = f"san=dns:localhost,ip:{_HOST}"
# EC P-256: a keytool -genkeypair took 0.35-0.42s with it and 0.68-2.2s with
# RSA-2048 (the prime search varies), and JSSE and librdkafka's OpenSSL both have it.
_KEY_ARGS: Final = ("-keyalg", "EC", "-groupname", "secp256r1", "-sigalg", "SHA256withECDSA")
# keytool is a short-lived JVM like the storage tool: the same start-up flags apply.
_KEYTOOL_JVM_FLAGS: Final = (
    "-J-XX:+UseSerialGC",
    "-J-XX:TieredStopAtLevel=1",
    "-J-XX:-UsePerfData",
)


def _check_name(what: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise KafkaError(
            f"{what} {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    if name == _INTERNAL_USER:
        raise KafkaError(f"{what} {name!r} is reserved for the broker's own principal")


@dataclass(frozen=True)
class BrokerSecurity:
    """How a :class:`LocalBroker` is secured, as a plant's cluster is.

    With it the broker has no plaintext client listener: clients connect over
    SASL_SSL with SCRAM-SHA-512 (:attr:`LocalBroker.bootstrap`) or, with ``mtls``,
    over TLS with a client certificate whose CN is the user name
    (:attr:`LocalBroker.mtls_bootstrap`). Every request is authorised by KRaft's
    StandardAuthorizer with ``allow.everyone.if.no.acl.found=false``: a user may do
    only what an ACL grants, unless it is a super user.

    Args:
        users: SCRAM-SHA-512 user name to password. The users are created when the
            storage is formatted, so a ``run_dir`` formatted earlier keeps the users
            it was formatted with.
        super_users: user names (not ``User:`` principals) that bypass ACLs, e.g.
            the admin that creates topics and ACLs. A super user may be a SCRAM user
            or a certificate CN: the principal is ``User:<name>`` either way.
        mtls: also open an SSL listener that requires a client certificate
            signed by the broker's CA (see :meth:`LocalBroker.mtls_client_config`).

    Names are 1-64 of ``[A-Za-z0-9._-]``; passwords 1-128 of those or ``~+/@%:!^*``.
    """

    users: Mapping[str, str] = field(default_factory=dict)
    super_users: Sequence[str] = ()
    mtls: bool = False

    def __post_init__(self) -> None:
        # Copies, so a caller mutating its dict or list cannot change a running
        # broker's idea of its users behind its back.
        if isinstance(self.super_users, str):  # tuple("admin") would be five users
            raise KafkaError("super_users must be a sequence of names, not one string")
        users = dict(self.users)
        super_users = tuple(self.super_users)
        for name, password in users.items():
            _check_name("user name", name)
            if not _PASSWORD_RE.fullmatch(password):
                raise KafkaError(
                    f"the password of {name!r} must be 1-128 characters of letters, "
                    "digits or ._~+/@%:!^*-"
                )
        for name in super_users:
            _check_name("super user", name)
        object.__setattr__(self, "users", users)
        object.__setattr__(self, "super_users", super_users)


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate signed by the process's broker CA, with its key, as PEM files.

    The key is PKCS#8 encrypted with ``key_password`` (librdkafka's
    ``ssl.key.password``): keytool, the only certificate tool the JDK ships, cannot
    write a key in the clear, and unwrapping it would need a crypto library.
    """

    cn: str
    cert_path: Path
    key_path: Path
    key_password: str


def _keytool() -> str:
    """keytool of the JDK that runs the broker, so the two can never disagree."""
    beside_java = Path(_java()).resolve().parent / "keytool"
    if beside_java.is_file():
        return str(beside_java)
    found = shutil.which("keytool")
    if found is None:
        raise KafkaError(
            "keytool not found next to java or on PATH: a secured local broker makes its "
            "certificates with the JDK's keytool"
        )
    return found


def _der(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """Read one DER element at ``pos``: (tag, contents, position after it)."""
    if pos + 2 > len(data):
        raise KafkaError("truncated DER in a PKCS#12 keystore")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    if pos + length > len(data):
        raise KafkaError("truncated DER in a PKCS#12 keystore")
    return tag, data[pos : pos + length], pos + length


def _der_children(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The elements inside a constructed DER value: (tag, contents, whole encoding)."""
    children: list[tuple[int, bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        tag, contents, end = _der(data, pos)
        children.append((tag, contents, data[pos:end]))
        pos = end
    return children


_OID_TAG: Final = 0x06
_OID_PKCS7_DATA: Final = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_SHROUDED_KEY_BAG: Final = bytes.fromhex("2a864886f70d010c0a0102")  # ...1.12.10.1.2


def _pkcs12_encrypted_key(keystore: bytes) -> bytes:
    """The DER EncryptedPrivateKeyInfo of the one key in a keytool PKCS#12 keystore.

    A PKCS#12 key bag holds exactly an encrypted PKCS#8 key (RFC 7292 §4.2.2),
    which OpenSSL reads as an ``ENCRYPTED PRIVATE KEY`` PEM with the keystore's
    password: lifting it out needs a DER walk, not a decryption. keytool stores
    keys in plain ``data`` safe contents (only certificates are encrypted).
    """
    try:
        _, pfx, _ = _der(keystore)
        auth_safe = _der_children(pfx)[1][1]  # PFX: version, authSafe, macData
        _, wrapped = _der_children(auth_safe)  # ContentInfo: data OID, [0] EXPLICIT
        _, octets, _ = _der(wrapped[1])
        for content_info in _der_children(_der(octets)[1]):
            oid, *rest = _der_children(content_info[1])
            if oid[1] != _OID_PKCS7_DATA or not rest:
                continue  # an encryptedData holding the certificates
            _, safe_contents, _ = _der(rest[0][1])
            for bag in _der_children(_der(safe_contents)[1]):
                bag_id, value, *_ = _der_children(bag[1])
                if bag_id[0] == _OID_TAG and bag_id[1] == _OID_SHROUDED_KEY_BAG:
                    return _der_children(value[1])[0][2]
    except (IndexError, ValueError) as exc:
        raise KafkaError(f"unexpected PKCS#12 layout from keytool: {exc!r}") from exc
    raise KafkaError("keytool wrote a PKCS#12 keystore without a private key")


def _pem(label: str, der: bytes) -> str:
    body = base64.encodebytes(der).decode("ascii")  # 76-column lines; PEM readers agree
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


class _Pki:
    """This process's throwaway CA, the broker certificate it signed, and client certificates.

    Made once per process (see :func:`_process_pki`) because keytool is a JVM per
    step: the CA and server keystore take about 2s of keytool on a 2-core machine,
    which every secured broker after the first then skips. The server certificate
    names ``localhost`` and ``127.0.0.1``, the only addresses a LocalBroker listens
    on, so one serves every broker. Everything lives in a private temporary
    directory that is removed when the process exits; brokers copy what they need
    into their run directory.
    """

    def __init__(self, keytool: str) -> None:
        self._keytool = keytool
        self.directory = Path(tempfile.mkdtemp(prefix="streamer-kafka-pki-")).resolve()
        atexit.register(shutil.rmtree, self.directory, ignore_errors=True)
        # The CA's own password never leaves this object; the other one opens the
        # server keystore and the client keys, which brokers and clients must read.
        self._ca_password = secrets.token_urlsafe(24)
        self.store_password = secrets.token_urlsafe(24)
        self._ca_keystore = self.directory / "ca.p12"
        self.ca_pem = self.directory / "ca.pem"
        self.server_keystore = self.directory / "server.p12"
        self._server_lock = threading.Lock()
        self._server_ready = False
        self._clients: dict[str, ClientCertificate] = {}
        self._clients_lock = threading.Lock()

    def ensure_server(self) -> None:
        """Make the CA and the server keystore unless done already (thread-safe)."""
        with self._server_lock:
            if self._server_ready:
                return
            started = time.monotonic()
            # Three rounds of JVMs instead of six in a row: each round's steps are
            # independent and run side by side.
            self._wait(
                self._keytool_proc(
                    "-genkeypair",
                    *self._ca_store(),
                    "-alias",
                    "ca",
                    *_KEY_ARGS,
                    "-dname",
                    _CA_DNAME,
                    "-validity",
                    _CERT_VALIDITY_DAYS,
                    "-startdate",
                    _CERT_START,
                    "-ext",
                    "bc:c",
                    "-ext",
                    "ku:c=keyCertSign,cRLSign",
                ),
                self._new_keypair(self.server_keystore, "server", _SERVER_DNAME),
            )
            export = self._keytool_proc(
                "-exportcert", *self._ca_store(), "-alias", "ca", "-rfc", "-file", str(self.ca_pem)
            )
            server_pem = self._sign(
                self.server_keystore,
                "server",
                ("-ext", _SERVER_SAN, "-ext", "ku:c=digitalSignature", "-ext", "eku=serverAuth"),
                also=(export,),
            )
            chain = self.directory / "server-chain.pem"
            chain.write_text(server_pem + self.ca_pem.read_text(encoding="ascii"), "ascii")
            # A reply with the whole chain is installed without needing the CA as a
            # trusted entry in the keystore first: one JVM fewer.
            self._wait(
                self._keytool_proc(
                    "-importcert",
                    *self._store(self.server_keystore),
                    "-alias",
                    "server",
                    "-file",
                    str(chain),
                    "-noprompt",
                )
            )
            self._server_ready = True
            _log.debug(
                "kafka_pki_made",
                directory=str(self.directory),
                elapsed_s=round(time.monotonic() - started, 2),
            )

    def client(self, cn: str) -> ClientCertificate:
        """A certificate and encrypted key for ``CN=<cn>``, issued once per CN."""
        _check_name("certificate CN", cn)
        self.ensure_server()
        with self._clients_lock:
            cached = self._clients.get(cn)
            if cached is not None:
                return cached
            keystore = self.directory / f"client-{cn}.p12"
            keystore.unlink(missing_ok=True)  # a failed earlier try's leftovers
            self._wait(self._new_keypair(keystore, "client", f"CN={cn}"))
            cert_pem = self._sign(
                keystore, "client", ("-ext", "ku:c=digitalSignature", "-ext", "eku=clientAuth")
            )
            cert_path = self.directory / f"client-{cn}.crt"
            key_path = self.directory / f"client-{cn}.key"
            cert_path.write_text(cert_pem, encoding="ascii")
            key_der = _pkcs12_encrypted_key(keystore.read_bytes())
            key_path.write_text(_pem("ENCRYPTED PRIVATE KEY", key_der), encoding="ascii")
            issued = ClientCertificate(cn, cert_path, key_path, self.store_password)
            self._clients[cn] = issued
            return issued

    # -- keytool plumbing ---------------------------------------------------

    # Passwords reach keytool through its environment (see _keytool_proc), never
    # its command line, which any local user can read in ps.
    def _store(self, keystore: Path) -> tuple[str, ...]:
        return ("-keystore", str(keystore), "-storetype", "PKCS12", "-storepass:env", _STORE_ENV)

    def _ca_store(self) -> tuple[str, ...]:
        return (
            "-keystore",
            str(self._ca_keystore),
            "-storetype",
            "PKCS12",
            "-storepass:env",
            _CA_ENV,
        )

    def _new_keypair(self, keystore: Path, alias: str, dname: str) -> subprocess.Popen[bytes]:
        return self._keytool_proc(
            "-genkeypair",
            *self._store(keystore),
            "-alias",
            alias,
            *_KEY_ARGS,
            "-dname",
            dname,
            "-validity",
            _CERT_VALIDITY_DAYS,
        )

    def _sign(
        self,
        keystore: Path,
        alias: str,
        *extensions: tuple[str, ...],
        also: Sequence[subprocess.Popen[bytes]] = (),
    ) -> str:
        """Have the CA sign the key pair in ``keystore``; return the certificate PEM.

        certreq and gencert run at once, joined by a pipe; ``also`` are running
        keytools to wait for alongside.
        """
        read_end, write_end = os.pipe()
        try:
            request = self._keytool_proc(
                "-certreq", *self._store(keystore), "-alias", alias, stdout=write_end
            )
        finally:
            os.close(write_end)
        try:
            sign = self._keytool_proc(
                "-gencert",
                *self._ca_store(),
                "-alias",
                "ca",
                "-rfc",
                "-validity",
                _CERT_VALIDITY_DAYS,
                "-startdate",
                _CERT_START,
                *(arg for ext in extensions for arg in ext),
                stdin=read_end,
            )
        finally:
            os.close(read_end)
        # The request first: when it fails, gencert's complaint about empty input
        # would only hide the cause.
        outputs = self._wait(request, sign, *also)
        return outputs[1].decode("ascii")

    def _keytool_proc(
        self, *args: str, stdin: int = subprocess.DEVNULL, stdout: int = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        env = {**os.environ, _STORE_ENV: self.store_password, _CA_ENV: self._ca_password}
        return subprocess.Popen(
            [self._keytool, *_KEYTOOL_JVM_FLAGS, *args],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
        )

    def _wait(self, *procs: subprocess.Popen[bytes]) -> list[bytes]:
        """Wait for every keytool; raise KafkaError for the first that failed."""
        outputs: list[bytes] = []
        failure: str | None = None
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=_KEYTOOL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                out, err = b"", f"timed out after {_KEYTOOL_TIMEOUT_S:.0f}s".encode()
                proc.kill()
                proc.wait()
            outputs.append(out or b"")
            if failure is None and proc.returncode != 0:
                args = cast("list[str]", proc.args)
                shown = " ".join(a for a in args if not a.startswith("-J"))
                text = (out or b"").decode("utf-8", "replace") + (err or b"").decode(
                    "utf-8", "replace"
                )
                failure = f"{shown} failed (exit {proc.returncode}):\n{_tail(text)}"
        if failure is not None:
            raise KafkaError(failure)
        return outputs


_pki_lock = threading.Lock()
_pki: _Pki | None = None
_pki_pid: int | None = None


def _process_pki() -> _Pki:
    """This process's :class:`_Pki`; its passwords and paths are known at once, while
    the keytool work waits for :meth:`_Pki.ensure_server`."""
    global _pki, _pki_pid
    with _pki_lock:
        # A forked child must not share the parent's directory, which the parent's
        # exit removes.
        if _pki is None or _pki_pid != os.getpid():
            _pki = _Pki(_keytool())
            _pki_pid = os.getpid()
        return _pki


@dataclass(frozen=True)
class _SecureListeners:
    """The server.properties of a secured broker, on top of the plain ones.

    Listeners: the clients' SASL_SSL (SCRAM-SHA-512) on the client port and, with
    mTLS, an SSL listener that requires a client certificate. The broker's own
    traffic authenticates as ``User:localbroker-internal``, a super user known only
    to a static PLAIN JAAS entry with a random password that lives in this
    server.properties alone: over SASL_PLAINTEXT on the loopback controller listener
    (SCRAM is not supported there, and TLS between a process and itself buys
    nothing) and over SASL_SSL on an INTERNAL listener for inter-broker traffic,
    which a single node still uses to write transaction markers to itself. No
    listener is plaintext, so ``User:ANONYMOUS`` exists nowhere and needs no rights;
    a plaintext internal listener would have needed it as a super user, and any
    local process that found the port would then bypass every ACL.
    """

    internal_port: int
    mtls_port: int | None
    internal_password: str
    keystore: Path
    store_password: str
    ca_pem: Path
    super_users: tuple[str, ...]

    def settings(self, port: int, controller_port: int) -> dict[str, object]:
        client_listeners = [
            f"SASL_SSL://{_HOST}:{port}",
            f"INTERNAL://{_HOST}:{self.internal_port}",
        ]
        protocols = "CONTROLLER:SASL_PLAINTEXT,INTERNAL:SASL_SSL,SASL_SSL:SASL_SSL"
        if self.mtls_port is not None:
            client_listeners.append(f"MTLS://{_HOST}:{self.mtls_port}")
            protocols += ",MTLS:SSL"
        user, password = _INTERNAL_USER, self.internal_password
        # username/password are what the broker logs in with; user_<name> is the one
        # account the listener accepts.
        plain_jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{user}" password="{password}" user_{user}="{password}";'
        )
        settings: dict[str, object] = {
            "listeners": ",".join([*client_listeners, f"CONTROLLER://{_HOST}:{controller_port}"]),
            "advertised.listeners": ",".join(client_listeners),
            "inter.broker.listener.name": "INTERNAL",
            "listener.security.protocol.map": protocols,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            # Each listener offers only its own mechanism: the internal account is
            # useless on the client listener and SCRAM users on the internal ones.
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain_jaas,
            "listener.name.internal.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.internal.plain.sasl.jaas.config": plain_jaas,
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": _SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": self.store_password,
            "ssl.key.password": self.store_password,
            # The CA as PEM, the same file the clients get: no truststore to build.
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_pem),
            "listener.name.mtls.ssl.client.auth": "required",
            "listener.name.mtls.ssl.principal.mapping.rules": _MTLS_PRINCIPAL_RULES,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": ";".join(f"User:{name}" for name in (user, *self.super_users)),
        }
        return settings


class _PortTakenError(KafkaError):
    """Another process bound the port between our probe and the broker's bind."""


class _Resources:
    """What a LocalBroker must release even if it is never stopped (see weakref.finalize)."""

    __slots__ = ("cds_partial", "detached", "owned_dir", "proc")

    def __init__(self, *, detached: bool) -> None:
        self.detached = detached
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned_dir: Path | None = None
        self.cds_partial: Path | None = None

    def release(self) -> None:
        # A detached broker is meant to outlive this Python process.
        if self.detached:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        _adopt_cds(self.cds_partial, clean_exit=False)
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


class LocalBroker:
    """One Kafka broker+controller JVM listening on 127.0.0.1, with its own data directory.

    Args:
        run_dir: directory for the configuration, data and logs. When ``None`` a
            temporary directory is made at :meth:`start` and removed by :meth:`stop`.
        version: Kafka release (its jars are fetched by :func:`ensure_jars`).
        port: client port; a free one is picked when ``None``. The controller port is
            always picked free. Both are kept across :meth:`restart`.
        detached: start the JVM in its own session so it survives this process and
            a Ctrl-C in the terminal (used by ``start`` on the command line).
        security: run a secured broker instead (see :class:`BrokerSecurity`): the
            client port is then SASL_SSL, clients take their settings from
            :meth:`client_config` or :meth:`mtls_client_config`, and :meth:`start`
            makes the process's throwaway CA and server certificate first (once
            per process, about 1s more than a later secured start). ``None``, the
            default, is a plaintext broker without authentication or ACLs.

    :meth:`stop` then :meth:`start` on a ``run_dir`` you passed, :meth:`restart`, and
    :meth:`start` after :meth:`kill` all reuse the data directory and ports, so topics
    and committed offsets survive: that is what broker-restart fault tests need.
    """

    def __init__(
        self,
        run_dir: Path | None = None,
        version: str = DEFAULT_VERSION,
        port: int | None = None,
        *,
        detached: bool = False,
        security: BrokerSecurity | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise KafkaError(f"port must be between 1 and 65535, got {port}")
        self._version = version
        self._requested_port = port
        self._owns_run_dir = run_dir is None
        self._run_dir: Path | None = None if run_dir is None else Path(run_dir).resolve()
        self._port: int | None = None
        self._controller_port: int | None = None
        self._security = security
        # Only a secured broker has these two listeners (see _SecureListeners).
        self._internal_port: int | None = None
        self._mtls_port: int | None = None
        self._internal_password = secrets.token_urlsafe(24)
        self._cds: Path | None = None
        self._res = _Resources(detached=detached)
        self._finalizer = weakref.finalize(self, self._res.release)

    # -- properties ---------------------------------------------------------

    @property
    def version(self) -> str:
        """The Kafka release this broker runs."""
        return self._version

    @property
    def security(self) -> BrokerSecurity | None:
        """How the broker is secured; ``None`` for a plaintext broker."""
        return self._security

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` clients connect to; known from the first :meth:`start` on.

        The plaintext listener, or the SASL_SSL one of a secured broker.
        """
        if self._port is None:
            raise KafkaError("the broker has no address yet: call start() first")
        return f"{_HOST}:{self._port}"

    @property
    def mtls_bootstrap(self) -> str:
        """The ``host:port`` of a secured broker's mTLS listener (``mtls=True``)."""
        if self._security is None or not self._security.mtls:
            raise KafkaError("the broker has no mTLS listener: pass BrokerSecurity(mtls=True)")
        if self._mtls_port is None:
            raise KafkaError("the broker has no address yet: call start() first")
        return f"{_HOST}:{self._mtls_port}"

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed a secured broker's certificate (``ssl.ca.location``)."""
        self._require_security()
        path = self.run_dir / "tls" / "ca.pem"
        if not path.is_file():
            raise KafkaError("the broker has no CA yet: call start() first")
        return path

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM while it runs, else ``None``."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the broker JVM is alive (not whether it is ready)."""
        return self.pid is not None

    @property
    def run_dir(self) -> Path:
        """Directory with ``server.properties``, the data and the logs."""
        if self._run_dir is None:
            raise KafkaError("the broker has no run directory yet: call start() first")
        return self._run_dir

    @property
    def data_dir(self) -> Path:
        """The broker's ``log.dirs`` (also its KRaft metadata directory)."""
        return self.run_dir / "data"

    @property
    def log_path(self) -> Path:
        """The broker's log4j log file."""
        return self.run_dir / "server.log"

    @property
    def console_path(self) -> Path:
        """The JVM's stdout and stderr (errors from before logging starts land here)."""
        return self.run_dir / "console.log"

    # -- clients of a secured broker -----------------------------------------

    def client_config(self, user: str) -> dict[str, str]:
        """librdkafka settings for ``user`` on the SASL_SSL listener, bootstrap included.

        ``Producer(broker.client_config("streamer"))`` is a complete configuration;
        add what the client itself needs (``group.id``...).

        Raises:
            KafkaError: the broker is not secured or not started, or has no such user.
        """
        security = self._require_security()
        password = security.users.get(user)
        if password is None:
            raise KafkaError(f"no SCRAM user {user!r}: the users are {sorted(security.users)}")
        return {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": _SCRAM_MECHANISM,
            "sasl.username": user,
            "sasl.password": password,
            "ssl.ca.location": str(self.ca_path),
        }

    def issue_client_certificate(self, cn: str) -> ClientCertificate:
        """A client certificate for ``CN=<cn>`` with its key, signed by the broker's CA.

        On the mTLS listener it authenticates as ``User:<cn>``. Issued once per CN
        and process (about a second of keytool), and valid for every secured
        LocalBroker in this process, which all share one CA.
        """
        self._require_security()
        return _process_pki().client(cn)

    def mtls_client_config(self, cn: str) -> dict[str, str]:
        """librdkafka settings for the mTLS listener as ``CN=<cn>``, bootstrap included.

        The certificate comes from :meth:`issue_client_certificate`.
        """
        bootstrap, ca_path = self.mtls_bootstrap, self.ca_path
        cert = self.issue_client_certificate(cn)
        return {
            "bootstrap.servers": bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.location": str(ca_path),
            "ssl.certificate.location": str(cert.cert_path),
            "ssl.key.location": str(cert.key_path),
            "ssl.key.password": cert.key_password,
        }

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the broker (formatting fresh storage first) and wait until it serves.

        Returns the bootstrap address. Calling it on a running broker returns at once.

        Raises:
            KafkaError: the jars cannot be had, formatting failed, or the broker did
                not log "Kafka Server started" within ``timeout_s`` (the message
                carries the tail of its logs).
        """
        if self.running:
            return self.bootstrap
        started = time.monotonic()
        libs = ensure_jars(self._version)
        java = _java()
        pki_ready: Future[None] | None = None
        if self._security is not None:
            # keytool's JVMs run while the storage tool's does; only the broker launch
            # needs their files. Measured on the 2-core machine, start() to started,
            # median of 4: plain 1.7s; secured 2.5s, or 3.6s for the first secured
            # broker of a process, which also makes the CA (2.1s of keytool alone).
            pki = _process_pki()
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localbroker-pki")
            pki_ready = pool.submit(pki.ensure_server)
            pool.shutdown(wait=False)
        run_dir = self._prepare_run_dir()
        classpath = _classpath(libs)
        try:
            self._cds = _cds_archive(libs, java, classpath)
            self._cds.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a read-only shared libs dir: start without it
            _log.warning("kafka_cds_unavailable", error=str(exc))
            self._cds = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "log4j2.properties").write_text(
            _LOG4J2_CONFIG.format(log_path=self.log_path), encoding="utf-8"
        )
        # Ports are chosen once, so a restart comes back at the same address.
        first_start = self._port is None or self._controller_port is None
        for attempt in range(1, _BIND_RETRIES + 1):
            if self._port is None or self._controller_port is None:
                self._pick_ports()
                assert self._port is not None and self._controller_port is not None
            self._write_properties(self._port, self._controller_port)
            if not (self.data_dir / "meta.properties").is_file():
                self._format(java, classpath)
            if pki_ready is not None:
                pki_ready.result()
                self._install_tls()
                pki_ready = None
            try:
                self._launch_and_wait(java, classpath, timeout_s - (time.monotonic() - started))
                break
            except _PortTakenError:
                # Probing for a free port races with every other process on the
                # machine, so a port we picked may be taken by the time Kafka binds
                # it; pick again, but never move a port the caller or a restart fixed.
                if not first_start or self._requested_port is not None:
                    raise
                if attempt == _BIND_RETRIES:
                    raise
                _log.warning("kafka_port_taken", port=self._port, attempt=attempt)
                self._port = self._controller_port = None
                self._internal_port = self._mtls_port = None
        _log.info(
            "kafka_broker_started",
            bootstrap=self.bootstrap,
            pid=self.pid,
            version=self._version,
            run_dir=str(run_dir),
            elapsed_s=round(time.monotonic() - started, 1),
        )
        return self.bootstrap

    def stop(self, timeout_s: float = 20.0, *, keep_data: bool = False) -> None:
        """Stop the broker: SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``.

        A temporary run directory is removed unless ``keep_data`` is set; a run
        directory you passed is always kept. Stopping a stopped broker does nothing.
        """
        proc = self._res.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _log.warning(
                        "kafka_broker_kill_after_timeout", pid=proc.pid, timeout_s=timeout_s
                    )
                    proc.kill()
                    proc.wait(timeout=10)
            _log.info("kafka_broker_stopped", pid=proc.pid, returncode=proc.returncode)
            # 143 is the JVM's exit after SIGTERM ran its shutdown hooks to the end.
            _adopt_cds(self._res.cds_partial, clean_exit=proc.returncode in (0, 143))
            self._res.cds_partial = None
            self._res.proc = None
        if self._owns_run_dir and not keep_data and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._res.owned_dir = None
            self._port = self._controller_port = None
            self._internal_port = self._mtls_port = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, keeping its data for a later :meth:`start`."""
        proc = self._res.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
            _log.info("kafka_broker_killed", pid=proc.pid)
        _adopt_cds(self._res.cds_partial, clean_exit=False)
        self._res.cds_partial = None
        self._res.proc = None

    def restart(self, timeout_s: float = 90.0) -> str:
        """Stop the broker cleanly and start it again on the same data and ports."""
        self.stop(keep_data=True)
        return self.start(timeout_s)

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _prepare_run_dir(self) -> Path:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="streamer-kafka-")).resolve()
            self._res.owned_dir = self._run_dir
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return self._run_dir

    def _require_security(self) -> BrokerSecurity:
        if self._security is None:
            raise KafkaError("the broker is not secured: pass LocalBroker(security=...)")
        return self._security

    def _pick_ports(self) -> None:
        self._port = self._requested_port or _free_port()
        self._controller_port = _free_port(exclude=(self._port,))
        if self._security is not None:
            taken = [self._port, self._controller_port]
            self._internal_port = _free_port(exclude=taken)
            if self._security.mtls:
                self._mtls_port = _free_port(exclude=[*taken, self._internal_port])

    def _secure_listeners(self) -> _SecureListeners | None:
        if self._security is None:
            return None
        assert self._internal_port is not None, "ports are picked before properties"
        tls = self.run_dir / "tls"
        return _SecureListeners(
            internal_port=self._internal_port,
            mtls_port=self._mtls_port,
            internal_password=self._internal_password,
            keystore=tls / "server.p12",
            store_password=_process_pki().store_password,
            ca_pem=tls / "ca.pem",
            super_users=tuple(self._security.super_users),
        )

    def _install_tls(self) -> None:
        """Copy the process's server keystore and CA into the run directory.

        The run directory then holds all the broker reads, like a plain one, so a
        detached broker restarted from it never depends on this process's files.
        """
        pki = _process_pki()
        tls = self.run_dir / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(pki.server_keystore, tls / "server.p12")
        shutil.copyfile(pki.ca_pem, tls / "ca.pem")

    def _write_properties(self, port: int, controller_port: int) -> None:
        text = _server_properties(self.data_dir, port, controller_port, self._secure_listeners())
        (self.run_dir / "server.properties").write_text(text, encoding="utf-8")

    def _jvm(self, java: str, classpath: str, *, dump_cds: bool = False) -> list[str]:
        cds: list[str] = []
        if self._cds is not None:
            if self._cds.is_file():
                cds = [f"-XX:SharedArchiveFile={self._cds}"]
            elif dump_cds:
                # No archive for this JDK and jar set yet: this JVM writes one when it
                # exits, under a unique name, adopted only after a clean exit.
                partial = self._cds.with_name(f"{self._cds.stem}.{uuid.uuid4().hex[:8]}.partial")
                self._res.cds_partial = partial
                cds = [f"-XX:ArchiveClassesAtExit={partial}"]
        return [
            java,
            *_JVM_FLAGS,
            *cds,
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.run_dir}",
            "-cp",
            classpath,
        ]

    def _format(self, java: str, classpath: str) -> None:
        cluster_id = _cluster_id()
        cmd = [
            *self._jvm(java, classpath),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.run_dir / "server.properties"),
        ]
        if self._security is not None:
            # SCRAM credentials are metadata records; formatting writes them into the
            # bootstrap snapshot, so the users exist before any listener opens.
            for name, password in self._security.users.items():
                cmd += ["--add-scram", f"{_SCRAM_MECHANISM}=[name={name},password={password}]"]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_FORMAT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaError(f"formatting Kafka storage took over {exc.timeout:.0f}s") from exc
        if result.returncode != 0:
            raise KafkaError(
                f"formatting Kafka storage in {self.data_dir} failed "
                f"(exit {result.returncode}):\n{_tail(result.stdout + result.stderr)}"
            )
        _log.debug("kafka_storage_formatted", cluster_id=cluster_id, data_dir=str(self.data_dir))

    def _launch_and_wait(self, java: str, classpath: str, timeout_s: float) -> None:
        cmd = [
            *self._jvm(java, classpath, dump_cds=True),
            "kafka.Kafka",
            str(self.run_dir / "server.properties"),
        ]
        # Search only what this launch writes: on a restart the log already holds a
        # "started" line from the previous run.
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        console: IO[bytes]
        with self.console_path.open("ab") as console:
            proc = subprocess.Popen(
                cmd,
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=self._res.detached,
            )
        self._res.proc = proc
        _log.debug("kafka_broker_launched", pid=proc.pid, bootstrap=self.bootstrap)
        deadline = time.monotonic() + max(timeout_s, 1.0)
        while True:
            if _STARTED_MARKER in self._read_log(log_offset):
                return
            returncode = proc.poll()
            if returncode is not None or time.monotonic() > deadline:
                self.kill()
                what = (
                    f"exited with code {returncode}"
                    if returncode is not None
                    else f"did not start within {timeout_s:.0f}s"
                )
                log = self._read_log(log_offset)
                # The cause is logged first and then buried under shutdown chatter, so
                # quote the errors on their own as well as the tail.
                message = (
                    f"Kafka broker on {self.bootstrap} {what}\n"
                    f"--- errors in {self.log_path} ---\n{_error_lines(log)}\n"
                    f"--- {self.log_path} (tail) ---\n{_tail(log, 20)}\n"
                    f"--- {self.console_path} (tail) ---\n{_tail_file(self.console_path)}"
                )
                if "Address already in use" in log:
                    raise _PortTakenError(message)
                raise KafkaError(message)
            time.sleep(0.1)

    def _read_log(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


# -- command line -----------------------------------------------------------


def _state_dir() -> Path:
    return cache_root() / "broker"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _is_our_broker(pid: int, run_dir: str) -> bool:
    """Whether ``pid`` is still the broker JVM we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return False
    return "kafka.Kafka" in cmdline and run_dir in cmdline


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    # A zombie has finished; in a container whose init never reaps, it stays one.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM ``pid``, SIGKILL it after ``timeout_s``; return whether it exited cleanly."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    # Not our child, so there is nothing to wait() on: poll until the pid is gone.
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    _log.warning("kafka_broker_kill_after_timeout", pid=pid, timeout_s=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


def _cmd_fetch(args: argparse.Namespace) -> int:
    libs = ensure_jars(args.kafka_version)
    print(f"Kafka {args.kafka_version} jars in {libs}", file=sys.stderr)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    state_dir = _state_dir()
    state_path = state_dir / "state.json"
    with _file_lock(state_dir / ".lock"):
        state = _read_state(state_path)
        if state is not None and _is_our_broker(int(state["pid"]), str(state["run_dir"])):
            print(f"a broker is already running (pid {state['pid']})", file=sys.stderr)
            print(state["bootstrap"])
            return 0
        run_dir = state_dir / "run"
        # Each start gets fresh storage, so stale topics never leak between sessions.
        shutil.rmtree(run_dir, ignore_errors=True)
        state_path.unlink(missing_ok=True)
        broker = LocalBroker(run_dir, version=args.kafka_version, port=args.port, detached=True)
        print(f"starting Kafka {args.kafka_version} (logs in {run_dir})...", file=sys.stderr)
        bootstrap = broker.start(timeout_s=args.timeout)
        partial = broker._res.cds_partial
        state = {
            "pid": broker.pid,
            "bootstrap": bootstrap,
            "run_dir": str(broker.run_dir),
            "version": args.kafka_version,
            "cds_partial": None if partial is None else str(partial),
        }
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(state_path)
    print(bootstrap)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    state_dir = _state_dir()
    state_path = state_dir / "state.json"
    with _file_lock(state_dir / ".lock"):
        state = _read_state(state_path)
        if state is None:
            print("no broker running", file=sys.stderr)
            return 0
        pid, run_dir = int(state["pid"]), str(state["run_dir"])
        clean = False
        if _is_our_broker(pid, run_dir):
            clean = _terminate(pid, args.timeout)
            print(f"stopped the broker on {state['bootstrap']}", file=sys.stderr)
        else:
            print("the broker had already exited", file=sys.stderr)
        partial = state.get("cds_partial")
        _adopt_cds(Path(partial) if partial else None, clean_exit=clean)
        shutil.rmtree(run_dir, ignore_errors=True)
        state_path.unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = _read_state(_state_dir() / "state.json")
    if state is None or not _is_our_broker(int(state["pid"]), str(state["run_dir"])):
        print("no broker running", file=sys.stderr)
        return 1
    print(state["bootstrap"])
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer broker",
        description="Run a local single-node Kafka broker (KRaft) from its Maven Central jars.",
    )
    parser.add_argument(
        "--kafka-version",
        default=DEFAULT_VERSION,
        help=f"Kafka release (default {DEFAULT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the broker jars into the cache and exit")
    start = sub.add_parser("start", help="start a detached broker and print its bootstrap address")
    start.add_argument("--port", type=_port, default=None, help="client port (default: a free one)")
    start.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness")
    stop = sub.add_parser("stop", help="stop the broker started by 'start' and delete its data")
    stop.add_argument("--timeout", type=float, default=20.0, help="seconds before SIGKILL")
    sub.add_parser("status", help="print the running broker's address; exit 1 when none runs")
    return parser


_COMMANDS: Final = {
    "fetch": _cmd_fetch,
    "start": _cmd_start,
    "stop": _cmd_stop,
    "status": _cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    """Run ``fetch``, ``start``, ``stop`` or ``status``; return the process exit code.

    Only ``start`` and ``status`` write to stdout, and only the bootstrap address, so
    scripts can do ``BOOTSTRAP=$(streamer broker start)``; the caller must route
    structlog to stderr (structlog's default is stdout). Exit codes: 0 success,
    1 failure (or no broker, for ``status``), 2 bad arguments.
    """
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # structlog prints to stdout by default, and stdout belongs to the address alone.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    sys.exit(main(sys.argv[1:]))
