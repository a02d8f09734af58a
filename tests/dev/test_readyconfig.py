"""``broker start --write-config``: the config written for a running broker, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.config import Config, load_config
from streamer.dev.broker.readyconfig import ReadyConfig
from streamer.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[2]
ADDRESS = "127.0.0.1:41234"
CHANGED = ("bootstrap_servers:", "create_topics:", "path:", "port:")


def expected(folder: Path) -> Config:
    """The built-in defaults with what a ready config sets (model.path next to the file)."""
    d = Config()
    return d.model_copy(
        update={
            "kafka": d.kafka.model_copy(
                update={"bootstrap_servers": ADDRESS, "create_topics": True}
            ),
            "model": d.model.model_copy(update={"path": folder / "model"}),
            "metrics": d.metrics.model_copy(update={"port": 0}),
        }
    )


class TestContent:
    def test_from_the_built_in_defaults(self, tmp_path: Path) -> None:
        target = tmp_path / "dev.yaml"
        ReadyConfig.prepare(target, force=False, base=tmp_path / "none.yaml").write(ADDRESS)
        assert load_config(target, env={}) == expected(tmp_path)
        text = target.read_text()
        assert text.startswith(
            "# Written by `streamer broker start --write-config` for the local broker at "
            f"{ADDRESS}.\n# Based on the built-in defaults;"
        )

    def test_from_the_repositorys_config_its_comments_kept(self, tmp_path: Path) -> None:
        target = tmp_path / "dev.yaml"
        ReadyConfig.prepare(target, force=False, base=REPO / "config.yaml").write(ADDRESS)
        assert load_config(target, env={}) == expected(tmp_path)
        written = target.read_text().splitlines()
        base = (REPO / "config.yaml").read_text().splitlines()
        # Below the 5 lines of the header and a blank one, every line of the base but the
        # four keys set is there as it was, in order.
        assert all(ln.startswith("# ") for ln in written[:5]) and written[5] == ""
        unchanged = [ln for ln in written[6:] if not ln.strip().startswith(CHANGED)]
        assert unchanged == [ln for ln in base if not ln.strip().startswith(CHANGED)]
        assert f"  bootstrap_servers: {ADDRESS}  # broker list, host:port[,host:port...]" in (
            written
        )
        assert any(ln.startswith("  path: model ") and "# checkpoint" in ln for ln in written)

    def test_secret_references_stay_references(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        base = tmp_path / "base.yaml"
        base.write_text(
            "kafka:\n  client:\n    sasl.password: ${STREAMER_TEST_PW}\n"
            "model: {path: elsewhere, device: cpu}\n"  # flow style: rewritten as plain YAML
        )
        target = tmp_path / "dev.yaml"
        monkeypatch.setenv("STREAMER_TEST_PW", "s3cret")
        ReadyConfig.prepare(target, force=False, base=base).write(ADDRESS)
        cfg = load_config(target, env={})
        assert "s3cret" not in target.read_text() and "${STREAMER_TEST_PW}" in target.read_text()
        assert cfg.model.path == tmp_path / "model" and cfg.model.device == "cpu"
        assert cfg.kafka.bootstrap_servers == ADDRESS


class TestRefusals:
    def test_an_existing_file_is_kept_unless_forced(self, tmp_path: Path) -> None:
        target = tmp_path / "dev.yaml"
        target.write_text("mine\n")
        with pytest.raises(InputError, match=r"dev\.yaml: already exists; --force overwrites it"):
            ReadyConfig.prepare(target, force=False)
        ReadyConfig.prepare(target, force=True, base=tmp_path / "none").write(ADDRESS)
        assert load_config(target, env={}).kafka.bootstrap_servers == ADDRESS
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.yaml"]  # no temp file left

    def test_a_file_that_appears_meanwhile_is_not_overwritten(self, tmp_path: Path) -> None:
        target = tmp_path / "dev.yaml"
        ready = ReadyConfig.prepare(target, force=False, base=tmp_path / "none")
        target.write_text("mine\n")
        with pytest.raises(InputError, match="already exists"):
            ready.write(ADDRESS)
        assert target.read_text() == "mine\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.yaml"]

    def test_an_invalid_base_config_is_named(self, tmp_path: Path) -> None:
        base = tmp_path / "config.yaml"
        base.write_text("stream: {window: 1}\n")
        with pytest.raises(ConfigError, match=r"config\.yaml: stream\.window: .*got 1"):
            ReadyConfig.prepare(tmp_path / "dev.yaml", force=False, base=base)

    @pytest.mark.parametrize(
        ("setup", "said"),
        [
            ("exists", "dev.yaml: already exists; --force overwrites it"),
            ("bad-base", "stream.window"),
            ("no-folder", "no such directory"),
        ],
    )
    def test_the_command_refuses_before_starting_a_broker(
        self, tmp_path: Path, setup: str, said: str
    ) -> None:
        target = tmp_path / ("missing/dev.yaml" if setup == "no-folder" else "dev.yaml")
        if setup == "exists":
            target.write_text("mine\n")
        if setup == "bad-base":
            (tmp_path / "config.yaml").write_text("stream: {window: 1}\n")
        env = dict(os.environ, STREAMER_CACHE=str(tmp_path / "cache"))
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", "broker", "start", "--write-config", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        assert said in proc.stderr and proc.stdout == ""
        assert not (tmp_path / "cache" / "broker").exists()  # no broker was started
