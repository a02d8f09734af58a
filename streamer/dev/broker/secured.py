"""What a secured broker adds to a plain one, and the settings its clients connect with."""

from __future__ import annotations

import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

from streamer.dev.broker.pki import (
    _SCRAM_MECHANISM,
    BrokerSecurity,
    ClientCertificate,
    _process_pki,
    _SecureListeners,
)
from streamer.dev.broker.ports import ListenerPorts
from streamer.dev.broker.rundir import RunFiles
from streamer.errors import KafkaError


class SecureSetup:
    """A secured broker's SCRAM users, TLS files and extra listeners.

    Args:
        security: the users, super users and whether there is an mTLS listener.

    The broker's own principal gets a random password, made here and written only
    into the broker's ``server.properties``.
    """

    def __init__(self, security: BrokerSecurity) -> None:
        self.security = security
        self._internal_password = secrets.token_urlsafe(24)

    def prepare_pki(self) -> Future[None]:
        """Make the process's CA and server certificate in the background, once per process."""
        # keytool's JVMs run while the storage tool's does; only the broker launch
        # needs their files. Measured on the 2-core machine, start() to started,
        # median of 4: plain 1.7s; secured 2.5s, or 3.6s for the first secured
        # broker of a process, which also makes the CA (2.1s of keytool alone).
        pki = _process_pki()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localbroker-pki")
        ready = pool.submit(pki.ensure_server)
        pool.shutdown(wait=False)
        return ready

    def scram_arguments(self) -> list[str]:
        """The storage tool's arguments that create the SCRAM users."""
        # SCRAM credentials are metadata records; formatting writes them into the
        # bootstrap snapshot, so the users exist before any listener opens.
        args: list[str] = []
        for name, password in self.security.users.items():
            args += ["--add-scram", f"{_SCRAM_MECHANISM}=[name={name},password={password}]"]
        return args

    def listeners(self, files: RunFiles, ports: ListenerPorts) -> _SecureListeners:
        """The secured listeners' settings for a broker in ``files`` on ``ports``."""
        assert ports.internal is not None, "ports are picked before properties"
        return _SecureListeners(
            internal_port=ports.internal,
            mtls_port=ports.mtls,
            internal_password=self._internal_password,
            keystore=files.keystore,
            store_password=_process_pki().store_password,
            ca_pem=files.ca_pem,
            super_users=tuple(self.security.super_users),
        )

    def install_tls(self, files: RunFiles) -> None:
        """Copy the process's server keystore and CA into the run directory.

        The run directory then holds all the broker reads, like a plain one, so a
        detached broker restarted from it never depends on this process's files.
        """
        pki = _process_pki()
        files.tls_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(pki.server_keystore, files.keystore)
        shutil.copyfile(pki.ca_pem, files.ca_pem)

    def password(self, user: str) -> str:
        """The SCRAM password of ``user``.

        Raises:
            KafkaError: there is no such user.
        """
        password = self.security.users.get(user)
        if password is None:
            raise KafkaError(f"no SCRAM user {user!r}: the users are {sorted(self.security.users)}")
        return password

    def client_certificate(self, cn: str) -> ClientCertificate:
        """A client certificate for ``CN=<cn>``, issued once per CN and process."""
        return _process_pki().client(cn)


def scram_client_config(user: str, password: str, bootstrap: str, ca_path: str) -> dict[str, str]:
    """librdkafka settings for ``user`` on a SASL_SSL (SCRAM-SHA-512) listener."""
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": _SCRAM_MECHANISM,
        "sasl.username": user,
        "sasl.password": password,
        "ssl.ca.location": ca_path,
    }


def mtls_client_config(cert: ClientCertificate, bootstrap: str, ca_path: str) -> dict[str, str]:
    """librdkafka settings for an mTLS listener, authenticating with ``cert``."""
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": ca_path,
        "ssl.certificate.location": str(cert.cert_path),
        "ssl.key.location": str(cert.key_path),
        "ssl.key.password": cert.key_password,
    }
