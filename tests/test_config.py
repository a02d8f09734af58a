"""Configuration validation and check-config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamer.client_settings import is_secret_client_key
from streamer.config import Config, load_config, parse_config
from streamer.errors import ConfigError
from streamer.librdkafka_properties import PROPERTIES

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
                r"kafka\.client: 'max\.poll\.interval\.ms' must be an integer in 1 \.\. "
                r"86400000, got 'soon'",
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
            (
                {"csv": {"missing": "drop"}},
                r"csv\.missing: Input should be 'refuse', 'skip' or 'fill' \(got 'drop'\)",
            ),
            ({"train": {"preset": "transformer"}}, r"train\.preset"),
            (["not", "a", "mapping"], r"top level must be a mapping"),
        ],
    )
    def test_errors_name_key_and_reason(self, data: object, expected: str) -> None:
        """Each invalid value raises ConfigError whose message matches the key and reason."""
        with pytest.raises(ConfigError, match=expected):
            parse_config(data, "test.yaml")  # type: ignore[arg-type]

    def test_shipped_config_is_the_defaults(self) -> None:
        """config.yaml at the top of the repo validates and equals the built-in defaults.

        But for model.path: written in a file, a relative path is relative to the file.
        """
        defaults = Config()
        model = defaults.model.model_copy(update={"path": REPO / defaults.model.path})
        assert load_config(REPO / "config.yaml", env={}) == defaults.model_copy(
            update={"model": model}
        )

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


# One key of each secret-looking family librdkafka has, with a value to hide.
SECRET_KEYS = {
    "sasl.password": "pw-sasl",
    "ssl.key.password": "pw-key",
    "ssl.keystore.password": "pw-keystore",
    "sasl.oauthbearer.config": "principal=svc clientSecret=pw-oauth-config",
    "sasl.oauthbearer.client.secret": "pw-oauth-client",
    "sasl.oauthbearer.client.credentials.client.secret": "pw-oauth-credentials",
    "sasl.oauthbearer.assertion.private.key.passphrase": "pw-passphrase",
    "sasl.oauthbearer.assertion.private.key.pem": "-----BEGIN PRIVATE KEY----- pw-assertion",
    "ssl.key.pem": "-----BEGIN PRIVATE KEY----- pw-ssl-key",
}
# Ordinary settings a plant's deployment sets: all must pass.
ORDINARY_CLIENT = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanisms": "SCRAM-SHA-512",
    "sasl.username": "streamer",
    "ssl.ca.location": "/etc/streamer/ca.pem",
    "ssl.endpoint.identification.algorithm": "https",
    "session.timeout.ms": 45000,
    "heartbeat.interval.ms": "3000",
    "max.poll.interval.ms": 300000,
    "queued.max.messages.kbytes": 65536,
    "fetch.max.bytes": 52428800,
    "linger.ms": 5,
    "acks": -1,
    "compression.type": "lz4",
    "enable.idempotence": True,
    "statistics.interval.ms": 0,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    "client.id": "streamer-1",
    "debug": "broker, cgrp",
}


class TestClientSettings:
    """``kafka.client`` holds librdkafka settings: known names, readable values, secrets hidden."""

    def test_ordinary_settings_pass(self) -> None:
        """Security, timeouts, batching and statistics settings validate unchanged."""
        cfg = parse_config({"kafka": {"client": ORDINARY_CLIENT}})
        assert cfg.kafka.librdkafka() == ORDINARY_CLIENT

    @pytest.mark.parametrize(
        ("client", "expected"),
        [
            (
                {"frobnicate.ms": 5},
                r"^c\.yaml: kafka\.client: unknown librdkafka setting 'frobnicate\.ms' "
                r"\(librdkafka [\d.]+ has no such property",
            ),
            (
                {"SASL.PASSWORD": "hunter2"},
                r"^c\.yaml: kafka\.client: unknown librdkafka setting 'SASL\.PASSWORD' "
                r"\(did you mean 'sasl\.password'\?\)$",
            ),
            (
                {"Session.Timeout.Ms": 6000},
                r"unknown librdkafka setting 'Session\.Timeout\.Ms' "
                r"\(did you mean 'session\.timeout\.ms'\?\)",
            ),
            (
                {"sasl.pasword": "x"},
                r"unknown librdkafka setting 'sasl\.pasword' \(did you mean 'sasl\.password'\?\)",
            ),
            (
                {"Group.Id": "g"},
                r"unknown librdkafka setting 'Group\.Id' \(did you mean 'group\.id'\? "
                r"streamer sets that one itself\)",
            ),
            (
                {"session.timeout.ms": "abc"},
                r"kafka\.client: 'session\.timeout\.ms' must be an integer in 1 \.\. 3600000, "
                r"got 'abc'",
            ),
            ({"session.timeout.ms": 0}, r"'session\.timeout\.ms' must be in 1 \.\. 3600000, got 0"),
            # librdkafka would read 30 (ms) and ignore the rest.
            ({"session.timeout.ms": "30s"}, r"'session\.timeout\.ms' must be an integer .* '30s'"),
            ({"linger.ms": "soon"}, r"'linger\.ms' must be a number in 0 \.\. 900000"),
            ({"enable.idempotence": "yes"}, r"'enable\.idempotence' must be true or false"),
            ({"security.protocol": "SASL-SSL"}, r"'security\.protocol' must be one of plaintext, "),
            ({"debug": "broker,everything"}, r"'debug' must be a comma-separated list of "),
            ({"error_cb": "print"}, r"'error_cb' is set through the client's API"),
            (
                {"x.y": 1, "linger.ms": -1},
                r"unknown librdkafka setting 'x\.y' .*; 'linger\.ms' must be in 0 \.\. 900000",
            ),
        ],
    )
    def test_refused_naming_the_key(self, client: dict[str, object], expected: str) -> None:
        """An unknown, mis-cased or mis-typed setting stops loading and names the key."""
        with pytest.raises(ConfigError, match=expected) as info:
            parse_config({"kafka": {"client": client}}, "c.yaml")
        assert "hunter2" not in str(info.value)

    def test_every_secret_family_is_masked(self) -> None:
        """Secret-looking keys are held as SecretStr and masked by redacted(), in any case."""
        cfg = parse_config({"kafka": {"client": {**SECRET_KEYS, "sasl.username": "svc"}}})
        shown = cfg.redacted()["kafka"]["client"]
        assert shown == {**dict.fromkeys(SECRET_KEYS, "**********"), "sasl.username": "svc"}
        assert "pw-" not in repr(cfg) + str(cfg.redacted())
        assert cfg.kafka.librdkafka() == {**SECRET_KEYS, "sasl.username": "svc"}
        for key in SECRET_KEYS:
            assert is_secret_client_key(key) and is_secret_client_key(key.upper())

    def test_every_librdkafka_secret_is_known_as_one(self) -> None:
        """Each librdkafka property that can carry a secret is masked."""
        looks_secret = re.compile(r"pass|secret|key\.pem|oauthbearer\.config|^ssl_key$")
        secret = [k for k in PROPERTIES if looks_secret.search(k)]
        assert set(SECRET_KEYS) <= set(secret)
        assert [k for k in secret if not is_secret_client_key(k)] == []

    def test_secret_references_resolve_for_every_family(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``${ENV}`` and ``file:`` work for any secret key, a non-string value is a string."""
        monkeypatch.setenv("STREAMER_TEST_OAUTH", "clientSecret=pw-env")
        pem = tmp_path / "key.pem"
        pem.write_text("-----BEGIN PRIVATE KEY----- pw-file\n")
        cfg = parse_config(
            {
                "kafka": {
                    "client": {
                        "sasl.oauthbearer.config": "${STREAMER_TEST_OAUTH}",
                        "ssl.key.pem": f"file:{pem}",
                        "sasl.password": 1234,
                    }
                }
            }
        )
        assert cfg.kafka.librdkafka() == {
            "sasl.oauthbearer.config": "clientSecret=pw-env",
            "ssl.key.pem": "-----BEGIN PRIVATE KEY----- pw-file",
            "sasl.password": "1234",
        }
        assert set(cfg.redacted()["kafka"]["client"].values()) == {"**********"}


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
        assert run_cli("score", "--data", "x.csv", "--out", "y.csv").returncode == 2  # no --model
        assert run_cli("check-config", "--set", "window").returncode == 2

    def test_password_never_printed(self, tmp_path: Path) -> None:
        """check-config masks a configured password."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("kafka:\n  client:\n    sasl.password: s3cr3t-value\n")
        proc = run_cli("check-config", "--config", str(cfg))
        assert proc.returncode == 0
        assert "s3cr3t-value" not in proc.stdout + proc.stderr
        assert "**********" in proc.stdout

    def test_every_secret_family_masked_and_miscased_key_refused(self, tmp_path: Path) -> None:
        """check-config masks each secret family; a mis-cased secret key exits 2, value unseen."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"kafka": {"client": SECRET_KEYS}}))
        proc = run_cli("check-config", "--config", str(cfg))
        assert proc.returncode == 0, proc.stderr
        assert "pw-" not in proc.stdout + proc.stderr
        client = json.loads(proc.stdout)["kafka"]["client"]
        assert client == dict.fromkeys(SECRET_KEYS, "**********")
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            yaml.safe_dump(
                {"kafka": {"client": {"SASL.PASSWORD": "pw-miscased", "sasl.username": "u"}}}
            )
        )
        proc = run_cli("check-config", "--config", str(bad))
        assert proc.returncode == 2
        assert "pw-miscased" not in proc.stdout + proc.stderr
        assert (
            f"{bad}: kafka.client: unknown librdkafka setting 'SASL.PASSWORD' "
            "(did you mean 'sasl.password'?)" in proc.stderr
        )


