"""The broker's JVMs: formatting its storage, launching it, waiting until it serves, ending it."""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import structlog

from streamer.dev.broker.jvm import (
    _FORMAT_TIMEOUT_S,
    _JVM_FLAGS,
    _STARTED_MARKER,
    _adopt_cds,
    _cds_archive,
    _classpath,
    _error_lines,
    _run_tool,
    _tail,
    _tail_file,
)
from streamer.dev.broker.rundir import RunFiles
from streamer.errors import KafkaError

_log = structlog.get_logger("streamer.dev.broker")


class PortTakenError(KafkaError):
    """Another process bound the port between our probe and the broker's bind."""


def cluster_id() -> str:
    """A fresh Kafka cluster id that the storage tool accepts."""
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without padding. Like
    # Kafka's own Uuid.randomUuid(), skip ids starting with "-": the storage tool's
    # argument parser would read one as an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


class BrokerResources:
    """The broker JVM and what it leaves behind, released even if the broker is never stopped.

    A :class:`~streamer.dev.broker.LocalBroker` hands :meth:`release` to
    ``weakref.finalize``, which is why this holds no reference back to it.
    """

    __slots__ = ("cds_partial", "detached", "owned_dir", "proc")

    def __init__(self, *, detached: bool) -> None:
        self.detached = detached
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned_dir: Path | None = None
        self.cds_partial: Path | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM while it runs, else ``None``."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the JVM (a clean shutdown), then SIGKILL it after ``timeout_s``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _log.warning("kafka_broker_kill_after_timeout", pid=proc.pid, timeout_s=timeout_s)
                proc.kill()
                proc.wait(timeout=10)
        _log.info("kafka_broker_stopped", pid=proc.pid, returncode=proc.returncode)
        # 143 is the JVM's exit after SIGTERM ran its shutdown hooks to the end.
        _adopt_cds(self.cds_partial, clean_exit=proc.returncode in (0, 143))
        self.cds_partial = None
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the JVM, as a crash would; a class-data archive it was writing is dropped."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
            _log.info("kafka_broker_killed", pid=proc.pid)
        _adopt_cds(self.cds_partial, clean_exit=False)
        self.cds_partial = None
        self.proc = None

    def release(self) -> None:
        """Kill the JVM and remove a temporary run directory, unless the broker is detached."""
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


class BrokerJvm:
    """How one start of a broker runs Java: the storage tool, then the broker itself.

    Args:
        libs: the broker jars.
        java: the ``java`` executable.
        files: the broker's run directory.
        resources: where the launched JVM is recorded, so that it is released.

    The JVMs map the class-data-sharing archive for this JDK and these jars, or the
    broker dumps one when there is none yet.
    """

    def __init__(self, libs: Path, java: str, files: RunFiles, resources: BrokerResources) -> None:
        self._java = java
        self._classpath = _classpath(libs)
        self._files = files
        self._res = resources
        self._cds: Path | None
        try:
            self._cds = _cds_archive(libs, java, self._classpath)
            self._cds.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a read-only shared libs dir: start without it
            _log.warning("kafka_cds_unavailable", error=str(exc))
            self._cds = None

    def command(self, *, dump_cds: bool = False) -> list[str]:
        """The ``java`` command line up to the main class.

        With ``dump_cds`` and no archive yet, the JVM writes one when it exits.
        """
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
            self._java,
            *_JVM_FLAGS,
            *cds,
            f"-Dlog4j2.configurationFile={self._files.log4j_config}",
            f"-Dkafka.logs.dir={self._files.root}",
            "-cp",
            self._classpath,
        ]

    def format(self, extra_args: Sequence[str] = ()) -> None:
        """Format fresh storage under a new cluster id, passing ``extra_args`` to the tool.

        Raises:
            KafkaError: the storage tool failed or took too long.
        """
        new_id = cluster_id()
        cmd = [
            *self.command(),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            new_id,
            "-c",
            str(self._files.properties),
            *extra_args,
        ]
        try:
            result = _run_tool(cmd, _FORMAT_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise KafkaError(f"formatting Kafka storage took over {exc.timeout:.0f}s") from exc
        data_dir = self._files.data_dir
        if result.returncode != 0:
            raise KafkaError(
                f"formatting Kafka storage in {data_dir} failed "
                f"(exit {result.returncode}):\n{_tail(result.stdout + result.stderr)}"
            )
        _log.debug("kafka_storage_formatted", cluster_id=new_id, data_dir=str(data_dir))

    def launch_and_wait(self, bootstrap: str, timeout_s: float) -> None:
        """Launch the broker and wait until it logs that it has started.

        Raises:
            PortTakenError: a port was bound by another process first.
            KafkaError: the broker exited, or did not start within ``timeout_s``
                (it is killed then); the message quotes its logs.
        """
        cmd = [*self.command(dump_cds=True), "kafka.Kafka", str(self._files.properties)]
        # Search only what this launch writes: on a restart the log already holds a
        # "started" line from the previous run.
        log_offset = self._files.log_size()
        console: IO[bytes]
        with self._files.console.open("ab") as console:
            proc = subprocess.Popen(
                cmd,
                cwd=self._files.root,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=self._res.detached,
            )
        self._res.proc = proc
        _log.debug("kafka_broker_launched", pid=proc.pid, bootstrap=bootstrap)
        deadline = time.monotonic() + max(timeout_s, 1.0)
        while True:
            if _STARTED_MARKER in self._files.read_log(log_offset):
                return
            returncode = proc.poll()
            if returncode is not None or time.monotonic() > deadline:
                self._res.kill()
                what = (
                    f"exited with code {returncode}"
                    if returncode is not None
                    else f"did not start within {timeout_s:.0f}s"
                )
                raise self._launch_failure(f"Kafka broker on {bootstrap} {what}", log_offset)
            time.sleep(0.1)

    def _launch_failure(self, headline: str, log_offset: int) -> KafkaError:
        log = self._files.read_log(log_offset)
        log_path, console_path = self._files.log, self._files.console
        # The cause is logged first and then buried under shutdown chatter, so
        # quote the errors on their own as well as the tail.
        message = (
            f"{headline}\n"
            f"--- errors in {log_path} ---\n{_error_lines(log)}\n"
            f"--- {log_path} (tail) ---\n{_tail(log, 20)}\n"
            f"--- {console_path} (tail) ---\n{_tail_file(console_path)}"
        )
        if "Address already in use" in log:
            return PortTakenError(message)
        return KafkaError(message)
