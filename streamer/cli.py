"""The ``streamer`` command: run, train, score, produce, eval, demo, check-*, broker.

Exit codes: 0 success; 2 for anything named on the command line or in the config that
is missing or malformed (the config itself, a data file, a model directory, an
argument); 1 for a failure while running; 141 when the reader of the output closed
it early (``streamer check-config | head``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from streamer import __version__
from streamer.errors import ConfigError, CsvError, InputError, StreamerError

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.data import Stretches

__all__ = ["main"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
# 128 + SIGPIPE, as a shell reports a reader that went away.
EXIT_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse with our exit code for usage errors (2, as argparse does) and no traceback."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _at_least(low: int) -> Any:
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def _positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _add_config(p: argparse.ArgumentParser, *, benchmark: bool = False) -> None:
    """--config, and for every command but eval repeatable --set overrides."""
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the config file (default: the benchmark's built-in settings)"
        if benchmark
        else "the config file (default: ./config.yaml when there is one, else the "
        "built-in defaults); STREAMER__SECTION__KEY=value in the environment overrides a key",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning"],
        default=None,
        help="log level; overrides STREAMER_LOG_LEVEL and logging.level (the daemon logs "
        "to stdout, at info by default; the other commands to stderr, at warning)",
    )
    if not benchmark:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            dest="sets",
            help="override one key, after the file and the environment (repeatable)",
        )


_DESCRIPTION = (
    "Streaming anomaly detection for sensor feeds: Kafka in, scores and alerts out, "
    "scored by a trained autoencoder."
)
_EXIT_CODES = (
    "Exit codes: 0 success; 2 anything named (config, data file, model directory, "
    "argument) missing or malformed; 1 a failure while running; 141 the reader of the "
    "output went away."
)
_EPILOG = (
    _EXIT_CODES + " Environment: STREAMER_LOG_LEVEL (debug|info|warning), "
    "STREAMER_CACHE (the Kafka jars' cache), STREAMER__SECTION__KEY (a config key)."
)
# One example per subcommand, shown under its --help with the exit codes.
_EXAMPLES = {
    "check-config": "streamer check-config --config config.yaml "
    "--set kafka.bootstrap_servers=broker-1:9092",
    "check-access": "streamer check-access --config /etc/streamer/config.yaml",
    "run": "streamer run --config /etc/streamer/config.yaml --log-level info",
    "release": "streamer release --config /etc/streamer/config.yaml",
    "train": "streamer train --config config.yaml --data normal-1.csv normal-2.csv --out model",
    "score": "streamer score --config config.yaml --model model --data live.csv --out scores.csv",
    "produce": "streamer produce --config dev.yaml --data live.csv --rate 100",
    "eval": "streamer eval skab --data SKAB --folds 4 --json skab.json",
    "demo": "streamer demo --out demo-out --sensors 12",
    "broker": "streamer broker start --write-config dev.yaml",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render --help in the docs)."""
    parser = _Parser(prog="streamer", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand whose help line is also its --help description, with an
        example and the exit codes below its options."""
        return subparsers.add_parser(
            name,
            help=summary,
            description=summary[:1].upper() + summary[1:] + ".",
            epilog=f"Example: {_EXAMPLES[name]}. {_EXIT_CODES}",
        )

    _daemon_commands(command)
    _file_commands(command)
    _eval_command(command)
    _tool_commands(command)
    return parser


def _daemon_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The daemon and the checks of its config and its permissions."""
    p = command("check-config", "validate a config file and print it with secrets masked")
    _add_config(p)

    p = command(
        "check-access",
        "connect with the configured credentials and check every permission the daemon "
        "needs (exit 1, with the grants to add, when one is missing)",
    )
    _add_config(p)

    p = command("run", "run the daemon: consume samples, publish scores and alerts")
    _add_config(p)

    p = command(
        "release",
        "hand a crashed daemon's partitions to the group's other members at once (its "
        "static kafka.instance_id is taken and left); run by systemd after the daemon exits",
    )
    _add_config(p)


def _file_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The commands that read CSV files: train, score, produce."""
    p = command("train", "train a model on normal data from CSV files")
    _add_config(p)
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="CSV files of normal data, read with the csv.* settings (gaps: csv.missing, "
        "default refuse)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint directory to write (default: the config's model.path, where "
        "`streamer run` loads the model)",
    )
    p.add_argument(
        "--rows",
        type=_at_least(1),
        default=None,
        metavar="N",
        help="use only the first N rows of each file (default: all)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command("score", "score a CSV file offline with a trained model")
    _add_config(p)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="CSV file to score")
    p.add_argument("--out", type=Path, required=True, help="scores CSV to write")
    p.add_argument("--sensor", default=None, help="sensor name (default: the file name)")

    p = command(
        "produce",
        "send a CSV file to the input topic, one sample per row, in the format the daemon "
        "consumes (to try the daemon on recorded data, or to backfill history)",
    )
    p.epilog = (
        "Example: streamer produce --config dev.yaml --data live.csv --rate 100. The file is "
        "read as train reads it (csv.*; gaps: csv.missing) and checked whole before anything "
        "is sent; the command returns once the broker acknowledged every sample. Exit codes: "
        "0 all delivered; 2 the file, the sensor id or the config is unusable (nothing sent); "
        "1 Kafka not reached, the topic missing, or a sample not delivered."
    )
    _add_config(p)
    p.add_argument("--data", type=Path, required=True, help="CSV file to send")
    p.add_argument(
        "--sensor",
        default=None,
        help="sensor id, also the message key (default: the file name without its suffix)",
    )
    p.add_argument(
        "--rate",
        type=_positive,
        default=None,
        help="rows per second (default: as fast as the broker takes them)",
    )


def _eval_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``eval``: a benchmark protocol, optionally out of fold."""
    p = command("eval", "run a benchmark protocol (skab or nab) and print our figures")
    p.add_argument(
        "benchmark",
        choices=["skab", "nab"],
        help="skab: Skoltech Anomaly Benchmark (F1, FAR, MAR); nab: Numenta Anomaly "
        "Benchmark (standard, low-FP and low-FN scores)",
    )
    _add_config(p, benchmark=True)
    p.add_argument("--data", type=Path, required=True, help="benchmark folder (SKAB or NAB layout)")
    p.add_argument(
        "--json", type=Path, default=None, dest="json_out", help="write the figures as JSON"
    )
    p.add_argument("--scores-out", type=Path, default=None, help="write per-row results here")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N files")
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        metavar="K",
        help="choose what labels choose (SKAB: the fixed alarm level and the alert rule; "
        "NAB: each profile's threshold) on K-1 folds of files and report the held-out "
        "folds only",
    )


