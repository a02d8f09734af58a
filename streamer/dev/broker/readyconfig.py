"""``broker start --write-config PATH``: a config file that works with the broker as it is.

From a fresh clone to a running daemon needs three keys changed: the broker's address
(``broker start`` picks a free port), ``kafka.create_topics`` (a new broker has no
topics) and ``model.path``. The file written is the working directory's
``config.yaml`` (the config every command reads by default; in a clone, the reference
with a comment on every key) with those keys set, or only those keys (every other at
its built-in default) where there is none:

- ``kafka.bootstrap_servers``: the broker's address;
- ``kafka.create_topics: true``;
- ``model.path: model``: the folder ``model`` next to the file (a relative path in a
  config file is relative to the file), where ``streamer train --config PATH`` writes
  by default and ``streamer run --config PATH`` loads from;
- ``metrics.port: 0``: an ephemeral port (logged as ``metrics_listening``), so that
  several daemons on one machine (scale-out) and a production one on 9108 do not clash.

The base file's text is edited line by line, so its comments and layout stay (and a
``${ENV}`` secret stays a reference); a base the edit cannot handle (a section written
in flow style, ``kafka: {...}``) is written back as plain YAML instead. Either way the
result is validated as a config before it is written, and written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from streamer.config import parse_config
from streamer.errors import ConfigError, InputError

__all__ = ["BASE_CONFIG", "ReadyConfig", "override_hint"]

BASE_CONFIG = Path("config.yaml")
"""The config a written file starts from, as every command's default ``--config``."""

_PLACEHOLDER = "127.0.0.1:9092"


def _settings(bootstrap: str) -> list[tuple[str, str, Any]]:
    """(section, key, value) of every key a ready config sets."""
    return [
        ("kafka", "bootstrap_servers", bootstrap),
        ("kafka", "create_topics", True),
        ("model", "path", "model"),
        ("metrics", "port", 0),
    ]


def _scalar(value: Any) -> str:
    """``value`` as a YAML scalar: plain where it reads back as itself, else as JSON.

    JSON spells true, false and numbers as YAML does, and a JSON string is a YAML
    double-quoted one (``1:20`` unquoted would read as a base-60 number).
    """
    if isinstance(value, str) and value.strip() == value and "#" not in value:
        with contextlib.suppress(yaml.YAMLError):
            if yaml.safe_load(value) == value:
                return value
    return json.dumps(value)


def _section_span(lines: list[str], section: str) -> tuple[int, int] | None:
    """The header line of a block ``section:`` and the end of its indented body.

    None when the section is absent; ValueError when it is not a block (flow style).
    """
    start = None
    for i, line in enumerate(lines):
        if line.startswith(f"{section}:"):
            if line[len(section) + 1 :].split("#", 1)[0].strip():
                raise ValueError(f"section {section} is not a block")
            start = i
            break
    if start is None:
        return None
    end = start + 1
    # The body: indented lines, blank lines and comments, up to the next top-level key.
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    return start, end


def _set_line(lines: list[str], section: str, key: str, value: Any) -> None:
    """Set ``section.key`` in ``lines`` in place, keeping the line's comment and its column."""
    span = _section_span(lines, section)
    if span is None:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines.extend([f"{section}:\n", f"  {key}: {_scalar(value)}\n"])
        return
    start, end = span
    pattern = re.compile(
        rf"^(?P<head>[ \t]+{re.escape(key)}:[ \t]*)(?P<value>[^#\n]*?)(?P<tail>[ \t]*#.*)?$"
    )
    for i in range(start + 1, end):
        match = pattern.match(lines[i].rstrip("\n"))
        if match is None:
            continue
        new, comment = _scalar(value), (match["tail"] or "").lstrip()
        if comment:
            # Keep the comment in its column (they are aligned) when the new value fits.
            column = len(match["value"]) + len(match["tail"]) - len(comment)
            new = new.ljust(column) if len(new) < column else new + " "
        lines[i] = f"{match['head']}{new}{comment}".rstrip() + "\n"
        return
    # After the section's last line that is not blank, so the keys keep their order.
    last = max((i for i in range(start, end) if lines[i].strip()), default=start)
    lines.insert(last + 1, f"  {key}: {_scalar(value)}\n")


