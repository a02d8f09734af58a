"""A secured broker: SCRAM users, a throwaway CA and certificates made with keytool, ACLs."""

from __future__ import annotations

import atexit
import base64
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

import structlog

from streamer.dev.broker.jvm import (
    _HOST,
    _java,
    _tail,
)
from streamer.errors import KafkaError

_log = structlog.get_logger("streamer.dev.broker")


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
CA_DNAME: Final = "CN=streamer LocalBroker throwaway CA"
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


def keytool() -> str:
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


def pkcs12_encrypted_key(keystore: bytes) -> bytes:
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


class Pki:
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
        self.keytool = keytool
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
                    CA_DNAME,
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
            key_der = pkcs12_encrypted_key(keystore.read_bytes())
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
            [self.keytool, *_KEYTOOL_JVM_FLAGS, *args],
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
_pki: Pki | None = None
_pki_pid: int | None = None


def _process_pki() -> Pki:
    """This process's :class:`Pki`; its passwords and paths are known at once, while
    the keytool work waits for :meth:`Pki.ensure_server`."""
    global _pki, _pki_pid
    with _pki_lock:
        # A forked child must not share the parent's directory, which the parent's
        # exit removes.
        if _pki is None or _pki_pid != os.getpid():
            _pki = Pki(keytool())
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
