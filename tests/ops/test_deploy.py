"""deploy/: the systemd unit, the Grafana dashboard, compose and Docker files.

Docker is not available where these tests run, so compose and the Dockerfile are
checked for what the rest of the suite relies on (image, config, ports); the
unit file goes through ``systemd-analyze`` where systemd is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streamer.config import load_config
from streamer.metrics import Metrics, metric_names
from tests.integration.helpers import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "streamer.service"
VENV_IN_UNIT = "/opt/streamer/.venv"


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit file, values in order of appearance."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_unit(tmp_path: Path) -> Path:
    """The unit with the virtualenv path pointed at this checkout's (verify checks binaries)."""
    venv = REPO / ".venv"
    if not (venv / "bin" / "streamer").exists():
        pytest.skip(f"{venv}/bin/streamer is not installed (run scripts/setup)")
    unit = tmp_path / "streamer.service"
    unit.write_text(UNIT.read_text().replace(VENV_IN_UNIT, str(venv)))
    return unit


class TestSystemdUnit:
    """deploy/streamer.service is valid, notify-typed, reloadable and sandboxed."""

    def test_systemd_analyze_verify(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` reports nothing (skipped where systemd is not installed)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed on this machine")
        result = subprocess.run(
            [tool, "verify", str(local_unit(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    def test_exposure_is_low(self, tmp_path: Path) -> None:
        """`systemd-analyze security` rates the sandbox OK or better (exposure below 3)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed on this machine")
        result = subprocess.run(
            [tool, "security", "--offline=yes", str(local_unit(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "--offline" in result.stderr:
            pytest.skip("this systemd-analyze has no offline security mode (systemd < 250)")
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        assert match, result.stdout[-2000:] + result.stderr
        assert float(match.group(1)) < 3.0, result.stdout[-3000:]

    def test_directives(self) -> None:
        """Type=notify with a watchdog, check-config before start, SIGHUP reload, sandboxing."""
        s = unit_settings()
        assert s["Type"] == ["notify"]
        assert s["WatchdogSec"][0].endswith("s")
        assert any("check-config" in v for v in s["ExecStartPre"])
        assert "streamer run --config" in s["ExecStart"][0]
        assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert s["Restart"] == ["on-failure"]
        assert s["EnvironmentFile"]
        assert s["DynamicUser"] == ["yes"]
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert s[key] == ["yes"], key
        assert s["ProtectSystem"] == ["strict"]
        assert s["CapabilityBoundingSet"] == [""]


class TestDashboard:
    """The Grafana dashboard queries only metrics the daemon exports."""

    def test_metric_names_exist(self) -> None:
        """Every streamer_/process_ name in a panel query is in the daemon's registry."""
        dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
        assert len(exprs) >= 20
        used = {n for e in exprs for n in re.findall(r"\b((?:streamer|process)_[a-z_]+)\b", e)}
        registry = Metrics().registry
        known = metric_names(registry)
        assert used and not used - known, f"unknown metrics: {sorted(used - known)}"
        # Every family the daemon exports is on the dashboard.
        families = {f.name for f in registry.collect() if f.name.startswith("streamer_")}
        shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
        assert shown == families, f"not on the dashboard: {sorted(families - shown)}"


class TestCompose:
    """docker-compose.yml runs Apache Kafka (KRaft) and streamer with a valid config."""

    def test_services(self) -> None:
        """Kafka from the official 4.1.1 image, streamer built from deploy/Dockerfile."""
        compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
        kafka, streamer = compose["services"]["kafka"], compose["services"]["streamer"]
        assert kafka["image"] == "apache/kafka:4.1.1"
        assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
        assert streamer["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / streamer["build"]["context"] / streamer["build"]["dockerfile"]).is_file()
        assert streamer["depends_on"]["kafka"]["condition"] == "service_healthy"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in streamer["volumes"]}
        assert (DEPLOY / mounts["/etc/streamer/config.yaml"]).is_file()

    def test_mounted_config_is_valid(self) -> None:
        """The config compose mounts validates and points at the compose broker."""
        cfg = load_config(DEPLOY / "config.compose.yaml")
        assert cfg.kafka.bootstrap_servers == "kafka:9092"
        assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == 9108
        assert str(cfg.model.path).startswith("/var/lib/streamer/models")

    def test_dockerfile(self) -> None:
        """python:3.11-slim, installs the package, runs `streamer run` as a non-root user."""
        text = (DEPLOY / "Dockerfile").read_text()
        assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
        assert "pip install ." in text
        assert re.search(r"^USER (?!root)\S+", text, re.M)
        assert '"run", "--config", "/etc/streamer/config.yaml"' in text
