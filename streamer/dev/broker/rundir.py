"""A broker's run directory: where its files lie, and the configuration written there."""

from __future__ import annotations

from pathlib import Path

from streamer.dev.broker.jvm import _HOST, _LOG4J2_CONFIG, _NODE_ID
from streamer.dev.broker.pki import _SecureListeners


def server_properties(
    data_dir: Path, port: int, controller_port: int, secure: _SecureListeners | None = None
) -> str:
    """The text of ``server.properties`` for a single-node KRaft broker on 127.0.0.1."""
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


class RunFiles:
    """The files of a broker under its run directory ``root``.

    The run directory holds everything the broker reads or writes, so a detached
    broker restarted from it depends on nothing else.

    Attributes:
        root: the run directory.
        data_dir: the broker's ``log.dirs`` (also its KRaft metadata directory).
        properties: the broker's ``server.properties``.
        log4j_config: the log4j2 configuration every JVM of the broker runs with.
        log: the broker's log4j log file.
        console: the JVM's stdout and stderr (errors from before logging starts).
        tls_dir: a secured broker's TLS files, which are:
        keystore: its PKCS#12 server keystore, and
        ca_pem: the PEM file of the CA that signed its certificate.
    """

    __slots__ = (
        "ca_pem",
        "console",
        "data_dir",
        "keystore",
        "log",
        "log4j_config",
        "properties",
        "root",
        "tls_dir",
    )

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.properties = root / "server.properties"
        self.log4j_config = root / "log4j2.properties"
        self.log = root / "server.log"
        self.console = root / "console.log"
        self.tls_dir = root / "tls"
        self.keystore = self.tls_dir / "server.p12"
        self.ca_pem = self.tls_dir / "ca.pem"

    @property
    def formatted(self) -> bool:
        """Whether the storage tool has formatted the data directory."""
        return (self.data_dir / "meta.properties").is_file()

    def write_logging(self) -> None:
        """Make the data directory and write the log4j2 configuration."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log4j_config.write_text(_LOG4J2_CONFIG.format(log_path=self.log), encoding="utf-8")

    def write_properties(
        self, port: int, controller_port: int, secure: _SecureListeners | None
    ) -> None:
        """Write ``server.properties`` for these ports (and a secured broker's listeners)."""
        text = server_properties(self.data_dir, port, controller_port, secure)
        self.properties.write_text(text, encoding="utf-8")

    def log_size(self) -> int:
        """The log file's current size: where the next launch starts writing."""
        return self.log.stat().st_size if self.log.exists() else 0

    def read_log(self, offset: int) -> str:
        """The log from byte ``offset`` on; empty before the broker writes one."""
        try:
            with self.log.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
