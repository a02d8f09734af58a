"""The shipped librdkafka property table against the installed librdkafka and its client."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import confluent_kafka
import pytest

from streamer.config import parse_config
from streamer.errors import ConfigError
from streamer.librdkafka_properties import LIBRDKAFKA_VERSION, PROPERTIES, Property

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "streamer.test.no.such.property"
# Settings streamer refuses whatever their value (it sets them itself).
MANAGED = {"bootstrap.servers", "group.id", "enable.auto.offset.store"}


def generator() -> ModuleType:
    path = REPO / "scripts" / "librdkafka_properties.py"
    spec = importlib.util.spec_from_file_location("librdkafka_properties_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def client_accepts(name: str, value: object) -> tuple[bool, str]:
    """Whether librdkafka, through confluent-kafka, takes ``value`` for ``name``.

    confluent-kafka sets the properties in the dict's order and stops at the first it
    cannot set, before any client exists: the unknown sentinel after ``name`` stops it
    there when ``name`` was set, so no client is created, nothing connects and no thread
    starts.
    """
    try:
        confluent_kafka.Producer({name: value, SENTINEL: 1})
    except confluent_kafka.KafkaException as exc:
        text = exc.args[0].str()
        return SENTINEL in text, text
    except (TypeError, ValueError) as exc:  # settings confluent-kafka reads itself
        return False, str(exc)
    raise AssertionError(f"a client was created for {name}={value!r}")


def streamer_accepts(name: str, value: object) -> bool:
    try:
        parse_config({"kafka": {"pause_after_s": 0, "client": {name: value}}})
    except ConfigError:
        return False
    return True


def probes(prop: Property) -> list[object]:
    """Values that tell librdkafka's reading of a property's kind apart."""
    values: list[object] = ["abc", "", "1", "0", "-1", " +12", "12abc", "0x10", "010", "1.5"]
    values += ["true", "TRUE", "t", "F", "yes", " true", True, False, 1, 0, 2, 1.5, -7]
    values += ["nan", "inf", ".5", "1e3"]
    if prop.kind in ("integer", "float"):
        low, high = int(prop.low), int(prop.high)
        values += [low, high, low - 1, high + 1, str(low), f"{high}ms", f" {low - 1}"]
        if prop.kind == "float":
            values += [prop.high + 0.5, prop.low - 0.5, str(prop.high + 0.5)]
    for word in prop.words[:3]:
        values += [word, word.upper(), f" {word}", f"{word} ", f"{word}x"]
    if prop.kind == "flags":
        values += [",".join(prop.words[:2]), ", ".join(prop.words[:2]), f"{prop.words[0]},nope"]
    return values


class TestShippedTable:
    """streamer/librdkafka_properties.py is what the installed librdkafka reports."""

    def test_matches_installed_librdkafka(self) -> None:
        """Names, kinds, ranges and words equal the loaded librdkafka's own table."""
        props, version, _client_version = generator().current()
        assert version == LIBRDKAFKA_VERSION, (
            "regenerate: .venv/bin/python scripts/librdkafka_properties.py"
        )
        assert {name: Property(*row) for name, row in props.items()} == PROPERTIES

    def test_every_name_is_known_to_the_client_and_case_sensitive(self) -> None:
        """The client knows each shipped name; the same name in upper case is unknown to it."""
        for name in PROPERTIES:
            if name == "plugin.library.paths":
                continue  # setting it loads libraries
            _ok, text = client_accepts(name, "")
            assert f'No such configuration property: "{name}"' not in text, name
            _ok, text = client_accepts(name.upper(), "")
            assert f'No such configuration property: "{name.upper()}"' in text, name


def read_in_part(prop: Property, value: object) -> bool:
    """Whether librdkafka would read only a leading part of this number (or wrap it).

    streamer refuses these on purpose: ``session.timeout.ms: 30s`` is 30 ms to
    librdkafka, ``"010"`` is 8, ``1.5`` is 1 for an integer setting, and a C int wraps.
    """
    if prop.kind not in ("integer", "float") or isinstance(value, bool):
        return False
    if isinstance(value, int):
        return prop.kind == "integer" and not -(2**31) <= value < 2**31
    if isinstance(value, float):
        return prop.kind == "integer" and not value.is_integer()
    text = str(value).strip().lstrip("+-")
    if prop.kind == "integer":
        return not text.isdigit() or (len(text) > 1 and text[0] == "0")
    try:
        float(text)
    except ValueError:
        return True
    return text.lower() in ("nan", "inf", "infinity")


class TestValueReading:
    """streamer accepts a typed setting's value only where librdkafka reads all of it."""

    @pytest.mark.parametrize(
        "name",
        [n for n, p in PROPERTIES.items() if p.kind != "string" and n not in MANAGED],
    )
    def test_agrees_with_the_client(self, name: str) -> None:
        """What streamer accepts librdkafka accepts; what it refuses librdkafka refuses too,
        or would read only in part."""
        prop = PROPERTIES[name]
        disagree = []
        for value in probes(prop):
            ok, text = client_accepts(name, value)
            if " requires " in text:
                continue  # a constraint between settings: the client's to check
            mine = streamer_accepts(name, value)
            if mine != ok and not (ok and not mine and read_in_part(prop, value)):
                disagree.append(f"{value!r}: librdkafka {'takes' if ok else 'refuses'} it ({text})")
        assert not disagree, "\n".join(disagree)

    @pytest.mark.parametrize("name", [n for n, p in PROPERTIES.items() if p.kind == "integer"])
    def test_whole_integers_in_range_pass(self, name: str) -> None:
        """An integer setting takes its bounds as YAML numbers and as decimal strings."""
        if name in MANAGED:
            return
        prop = PROPERTIES[name]
        for value in (int(prop.low), int(prop.high), str(int(prop.low)), f" {int(prop.high)} "):
            assert streamer_accepts(name, value), value

    def test_probing_creates_no_client(self) -> None:
        """The client check leaves no thread behind (no client was ever created)."""
        threads = len(os.listdir("/proc/self/task"))
        values: list[Any] = [5, "abc", "x"]
        for name in ("linger.ms", "session.timeout.ms", "client.id"):
            for value in values:
                client_accepts(name, value)
        assert len(os.listdir("/proc/self/task")) == threads