def _tool_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The development commands: the demo and the local broker."""
    p = command("demo", "local broker, simulated plant, live alerts, precision/recall")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for model, plot, log")
    p.add_argument("--sensors", type=_at_least(1), default=12, help="simulated sensors")
    p.add_argument(
        "--rows", type=_at_least(200), default=1500, help="live samples per sensor (>= 200)"
    )
    p.add_argument(
        "--rate", type=_positive, default=60.0, help="samples per sensor per second (> 0)"
    )

    p = command("broker", "start, stop or inspect the local development Kafka broker")
    p.add_argument(
        "action",
        choices=["start", "stop", "status", "fetch"],
        help="start: launch a detached broker and print its address; status: print it; "
        "stop: end it; fetch: download the jars only",
    )
    p.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    p.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="start: write a ready config for the broker to PATH (./config.yaml or the "
        "built-in defaults, with kafka.bootstrap_servers, kafka.create_topics: true, "
        "model.path: model, metrics.port: 0); refused if PATH exists (default: print the "
        "--set override on stderr)",
    )
    p.add_argument("--force", action="store_true", help="start: replace an existing PATH")


def _config_path(args: argparse.Namespace) -> Path | None:
    """--config, else ./config.yaml when there is one, else None (the built-in defaults)."""
    if args.config is None and Path("config.yaml").is_file():
        return Path("config.yaml")
    path: Path | None = args.config
    return path


def _load(args: argparse.Namespace) -> Config:
    """The config of a command: the file, the environment, --set and --log-level."""
    from streamer.config import load_config

    sets = list(args.sets)
    if args.log_level is not None:
        # Above the environment: the process (and what it starts) logs at this level.
        os.environ["STREAMER_LOG_LEVEL"] = args.log_level
        sets.append(f"logging.level={args.log_level}")
    return load_config(_config_path(args), sets=sets)


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    json.dump(cfg.redacted(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    print(f"{_config_path(args) or 'built-in defaults'}: ok", file=sys.stderr)
    return EXIT_OK


def _cmd_check_access(args: argparse.Namespace) -> int:
    from streamer.kafka.access import check_access

    cfg = _load(args)
    grants = check_access(cfg.kafka, cfg.topics)
    user = cfg.kafka.librdkafka().get("sasl.username")
    principal = f"User:{user}" if user else "User:<the principal of these credentials>"
    width = max(len(f"{g.resource_type} {g.name}") for g in grants)
    for g in grants:
        mark = {True: "ok", False: "MISSING", None: "unknown"}[g.held]
        line = f"{mark:8} {g.operation:9} {g.resource_type + ' ' + g.name:{width}}  ({g.role})"
        print(line + (f": {g.detail}" if g.detail else ""))
    _report_state_topic(cfg)
    missing = [g for g in grants if g.held is False]
    if any(g.held is None for g in grants):
        print("unknown: the broker reported no authorized operations (no authorizer configured?)")
    if missing:
        print(f"\n{len(missing)} permission(s) missing for {principal}; to grant them:")
        for g in missing:
            print("  " + g.acl_command(principal, cfg.kafka.bootstrap_servers))
        return EXIT_RUNTIME
    print(f"every permission the daemon needs is held ({principal})")
    return EXIT_OK


def _report_state_topic(cfg: Config) -> None:
    """check-access: the state topic settings that let restores grow (not a permission)."""
    from streamer.kafka.admin import alter_topic_command, state_topic_findings

    state = cfg.topics.state
    findings = state_topic_findings(cfg.kafka, state, timeout_s=15.0)
    if findings is None:
        print(f"unknown  settings of state topic {state} (no DescribeConfigs on it)")
        return
    for f in findings:
        print(f"WARNING  {f.name}={f.value} on state topic {state}, want {f.wanted}: {f.why}")
    if findings:
        print("  " + alter_topic_command(cfg.kafka.bootstrap_servers, state, findings))


def _training_data(cfg: Config, paths: list[Path], rows: int | None) -> list[Stretches]:
    """The stretches of rows to train on, from every file (csv.*); what was left out on stderr."""
    from streamer.data import read_stretches

    c = cfg.csv
    channels = list(c.columns or cfg.stream.channels)
    window = cfg.stream.window
    files = [
        read_stretches(p, c.separator, c.timestamp_column, channels, c.missing, window, rows)
        for p in paths
    ]
    for f in files:
        note = f.note()
        if note is not None:
            print(f"streamer: {note}", file=sys.stderr)
    if not any(f.segments for f in files):
        dropped = sum(f.skipped for f in files)
        raise CsvError(
            f"{', '.join(str(p) for p in paths)}: no stretch of {window} consecutive rows "
            "(stream.window) to cut a window from"
            + (f" (csv.missing {c.missing} dropped {dropped} rows)" if dropped else "")
        )
    return files


def _cmd_train(args: argparse.Namespace) -> int:
    from streamer.data import data_hash
    from streamer.model.checkpoint import save_checkpoint
    from streamer.model.train import resolve_device, train_model

    cfg = _load(args)
    out: Path = args.out if args.out is not None else cfg.model.path
    channels = list(cfg.csv.columns or cfg.stream.channels)
    files = _training_data(cfg, args.data, args.rows)
    segments = [seg for f in files for seg in f.segments]
    result = train_model(
        segments,
        channels,
        cfg.stream.window,
        cfg.train,
        device=resolve_device(cfg.model.device),
        progress=not args.no_progress,
    )
    info = dict(
        result.info,
        data_sha256=data_hash(segments, channels),
        files=[str(p) for p in args.data],
        csv_missing=cfg.csv.missing,
        rows_skipped=sum(f.skipped for f in files),
        values_filled=sum(f.filled for f in files),
    )
    loaded = save_checkpoint(
        out, result.module, result.scaler, channels, cfg.stream.stride, info, result.calibration
    )
    skipped = f"; {info['rows_skipped']} rows with gaps skipped" if info["rows_skipped"] else ""
    print(
        f"wrote {out} (model {loaded.version}, {info['epochs_run']} epochs, "
        f"best validation loss {info['best_validation_loss']:.6f}{skipped})"
    )
    return EXIT_OK


def _cmd_score(args: argparse.Namespace) -> int:
    from streamer.offline import score_file

    cfg = _load(args)
    n = score_file(cfg, args.model, args.data, args.out, sensor=args.sensor)
    print(f"wrote {n} windows to {args.out}")
    return EXIT_OK


def _cmd_produce(args: argparse.Namespace) -> int:
    from streamer.data import gap_note
    from streamer.produce import produce_csv

    cfg = _load(args)
    done = produce_csv(cfg, args.data, sensor=args.sensor, rate=args.rate)
    note = gap_note(args.data, done.skipped, done.filled)
    if note is not None:
        print(f"streamer: {note}", file=sys.stderr)
    print(f"produced {done.samples} samples of {done.sensor} to {done.topic}")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from streamer.config import load_config
    from streamer.protocols import eval_nab, eval_skab

    # Without --config each benchmark uses its documented built-in settings.
    cfg = None if args.config is None else load_config(args.config)
    fn = eval_skab if args.benchmark == "skab" else eval_nab
    figures = fn(cfg, args.data, scores_out=args.scores_out, limit=args.limit, folds=args.folds)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    # No release of a crashed predecessor here: the unit's ExecStopPost runs `streamer
    # release` as soon as the process is gone, and a daemon restarted by hand joins under
    # the same static id within its first second or so, which takes the dead member's
    # place (and partitions) at once. A release here would cost every start a group
    # lookup and move a crashed daemon's partitions twice.
    from streamer.daemon import run_daemon

    cfg = _load(args)
    code: int = run_daemon(cfg)
    return code


def _cmd_release(args: argparse.Namespace) -> int:
    from streamer.kafka.membership import release_predecessor
    from streamer.runtime.logs import configure_logging

    cfg = _load(args)
    configure_logging(level=cfg.logging.level)
    release_predecessor(cfg.kafka, cfg.topics.input)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamer.dev.demo import run_demo

    return run_demo(args.out, sensors=args.sensors, rows=args.rows, rate_hz=args.rate)


def _cmd_broker(args: argparse.Namespace) -> int:
    from streamer.dev.broker import main as broker_main
    from streamer.runtime.logs import configure_logging

    # stdout is the broker's address alone (BOOTSTRAP=$(streamer broker start)); structlog
    # writes to stdout unless told otherwise, as python -m streamer.dev.broker tells it.
    configure_logging(level="warning", stream=sys.stderr)

    argv = [args.action] + (["--port", str(args.port)] if args.port else [])
    if args.action == "start":
        argv += ["--write-config", str(args.write_config)] if args.write_config else []
        argv += ["--force"] if args.force else []
    elif args.write_config is not None or args.force:
        print("streamer broker: --write-config and --force go with start", file=sys.stderr)
        return EXIT_USAGE
    return broker_main(argv)


COMMANDS = {
    "check-config": _cmd_check_config,
    "check-access": _cmd_check_access,
    "train": _cmd_train,
    "score": _cmd_score,
    "produce": _cmd_produce,
    "eval": _cmd_eval,
    "run": _cmd_run,
    "release": _cmd_release,
    "demo": _cmd_demo,
    "broker": _cmd_broker,
}


# Commands whose stdout is their result: they log to stderr, warnings only by default.
_OFFLINE = frozenset({"check-config", "check-access", "train", "score", "produce", "eval"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamer`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in _OFFLINE:
            from streamer.runtime.logs import configure_logging

            if args.log_level is not None:
                os.environ["STREAMER_LOG_LEVEL"] = args.log_level
            configure_logging(level="warning", stream=sys.stderr)
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"streamer: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader closed our stdout (`| head`): stop quietly. Python would report the
        # failed flush at exit, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except StreamerError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
