"""``python -m streamer.dev.broker`` and ``streamer broker``: fetch, start, stop, status."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

import structlog

from streamer.dev.broker.jvm import (
    DEFAULT_VERSION,
    _adopt_cds,
    _file_lock,
    cache_root,
    ensure_jars,
)
from streamer.dev.broker.readyconfig import ReadyConfig, override_hint
from streamer.dev.broker.server import LocalBroker
from streamer.errors import ConfigError, InputError, KafkaError

_log = structlog.get_logger("streamer.dev.broker")


# -- command line -----------------------------------------------------------


def _state_dir() -> Path:
    return cache_root() / "broker"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _is_our_broker(pid: int, run_dir: str) -> bool:
    """Whether ``pid`` is still the broker JVM we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return False
    return "kafka.Kafka" in cmdline and run_dir in cmdline


def process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    # A zombie has finished; in a container whose init never reaps, it stays one.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM ``pid``, SIGKILL it after ``timeout_s``; return whether it exited cleanly."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    # Not our child, so there is nothing to wait() on: poll until the pid is gone.
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.1)
    _log.warning("kafka_broker_kill_after_timeout", pid=pid, timeout_s=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


def _cmd_fetch(args: argparse.Namespace) -> int:
    libs = ensure_jars(args.kafka_version)
    print(f"Kafka {args.kafka_version} jars in {libs}", file=sys.stderr)
    return 0


def _announce(bootstrap: str, ready: ReadyConfig | None) -> int:
    """Write the ready config (``--write-config``) or say how to use the broker; print it."""
    if ready is None:
        print(override_hint(bootstrap), file=sys.stderr)
    else:
        ready.write(bootstrap)
        print(f"wrote {ready.path}, a config for the broker at {bootstrap}", file=sys.stderr)
    print(bootstrap)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    # Checked before a broker starts: a refusal then costs nothing.
    ready = (
        None
        if args.write_config is None
        else ReadyConfig.prepare(args.write_config, force=args.force)
    )
    state_dir = _state_dir()
    state_path = state_dir / "state.json"
    with _file_lock(state_dir / ".lock"):
        state = _read_state(state_path)
        if state is not None and _is_our_broker(int(state["pid"]), str(state["run_dir"])):
            print(f"a broker is already running (pid {state['pid']})", file=sys.stderr)
            return _announce(str(state["bootstrap"]), ready)
        run_dir = state_dir / "run"
        # Each start gets fresh storage, so stale topics never leak between sessions.
        shutil.rmtree(run_dir, ignore_errors=True)
        state_path.unlink(missing_ok=True)
        broker = LocalBroker(run_dir, version=args.kafka_version, port=args.port, detached=True)
        print(f"starting Kafka {args.kafka_version} (logs in {run_dir})...", file=sys.stderr)
        bootstrap = broker.start(timeout_s=args.timeout)
        partial = broker.cds_partial
        state = {
            "pid": broker.pid,
            "bootstrap": bootstrap,
            "run_dir": str(broker.run_dir),
            "version": args.kafka_version,
            "cds_partial": None if partial is None else str(partial),
        }
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(state_path)
    return _announce(bootstrap, ready)


def _cmd_stop(args: argparse.Namespace) -> int:
    state_dir = _state_dir()
    state_path = state_dir / "state.json"
    with _file_lock(state_dir / ".lock"):
        state = _read_state(state_path)
        if state is None:
            print("no broker running", file=sys.stderr)
            return 0
        pid, run_dir = int(state["pid"]), str(state["run_dir"])
        clean = False
        if _is_our_broker(pid, run_dir):
            clean = _terminate(pid, args.timeout)
            print(f"stopped the broker on {state['bootstrap']}", file=sys.stderr)
        else:
            print("the broker had already exited", file=sys.stderr)
        partial = state.get("cds_partial")
        _adopt_cds(Path(partial) if partial else None, clean_exit=clean)
        shutil.rmtree(run_dir, ignore_errors=True)
        state_path.unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = _read_state(_state_dir() / "state.json")
    if state is None or not _is_our_broker(int(state["pid"]), str(state["run_dir"])):
        print("no broker running", file=sys.stderr)
        return 1
    print(state["bootstrap"])
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer broker",
        description="Run a local single-node Kafka broker (KRaft) from its Maven Central jars.",
    )
    parser.add_argument(
        "--kafka-version",
        default=DEFAULT_VERSION,
        help=f"Kafka release (default {DEFAULT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the broker jars into the cache and exit")
    start = sub.add_parser("start", help="start a detached broker and print its bootstrap address")
    start.add_argument("--port", type=_port, default=None, help="client port (default: a free one)")
    start.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for readiness (default 90)"
    )
    start.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a config for this broker to PATH: ./config.yaml (or the built-in "
        "defaults) with kafka.bootstrap_servers set to it, kafka.create_topics true, "
        "model.path 'model' (next to PATH) and metrics.port 0; refused if PATH exists "
        "(default: print the --set override on stderr instead)",
    )
    start.add_argument(
        "--force", action="store_true", help="let --write-config replace an existing file"
    )
    stop = sub.add_parser("stop", help="stop the broker started by 'start' and delete its data")
    stop.add_argument("--timeout", type=float, default=20.0, help="seconds before SIGKILL")
    sub.add_parser("status", help="print the running broker's address; exit 1 when none runs")
    return parser


_COMMANDS: Final = {
    "fetch": _cmd_fetch,
    "start": _cmd_start,
    "stop": _cmd_stop,
    "status": _cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    """Run ``fetch``, ``start``, ``stop`` or ``status``; return the process exit code.

    Only ``start`` and ``status`` write to stdout, and only the bootstrap address, so
    scripts can do ``BOOTSTRAP=$(streamer broker start)``; the caller must route
    structlog to stderr (structlog's default is stdout). Exit codes: 0 success,
    1 failure (or no broker, for ``status``), 2 bad arguments (a ``--write-config``
    file that exists, or a base config that is not valid: no broker is started).
    """
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (InputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