def _render(base: str | None, bootstrap: str, origin: str) -> str:
    """The ready config's text for ``bootstrap``, from the ``base`` config's text."""
    settings = _settings(bootstrap)
    header = [
        "# Written by `streamer broker start --write-config` for the local broker at "
        f"{bootstrap}.\n",
        f"# Based on {origin}; set here: kafka.bootstrap_servers (that broker),\n",
        "# kafka.create_topics (true), model.path (model: the folder next to this file where\n",
        "# `streamer train --config <this file>` writes and `streamer run` loads the model)\n",
        "# and metrics.port (0: an ephemeral port, logged as metrics_listening).\n",
        "\n",
    ]
    lines = (base or "").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    try:
        for section, key, value in settings:
            _set_line(lines, section, key, value)
        text = "".join(lines)
        data = yaml.safe_load(text) or {}
        if all(data[s][k] == v for s, k, v in settings):
            return "".join(header) + text
    except (ValueError, KeyError, TypeError, yaml.YAMLError):
        pass
    # A layout the line edit does not know: the same content as plain YAML, comments lost.
    data = yaml.safe_load(base or "") or {}
    for section, key, value in settings:
        data.setdefault(section, {})[key] = value
    return "".join(header) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True, slots=True)
class ReadyConfig:
    """A config file to write once the broker's address is known; checked up front.

    ``prepare`` refuses (InputError, ConfigError: the CLI exits 2) before a broker is
    started: an existing file without ``force``, a folder that does not exist, or a base
    config that is not valid.
    """

    path: Path
    force: bool
    base: str | None
    origin: str

    @classmethod
    def prepare(cls, path: Path, *, force: bool, base: Path = BASE_CONFIG) -> ReadyConfig:
        """Check the target and read and validate the base config; writes nothing."""
        if path.exists() and not force:
            raise InputError(f"{path}: already exists; --force overwrites it")
        if path.is_dir():
            raise InputError(f"{path}: is a directory")
        if not path.parent.is_dir():
            raise InputError(f"{path.parent}: no such directory (for --write-config {path})")
        try:
            text: str | None = base.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except OSError as exc:
            raise InputError(f"{base}: cannot read: {exc.strerror}") from exc
        origin = f"{base.resolve()}" if text is not None else "the built-in defaults"
        ready = cls(path, force, text, origin)
        ready.text(_PLACEHOLDER)  # a bad base config fails now, before a broker starts
        return ready

    def text(self, bootstrap: str) -> str:
        """The file's content for ``bootstrap``; ConfigError if it is not a valid config."""
        text = _render(self.base, bootstrap, self.origin)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.origin}: not valid YAML: {exc}") from exc
        parse_config(data, self.origin)
        return text

    def write(self, bootstrap: str) -> None:
        """Write the file atomically: complete or absent, never half written."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                fh.write(self.text(bootstrap))
                fh.flush()
                os.fsync(fh.fileno())
            if self.force:
                tmp.replace(self.path)
            else:
                # A hard link fails if the file appeared since prepare(): never overwritten.
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    raise InputError(
                        f"{self.path}: already exists; --force overwrites it"
                    ) from None
                except OSError:
                    # A file system without hard links: checked again, then renamed.
                    if self.path.exists():
                        raise InputError(
                            f"{self.path}: already exists; --force overwrites it"
                        ) from None
                    tmp.replace(self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def override_hint(bootstrap: str) -> str:
    """How to point the commands at ``bootstrap`` without editing a file (for stderr)."""
    return (
        f"to use it: --set kafka.bootstrap_servers={bootstrap} on any command, or "
        f"STREAMER__KAFKA__BOOTSTRAP_SERVERS={bootstrap} in the environment (with "
        "--set kafka.create_topics=true where topics are missing); or write a ready config: "
        "streamer broker start --write-config dev.yaml"
    )
