"""End-to-end benchmarks against a real local Kafka broker: throughput, latency, scale.

One command runs the suite and prints a Markdown report (also written with
``--out FILE``)::

    .venv/bin/python benchmarks/e2e.py                      # everything, default sizes
    .venv/bin/python benchmarks/e2e.py --only throughput --samples 200000

* **throughput**: a stream of ``--sensors`` x ``--samples`` is produced first;
  then, on the same topic, (1) the *ceiling*: a plain confluent-kafka consumer
  that reads and JSON-decodes every message and does nothing else; (2) the
  *daemon*: ``streamer run`` as a subprocess, timed from its start until every
  expected score is published (and, separately, first to last score); (3) the
  *floor*: a naive pipeline in the style of the original write-up (one message at
  a time, ``json.loads``, a Python list per sensor, one model call per window, one
  produce per score), run for ``--floor-seconds`` and reported as a rate.
* **latency**: samples stamped with the wall clock are produced at a third and at
  half of the daemon's measured rate (``--latency-loads``), every sensor aligned on
  one clock and staggered (``--latency-modes``); latency = publish time of the score
  (broker CreateTime set by the daemon's producer) minus the window's last sample time.
* **scale**: peak RSS (VmHWM) and throughput at several sensor counts and window
  sizes.
* **restart** (only with ``--only restart``): ``--restart-sensors`` sensors are
  scored, the daemon is stopped with SIGTERM (its shutdown round writes every
  sensor's state), then started again on the same group: the time from SIGTERM to
  exit, and from the new process's start until it is ready (its state restored),
  with the restore's own seconds (the partitions' state is read together; the
  longest ``state_restored`` line counts from the start of that read).
* **startup** (only with ``--only startup``): process start to the first score with
  the input waiting (``--sensors`` x ``--startup-rows``), ``--startup-runs`` times per
  backend in ``--startup-backends``, with the daemon's own ``startup`` phases.
* **tls** (only with ``--only tls``): the throughput run's daemon on a plaintext broker
  and on a second, SASL_SSL broker (SCRAM-SHA-512, ACLs enforced), in turns on the same
  stream, ``--pairs`` times each: the cost of TLS and SASL as ratios.

Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import torch

# The suites live in e2e_parts, beside this script (its folder is on the path when run).
from e2e_parts import daemons
from e2e_parts.fleet import restart, scale
from e2e_parts.latency import latency
from e2e_parts.paired import tls
from e2e_parts.startup import startup
from e2e_parts.stream import broker_and_tmp
from e2e_parts.throughput import throughput


def build_parser() -> argparse.ArgumentParser:
    """The command line: the suites to run, their sizes, and the daemon's settings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--only",
        choices=["throughput", "latency", "scale", "restart", "tls", "startup"],
        action="append",
    )
    ap.add_argument("--bootstrap", default=os.environ.get("STREAMER_BENCH_BOOTSTRAP"))
    _add_size_options(ap)
    _add_daemon_options(ap)
    ap.add_argument("--out", type=Path, default=None)
    return ap


def _add_size_options(ap: argparse.ArgumentParser) -> None:
    """The stream's shape and each suite's sizes."""
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--floor-seconds", type=float, default=30.0)
    ap.add_argument("--latency-seconds", type=float, default=60.0)
    ap.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="samples/s for the latency run (default: --latency-loads of the measured rate)",
    )
    ap.add_argument(
        "--latency-loads",
        default="0.333,0.5",
        help="fractions of the daemon's measured steady rate to run the latency suite at",
    )
    ap.add_argument(
        "--latency-modes",
        default="aligned,staggered",
        help="aligned: every sensor from row 0; staggered: sensor s from row s %% stride",
    )
    ap.add_argument("--scale-sensors", default="100,10000,100000")
    ap.add_argument("--scale-window", type=int, default=64)
    ap.add_argument("--scale-channels", type=int, default=8)
    ap.add_argument("--scale-windows", default="32,128,512")
    ap.add_argument("--scale-samples", type=int, default=1_000_000)
    ap.add_argument("--restart-sensors", default="100000", help="sensor counts, comma-separated")
    ap.add_argument("--startup-rows", type=int, default=200, help="samples per sensor waiting")
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--startup-backends", default="onnxruntime,torch")


def _add_daemon_options(ap: argparse.ArgumentParser) -> None:
    """The daemon's config overrides, its logs, and a baseline build to run in turns with."""
    ap.add_argument("--queue-size", type=int, default=None, help="inference.queue_size override")
    ap.add_argument("--max-batch", type=int, default=None, help="inference.max_batch override")
    ap.add_argument(
        "--commit-interval", type=float, default=None, help="kafka.commit_interval_s override"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any daemon config override, e.g. inference.threads=1 (repeatable)",
    )
    ap.add_argument(
        "--daemon-logs", type=Path, default=None, help="keep each daemon's log in this folder"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="throughput: also run the daemon of this other checkout, in turns with this one",
    )
    ap.add_argument("--pairs", type=int, default=3, help="runs of each build with --baseline")


def report_header() -> list[str]:
    """The report's title, the machine it ran on and the command that ran it."""
    return [
        f"# streamer benchmarks ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} "
        f"({'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}).",
        "",
        "Command: `" + " ".join(["python", "benchmarks/e2e.py", *sys.argv[1:]]) + "`",
        "",
    ]


def run_suites(
    bootstrap: str, tmp: Path, args: argparse.Namespace, suites: list[str], report: list[str]
) -> None:
    """Each chosen suite in turn, appending its section to ``report``.

    The latency suite produces at ``--latency-loads`` (a third and a half) of the daemon's
    measured rate: from the throughput suite when it ran, else from a throughput run of
    its own whose section is not reported; or at ``--latency-rate`` when given.
    """
    rate = None
    if "throughput" in suites:
        rate = throughput(bootstrap, tmp, args, report)
    if "latency" in suites:
        if args.latency_rate is not None:
            latency(bootstrap, tmp, args, args.latency_rate, "set by --latency-rate", report)
        else:
            if rate is None:
                rate = throughput(bootstrap, tmp, args, [])
            for load in (float(f) for f in args.latency_loads.split(",")):
                note = f"{load:.3g} of the daemon's steady rate, {rate:,.0f} samples/s"
                latency(bootstrap, tmp, args, rate * load, note, report)
    if "scale" in suites:
        scale(bootstrap, tmp, args, report)
    if "restart" in suites:
        restart(bootstrap, tmp, args, report)
    if "tls" in suites:
        tls(bootstrap, tmp, args, report)
    if "startup" in suites:
        startup(bootstrap, tmp, args, report)


def main() -> None:
    """Run the chosen suites and print (and optionally write) the Markdown report."""
    args = build_parser().parse_args()
    daemons.DAEMON_LOG_DIR = args.daemon_logs
    suites = args.only or ["throughput", "latency", "scale"]
    report = report_header()
    with broker_and_tmp(args.bootstrap, "streamer-bench-") as (bootstrap, tmp):
        run_suites(bootstrap, tmp, args, suites, report)
    text = "\n".join(report)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
