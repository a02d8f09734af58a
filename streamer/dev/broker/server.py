"""The broker: its run directory, ports, start, stop and restart."""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType

import structlog

from streamer.dev.broker.jvm import _BIND_RETRIES, DEFAULT_VERSION, _java, ensure_jars
from streamer.dev.broker.pki import BrokerSecurity, ClientCertificate
from streamer.dev.broker.ports import ListenerPorts
from streamer.dev.broker.process import BrokerJvm, BrokerResources, PortTakenError
from streamer.dev.broker.rundir import RunFiles
from streamer.dev.broker.secured import SecureSetup, mtls_client_config, scram_client_config
from streamer.errors import KafkaError

_log = structlog.get_logger("streamer.dev.broker")


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
        self._ports = ListenerPorts(
            port, secured=security is not None, mtls=security is not None and security.mtls
        )
        self._version = version
        self._owns_run_dir = run_dir is None
        self._run_dir: Path | None = None if run_dir is None else Path(run_dir).resolve()
        self._secure = None if security is None else SecureSetup(security)
        self._res = BrokerResources(detached=detached)
        self._finalizer = weakref.finalize(self, self._res.release)

    # -- properties ---------------------------------------------------------

    @property
    def version(self) -> str:
        """The Kafka release this broker runs."""
        return self._version

    @property
    def security(self) -> BrokerSecurity | None:
        """How the broker is secured; ``None`` for a plaintext broker."""
        return None if self._secure is None else self._secure.security

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` clients connect to; known from the first :meth:`start` on.

        The plaintext listener, or the SASL_SSL one of a secured broker.
        """
        return self._ports.client_address()

    @property
    def mtls_bootstrap(self) -> str:
        """The ``host:port`` of a secured broker's mTLS listener (``mtls=True``)."""
        if self._secure is None or not self._secure.security.mtls:
            raise KafkaError("the broker has no mTLS listener: pass BrokerSecurity(mtls=True)")
        return self._ports.mtls_address()

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed a secured broker's certificate (``ssl.ca.location``)."""
        self._require_secure()
        path = self._files.ca_pem
        if not path.is_file():
            raise KafkaError("the broker has no CA yet: call start() first")
        return path

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM while it runs, else ``None``."""
        return self._res.pid

    @property
    def cds_partial(self) -> Path | None:
        """A class-data archive the JVM is still writing, adopted when it exits cleanly.

        A detached broker outlives this object, so ``streamer.dev.broker stop`` needs
        the path to adopt (or discard) the archive after the JVM is gone.
        """
        return self._res.cds_partial

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
        return self._files.data_dir

    @property
    def log_path(self) -> Path:
        """The broker's log4j log file."""
        return self._files.log

    @property
    def console_path(self) -> Path:
        """The JVM's stdout and stderr (errors from before logging starts land here)."""
        return self._files.console

    # -- clients of a secured broker -----------------------------------------

    def client_config(self, user: str) -> dict[str, str]:
        """librdkafka settings for ``user`` on the SASL_SSL listener, bootstrap included.

        ``Producer(broker.client_config("streamer"))`` is a complete configuration;
        add what the client itself needs (``group.id``...).

        Raises:
            KafkaError: the broker is not secured or not started, or has no such user.
        """
        password = self._require_secure().password(user)
        return scram_client_config(user, password, self.bootstrap, str(self.ca_path))

    def issue_client_certificate(self, cn: str) -> ClientCertificate:
        """A client certificate for ``CN=<cn>`` with its key, signed by the broker's CA.

        On the mTLS listener it authenticates as ``User:<cn>``. Issued once per CN
        and process (about a second of keytool), and valid for every secured
        LocalBroker in this process, which all share one CA.
        """
        return self._require_secure().client_certificate(cn)

    def mtls_client_config(self, cn: str) -> dict[str, str]:
        """librdkafka settings for the mTLS listener as ``CN=<cn>``, bootstrap included.

        The certificate comes from :meth:`issue_client_certificate`.
        """
        bootstrap, ca_path = self.mtls_bootstrap, self.ca_path
        cert = self.issue_client_certificate(cn)
        return mtls_client_config(cert, bootstrap, str(ca_path))

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
        pki_ready = None if self._secure is None else self._secure.prepare_pki()
        files = self._prepare_run_dir()
        jvm = BrokerJvm(libs, java, files, self._res)
        files.write_logging()
        self._configure_and_launch(jvm, files, pki_ready, started + timeout_s)
        _log.info(
            "kafka_broker_started",
            bootstrap=self.bootstrap,
            pid=self.pid,
            version=self._version,
            run_dir=str(files.root),
            elapsed_s=round(time.monotonic() - started, 1),
        )
        return self.bootstrap

    def stop(self, timeout_s: float = 20.0, *, keep_data: bool = False) -> None:
        """Stop the broker: SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``.

        A temporary run directory is removed unless ``keep_data`` is set; a run
        directory you passed is always kept. Stopping a stopped broker does nothing.
        """
        self._res.stop(timeout_s)
        if self._owns_run_dir and not keep_data and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._res.owned_dir = None
            self._ports.forget()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, keeping its data for a later :meth:`start`."""
        self._res.kill()

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

    @property
    def _files(self) -> RunFiles:
        return RunFiles(self.run_dir)

    def _prepare_run_dir(self) -> RunFiles:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="streamer-kafka-")).resolve()
            self._res.owned_dir = self._run_dir
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return RunFiles(self._run_dir)

    def _require_secure(self) -> SecureSetup:
        if self._secure is None:
            raise KafkaError("the broker is not secured: pass LocalBroker(security=...)")
        return self._secure

    def _configure_and_launch(
        self,
        jvm: BrokerJvm,
        files: RunFiles,
        pki_ready: Future[None] | None,
        deadline: float,
    ) -> None:
        """Write the configuration, format new storage, and launch until a bind succeeds."""
        # Ports are chosen once, so a restart comes back at the same address.
        first_start = not self._ports.picked
        for attempt in range(1, _BIND_RETRIES + 1):
            port, controller_port = self._ports.ensure()
            secure = self._secure
            listeners = None if secure is None else secure.listeners(files, self._ports)
            files.write_properties(port, controller_port, listeners)
            if not files.formatted:
                jvm.format(() if secure is None else secure.scram_arguments())
            if pki_ready is not None and secure is not None:
                pki_ready.result()
                secure.install_tls(files)
                pki_ready = None
            try:
                jvm.launch_and_wait(self.bootstrap, deadline - time.monotonic())
                return
            except PortTakenError:
                # Probing for a free port races with every other process on the
                # machine, so a port we picked may be taken by the time Kafka binds
                # it; pick again, but never move a port the caller or a restart fixed.
                if not first_start or self._ports.requested is not None:
                    raise
                if attempt == _BIND_RETRIES:
                    raise
                _log.warning("kafka_port_taken", port=port, attempt=attempt)
                self._ports.forget()
