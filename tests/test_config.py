"""Configuration validation and check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.config import Config, load_config, parse_config
from streamer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class TestConfigValidation:
    """Bad configs stop start-up with the key and the reason."""

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            ({"stream": {"window": 1}}, r"stream\.window: .*greater than or equal to 2.*got 1"),
            ({"stream": {"windw": 3}}, r"stream\.windw: unknown key"),
            ({"stream": {"window": 8, "stride": 9}}, r"stride \(9\) must not exceed window \(8\)"),
            (
                {"stream": {"channels": ["a", "a"]}},
                r"stream\.channels: duplicate channel names \['a'\]",
            ),
            ({"threshold": {"method": "fixed"}}, r"needs threshold\.value"),
            ({"threshold": {"method": "magic"}}, r"threshold\.method: .*got 'magic'"),
            ({"threshold": {"risk": 2}}, r"threshold\.risk: .*less than 1.*got 2"),
            (
                {"threshold": {"max_peaks": 5}},
                r"threshold\.max_peaks: .*greater than or equal to 10.*got 5",
            ),
            (
                {"inference": {"max_queued_windows": 0}},
                r"inference\.max_queued_windows: .*greater than 0.*got 0",
            ),
            (
                {"kafka": {"pause_after_s": -1}},
                r"kafka\.pause_after_s: .*greater than or equal to 0",
            ),
            (
                {"kafka": {"pause_after_s": 20, "client": {"max.poll.interval.ms": 30000}}},
                r"kafka: .*pause_after_s=20\.0 must be under half of the client's "
                r"max\.poll\.interval\.ms \(30000 ms\)",
            ),
            (
                {"kafka": {"client": {"max.poll.interval.ms": "soon"}}},
                r"max\.poll\.interval\.ms 'soon' is not a number",
            ),
            (
                {"alerts": {"open_after": 5, "open_within": 3}},
                r"open_within \(3\) must be >= open_after \(5\)",
            ),
            (
                {"kafka": {"client": {"group.id": "x"}}},
                r"kafka\.client: 'group\.id' is managed by streamer",
            ),
            (
                {"kafka": {"client": {"sasl.password": "${STREAMER_NO_SUCH_VAR}"}}},
                r"STREAMER_NO_SUCH_VAR is not set",
            ),
            ({"metrics": {"port": 70000}}, r"metrics\.port"),
            ({"train": {"preset": "transformer"}}, r"train\.preset"),
            (["not", "a", "mapping"], r"top level must be a mapping"),
        ],
    )
    def test_errors_name_key_and_reason(self, data: object, expected: str) -> None:
        """Each invalid value raises ConfigError whose message matches the key and reason."""
        with pytest.raises(ConfigError, match=expected):
            parse_config(data, "test.yaml")  # type: ignore[arg-type]

    def test_shipped_config_is_the_defaults(self) -> None:
        """config.yaml at the top of the repo validates and equals the built-in defaults."""
        assert load_config(REPO / "config.yaml") == Config()

    def test_secrets_resolve_from_env_and_file_and_stay_masked(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """${ENV} and file: references resolve; redacted() and repr never show the value."""
        monkeypatch.setenv("STREAMER_TEST_PW", "hunter2-env")
        secret_file = tmp_path / "pw"
        secret_file.write_text("hunter2-file\n")
        cfg = parse_config(
            {
                "kafka": {
                    "client": {
                        "sasl.password": "${STREAMER_TEST_PW}",
                        "ssl.key.password": f"file:{secret_file}",
                    }
                }
            }
        )
        assert cfg.kafka.librdkafka()["sasl.password"] == "hunter2-env"
        assert cfg.kafka.librdkafka()["ssl.key.password"] == "hunter2-file"
        assert "hunter2" not in repr(cfg)
        assert "hunter2" not in str(cfg.redacted())


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


class TestCheckConfigCommand:
    """`streamer check-config` exit codes and output."""

    def test_good_config_exits_zero(self) -> None:
        """The shipped config passes with exit 0 and prints the resolved config."""
        proc = run_cli("check-config", "--config", str(REPO / "config.yaml"))
        assert proc.returncode == 0, proc.stderr
        assert '"window": 64' in proc.stdout

    def test_bad_config_exits_two_with_key(self, tmp_path: Path) -> None:
        """A bad value exits 2 and names file, key and reason on stderr."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("stream:\n  window: 0\n")
        proc = run_cli("check-config", "--config", str(bad))
        assert proc.returncode == 2
        assert "stream.window" in proc.stderr and str(bad) in proc.stderr

    def test_missing_file_and_bad_yaml_exit_two(self, tmp_path: Path) -> None:
        """A missing file or broken YAML is a configuration error too."""
        assert run_cli("check-config", "--config", str(tmp_path / "nope.yaml")).returncode == 2
        broken = tmp_path / "broken.yaml"
        broken.write_text("stream: [unclosed\n")
        proc = run_cli("check-config", "--config", str(broken))
        assert proc.returncode == 2 and "not valid YAML" in proc.stderr

    def test_bad_arguments_exit_two(self) -> None:
        """Unknown subcommands and missing required options exit 2."""
        assert run_cli("frobnicate").returncode == 2
        assert run_cli("check-config").returncode == 2

    def test_password_never_printed(self, tmp_path: Path) -> None:
        """check-config masks a configured password."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("kafka:\n  client:\n    sasl.password: s3cr3t-value\n")
        proc = run_cli("check-config", "--config", str(cfg))
        assert proc.returncode == 0
        assert "s3cr3t-value" not in proc.stdout + proc.stderr
        assert "**********" in proc.stdout