class TestOverrides:
    """One key from the environment or the command line, over the file; paths follow the file."""

    def test_environment_then_set_override_the_file(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("kafka: {bootstrap_servers: 'a:1', group_id: g}\nstream: {window: 16}\n")
        env = {
            "STREAMER__KAFKA__BOOTSTRAP_SERVERS": "b:2",
            "STREAMER__STREAM__WINDOW": "32",
            "STREAMER_LOG_LEVEL": "debug",  # one underscore: not an override
        }
        got = load_config(cfg, env=env, sets=["stream.window=64", "kafka.group_id=h"])
        assert got.kafka.bootstrap_servers == "b:2"
        assert got.stream.window == 64 and got.kafka.group_id == "h"

    def test_a_bad_override_names_where_it_came_from(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"stream\.window"):
            load_config(None, env={"STREAMER__STREAM__WINDOW": "one"})
        with pytest.raises(ConfigError, match=r"--set window: 'window' is not section\.key"):
            load_config(None, env={}, sets=["window=2"])
        with pytest.raises(ConfigError, match="no_such_section"):
            load_config(None, env={}, sets=["no_such_section.x=1"])

    def test_a_relative_model_path_is_relative_to_the_config_file(self, tmp_path: Path) -> None:
        (tmp_path / "etc").mkdir()
        cfg = tmp_path / "etc" / "c.yaml"
        cfg.write_text("model: {path: models/current}\n")
        assert load_config(cfg, env={}).model.path == tmp_path / "etc" / "models" / "current"
        absolute = tmp_path / "m"
        cfg.write_text(f"model: {{path: {absolute}}}\n")
        assert load_config(cfg, env={}).model.path == absolute
        # Given on the command line, it is the caller's: relative to the working directory.
        assert load_config(cfg, env={}, sets=["model.path=x"]).model.path == Path("x")

    def test_the_cli_reads_config_yaml_here_then_the_environment_then_set(
        self, tmp_path: Path
    ) -> None:
        (tmp_path / "config.yaml").write_text("kafka: {group_id: from-file}\n")
        env = {**os.environ, "STREAMER__KAFKA__GROUP_ID": "from-env"}
        shown = subprocess.run(
            [sys.executable, "-m", "streamer", "check-config", "--set", "stream.window=32"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        got = json.loads(shown.stdout)
        assert got["kafka"]["group_id"] == "from-env" and got["stream"]["window"] == 32
        assert shown.stderr.strip() == "config.yaml: ok"
