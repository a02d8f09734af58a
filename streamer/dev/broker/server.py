"""The broker process: its configuration, ports, start, stop and restart."""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from streamer.dev.broker.jvm import (
    _BIND_RETRIES,
    _FORMAT_TIMEOUT_S,
    _HOST,
    _JVM_FLAGS,
    _LOG4J2_CONFIG,
    _NODE_ID,
    _STARTED_MARKER,
    DEFAULT_VERSION,
    _adopt_cds,
    _cds_archive,
    _classpath,
    _error_lines,
    _java,
    _tail,
    _tail_file,
    ensure_jars,
)
from streamer.dev.broker.pki import (
    _SCRAM_MECHANISM,
    BrokerSecurity,
    ClientCertificate,
    _process_pki,
    _SecureListeners,
)
from streamer.errors import KafkaError

_log = structlog.get_logger("streamer.dev.broker")


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
    lines = ["# Written by streamer.dev.broker; rewritten on every start."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


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
