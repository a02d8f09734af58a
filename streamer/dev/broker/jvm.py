"""The broker's jars (fetched once through Maven), its JVM, and its log files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import structlog

from streamer.errors import KafkaError

_log = structlog.get_logger("streamer.dev.broker")


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
<!-- Written by streamer.dev.broker to fetch the Kafka broker jars. -->
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
            return _override_libs(override, jar)
        cache_dir = cache_root()
    version_dir = cache_dir / "kafka" / version
    libs = version_dir / "libs"
    if (libs / jar).is_file():
        return libs

    _java()  # Maven needs it too; fail with the clearer message first.
    mvn = _mvn()
    with _file_lock(version_dir / ".lock"):
        if (libs / jar).is_file():  # another process fetched while we waited
            return libs
        _fetch_jars(mvn, version, version_dir, libs)
    return libs


def _override_libs(override: str, jar: str) -> Path:
    libs = Path(override).expanduser()
    if not (libs / jar).is_file():
        raise KafkaError(f"${LIBS_ENV}={override} holds no {jar}")
    return libs


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError(
            "mvn not found on PATH: the Kafka jars are fetched from Maven Central with "
            "Maven 3.6+ (e.g. apt-get install maven)"
        )
    return mvn


def _fetch_jars(mvn: str, version: str, version_dir: Path, libs: Path) -> None:
    """Fetch the jars into a staging directory and rename it to ``libs`` once complete."""
    staging = version_dir / f"libs.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pom = version_dir / "pom.xml"
    pom.write_text(_pom(version), encoding="utf-8")
    _log.info("kafka_jars_fetching", version=version, libs=str(libs))
    started = time.monotonic()
    _copy_dependencies(mvn, version, pom, staging)
    shutil.rmtree(libs, ignore_errors=True)  # a leftover without the Kafka jar
    staging.rename(libs)
    _log.info(
        "kafka_jars_fetched",
        version=version,
        jars=sum(1 for _ in libs.glob("*.jar")),
        elapsed_s=round(time.monotonic() - started, 1),
    )


def _copy_dependencies(mvn: str, version: str, pom: Path, staging: Path) -> None:
    """Run Maven to copy the jars ``pom`` names into ``staging``; remove it if that fails."""
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
    try:
        result = _run_tool(cmd, _FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaError(f"mvn did not fetch Kafka {version} within {exc.timeout:.0f}s") from exc
    if result.returncode != 0 or not (staging / _kafka_jar_name(version)).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaError(
            f"mvn failed to fetch Kafka {version} (exit {result.returncode}): "
            f"{' '.join(cmd)}\n{_tail(result.stdout + result.stderr)}"
        )


def _run_tool(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a command-line tool without input, its output captured as text, whatever its exit."""
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


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
