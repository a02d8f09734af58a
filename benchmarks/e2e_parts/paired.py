"""Two daemons in turns on one stream: this build and a baseline, or PLAINTEXT and SASL_SSL."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from e2e_parts.daemons import REPO, daemon_run, overrides, write_config
from e2e_parts.stream import (
    SECURED,
    expected_windows,
    make_topics,
    produce_stream,
    steady_samples,
    train,
)
from streamer.dev.broker import BrokerSecurity, LocalBroker


def side_by_side(
    bootstrap: str,
    tmp: Path,
    args: argparse.Namespace,
    input_topic: str,
    model: Path,
    expected: int,
    report: list[str],
) -> None:
    """This build and ``--baseline`` in turns on one produced stream, ``--pairs`` times each.

    Each run has its own group and output topics. The order alternates (this build first,
    then the baseline first), so a drift of the machine's load favours neither.
    """
    sensors, window, stride, channels = args.sensors, args.window, args.stride, args.channels
    rows = args.samples // sensors
    builds = {"this build": REPO, "baseline": args.baseline.resolve()}

    def run_one(i: int, name: str) -> dict[str, float]:
        topics = {**make_topics(bootstrap, args.partitions), "input": input_topic}
        cfg = write_config(
            tmp / f"ab-{i}-{name.replace(' ', '-')}.yaml",
            bootstrap,
            topics,
            model,
            window,
            stride,
            channels,
            **overrides(args),
        )
        return daemon_run(cfg, bootstrap, topics["scores"], expected, repo=builds[name])

    runs = alternate(list(builds), args.pairs, run_one, sensors, rows, window)
    report += [
        "## Side by side",
        "",
        f"This build and `{args.baseline}` in turns, {args.pairs} runs each, on one produced "
        f"stream ({sensors:,} sensors, {sensors * rows:,} samples). Samples/s first to last "
        "score and from process start; CPU: the daemon's user + system seconds up to its last "
        "score (start-up included).",
        "",
        *paired_table(runs, "this build", "baseline"),
    ]


def alternate(
    names: list[str],
    pairs: int,
    run_one: Callable[[int, str], dict[str, float]],
    sensors: int,
    rows: int,
    window: int,
) -> dict[str, list[dict[str, float]]]:
    """``run_one(i, name)`` for each name, ``pairs`` times, the order flipped every pair.

    Alternating which goes first keeps a drift of the machine's load from favouring one.
    Each run's figures get its steady and from-start rates added.
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else list(reversed(names)):
            d = run_one(i, name)
            d["steady"] = steady_samples(sensors, rows, window) / d["publish_s"]
            d["from_start"] = sensors * rows / d["wall_s"]
            runs[name].append(d)
            print(f"pair {i + 1} {name}: {d}", file=sys.stderr)
    return runs


def paired_table(runs: dict[str, list[dict[str, float]]], first: str, second: str) -> list[str]:
    """Markdown rows of each pair's figures and the medians, ``first`` / ``second``."""
    lines = [
        f"| run | {first}: steady / from start / CPU s | {second}: steady / from start / CPU s |",
        "|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(runs[first], runs[second], strict=True)):
        lines.append(
            f"| {i + 1} | {a['steady']:,.0f} / {a['from_start']:,.0f} / {a['cpu_s']:.1f} "
            f"| {b['steady']:,.0f} / {b['from_start']:,.0f} / {b['cpu_s']:.1f} |"
        )

    def ratio(key: str) -> float:
        return float(
            np.median([r[key] for r in runs[first]]) / np.median([r[key] for r in runs[second]])
        )

    return [
        *lines,
        "",
        f"Medians, {first} / {second}: steady {ratio('steady'):.3f}, from start "
        f"{ratio('from_start'):.3f}, CPU seconds {ratio('cpu_s'):.3f}.",
        "",
    ]


def tls(bootstrap: str, tmp: Path, args: argparse.Namespace, report: list[str]) -> None:
    """The cost of SASL_SSL: one stream on a plaintext and on a secured broker, in turns.

    A second broker is started with a SASL_SSL listener (SCRAM-SHA-512, TLS 1.2+,
    ACLs enforced; the benchmark's user is a super user, since ACL checks are not
    what is measured). The same stream is produced to both; the daemon then runs
    ``--pairs`` times on each, alternating which goes first, as in the side-by-side run.
    """
    sensors, channels, window, stride = args.sensors, args.channels, args.window, args.stride
    rows = args.samples // sensors
    model = train(tmp / "model-tls", window, stride, channels)
    secured = LocalBroker(
        security=BrokerSecurity(users={"bench": "bench-secret"}, super_users=["bench"])
    )
    secured.start(timeout_s=180)
    try:
        conf = secured.client_config("bench")
        SECURED[secured.bootstrap] = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
        brokers = {"PLAINTEXT": bootstrap, "SASL_SSL": secured.bootstrap}
        inputs = {}
        for name, address in brokers.items():
            inputs[name] = make_topics(address, args.partitions)["input"]
            produce_stream(address, inputs[name], sensors, rows, channels)
        expected = expected_windows(sensors, rows, window, stride)

        def run_one(i: int, name: str) -> dict[str, float]:
            address = brokers[name]
            topics = {**make_topics(address, args.partitions), "input": inputs[name]}
            cfg = write_config(
                tmp / f"tls-{i}-{name}.yaml",
                address,
                topics,
                model,
                window,
                stride,
                channels,
                **overrides(args),
            )
            return daemon_run(cfg, address, topics["scores"], expected)

        runs = alternate(list(brokers), args.pairs, run_one, sensors, rows, window)
    finally:
        secured.stop()
    report += [
        "## SASL_SSL",
        "",
        f"One stream ({sensors:,} sensors, {sensors * rows:,} samples) on a plaintext broker "
        "and on a SASL_SSL one (SCRAM-SHA-512, ACLs enforced), the daemon on each in turns, "
        f"{args.pairs} runs each. Samples/s first to last score and from process start; CPU: "
        "the daemon's user + system seconds up to its last score.",
        "",
        *paired_table(runs, "SASL_SSL", "PLAINTEXT"),
    ]
