"""``streamer demo``: the whole system on one machine, with nothing configured.

Starts the local Apache Kafka broker, simulates a fleet of sensors with injected
faults, trains a model on their normal history, runs the real daemon
(``streamer run`` in a subprocess) against the live stream, shows progress and
alerts in the terminal, and ends with precision and recall against the injected
ground truth and a PNG plot of scores, thresholds and alerts.
"""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog
import yaml

from streamer.config import TrainConfig
from streamer.dev.broker import LocalBroker
from streamer.dev.simulate import ANOMALY_KINDS, CHANNELS, Plant, simulate
from streamer.errors import StreamerError
from streamer.kafka.plain import plain_consumer, plain_producer, topic_names

__all__ = ["SAMPLE_S", "T0", "faults_found", "plotted_pumps", "run_demo"]

SAMPLE_S = 10.0  # simulated seconds between samples
PERIOD = 288  # samples per simulated "day"
T0 = 1_764_201_600.0


def _train(history: Plant, out: Path, window: int, stride: int) -> str:
    from streamer.model.checkpoint import save_checkpoint
    from streamer.model.train import train_model

    cfg = TrainConfig(preset="conv1d", epochs=12, hidden=16, latent=8, patience=4, train_stride=2)
    res = train_model(list(history.values), list(CHANNELS), window, cfg, progress=True)
    loaded = save_checkpoint(
        out, res.module, res.scaler, list(CHANNELS), stride, {"source": "demo"}, res.calibration
    )
    return loaded.version


def _config(bootstrap: str, model: Path, window: int, stride: int, run_id: str) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"demo-{run_id}",
            "create_topics": True,
            "commit_interval_s": 2.0,
        },
        "topics": {
            "input": f"demo-sensors-{run_id}",
            "scores": f"demo-scores-{run_id}",
            "alerts": f"demo-alerts-{run_id}",
            "dlq": f"demo-dlq-{run_id}",
            "state": f"demo-state-{run_id}",
        },
        "stream": {
            "channels": list(CHANNELS),
            "window": window,
            "stride": stride,
            "max_gap_s": 10 * SAMPLE_S,
        },
        "model": {"path": str(model), "device": "auto"},
        "threshold": {"method": "spot", "risk": 1e-4, "level": 0.98},
        "alerts": {"open_after": 2, "open_within": 4, "close_after": 6},
        "metrics": {"enabled": False, "stats_interval_s": 5.0},
    }


def _produce(bootstrap: str, topic: str, live: Plant, rate_hz: float) -> None:
    producer = plain_producer(bootstrap, **{"linger.ms": 20})
    sensors, rows, _ = live.values.shape
    names = [f"pump-{s:02d}" for s in range(sensors)]
    started = time.monotonic()
    for t in range(rows):
        ts = T0 + t * SAMPLE_S
        for s in range(sensors):
            value = orjson.dumps(
                {"sensor": names[s], "ts": ts, "values": live.values[s, t].tolist()}
            )
            while True:
                try:
                    producer.produce(topic, value, key=names[s])
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
        # Pace the stream so the run is watchable: rate_hz rows of every sensor per second.
        ahead = (t + 1) / rate_hz - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)


def _channel_name(entry: Any) -> str:
    """A top-channel entry of an alert record, as a name."""
    if isinstance(entry, dict):
        return str(entry.get("channel", "?"))
    if isinstance(entry, list | tuple) and entry:
        return str(entry[0])
    return str(entry)


def _plot(
    path: Path,
    live: Plant,
    scores: dict[str, list[dict[str, Any]]],
    alerts: list[dict[str, Any]],
    found: list[bool],
    names: list[str],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(names), 1, figsize=(12, 2.6 * len(names)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=True):
        s = int(name.split("-")[1])
        recs = sorted(scores.get(name, []), key=lambda r: r["window_end"])
        x = [(r["window_end"] - T0) / SAMPLE_S for r in recs]
        ax.semilogy(x, [max(r["score"], 1e-9) for r in recs], lw=0.8, label="score")
        ax.semilogy(
            x, [r["threshold"] for r in recs], lw=0.8, color="black", ls="--", label="threshold"
        )
        for inj, ok in zip(live.injections, found, strict=True):
            if inj.sensor != s:
                continue
            ax.axvspan(inj.start, inj.end, color="orange" if ok else "grey", alpha=0.25)
            # Inside the axes (below the top edge), so the label is never clipped.
            label = inj.kind if ok else f"{inj.kind} (MISSED)"
            ax.text(
                inj.start, 0.97, label, fontsize=7, va="top", transform=ax.get_xaxis_transform()
            )
        for a in alerts:
            if a["sensor"] == name and a["state"] == "closed":
                ax.axvspan(
                    (a["started"] - T0) / SAMPLE_S,
                    (a["ended"] - T0) / SAMPLE_S,
                    ymin=0,
                    ymax=0.08,
                    color="red",
                )
        ax.set_ylabel(f"{name}\nscore (log)")
    handles, _labels = axes[0].get_legend_handles_labels()
    handles += [
        Patch(color="orange", alpha=0.25, label="injected fault, alerted"),
        Patch(color="grey", alpha=0.25, label="injected fault, missed"),
        Patch(color="red", label="alert (open to close)"),
    ]
    # Above the panels, so it hides no fault label and no score.
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.945), fontsize=8, ncol=5)
    axes[-1].set_xlabel("sample")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _alert_spans(alerts: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Each sensor's alerts as (started, ended) times; one still open ends at infinity."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for a in alerts:
        if a["state"] == "closed":
            spans[a["sensor"]].append((a["started"], a["ended"]))
        elif not any(b["id"] == a["id"] and b["state"] == "closed" for b in alerts):
            spans[a["sensor"]].append((a["started"], float("inf")))
    return spans


def faults_found(live: Plant, alerts: list[dict[str, Any]], window: int) -> list[bool]:
    """Per injected fault: whether an alert overlaps it or the window after it."""
    spans = _alert_spans(alerts)
    slack = window * SAMPLE_S
    out = []
    for inj in live.injections:
        lo, hi = T0 + inj.start * SAMPLE_S, T0 + inj.end * SAMPLE_S + slack
        out.append(any(s <= hi and e >= lo for s, e in spans[f"pump-{inj.sensor:02d}"]))
    return out


def _evaluate(
    live: Plant, alerts: list[dict[str, Any]], window: int, found: list[bool]
) -> dict[str, float]:
    """Event recall (``found``: :func:`faults_found`) and alert precision (an alert that
    overlaps a fault or the window after it)."""
    spans = _alert_spans(alerts)
    slack = window * SAMPLE_S
    true_alerts = total_alerts = 0
    for name, ss in spans.items():
        s = int(name.split("-")[1])
        for st, en in ss:
            total_alerts += 1
            if any(
                st <= T0 + i.end * SAMPLE_S + slack and en >= T0 + i.start * SAMPLE_S
                for i in live.injections
                if i.sensor == s
            ):
                true_alerts += 1
    return {
        "recall": sum(found) / max(len(live.injections), 1),
        "precision": true_alerts / max(total_alerts, 1),
        "faults": float(len(live.injections)),
        "alerts": float(total_alerts),
    }


def plotted_pumps(live: Plant, found: list[bool], sensors: int, panels: int = 4) -> list[str]:
    """The pumps the plot shows: those with a missed fault first, then those with a fault
    found, then the rest, ``panels`` at most, in pump order."""
    missed = {i.sensor for i, ok in zip(live.injections, found, strict=True) if not ok}
    faulty = {i.sensor for i in live.injections}
    ranked = sorted(range(sensors), key=lambda s: (s not in missed, s not in faulty, s))
    return [f"pump-{s:02d}" for s in sorted(ranked[:panels])]


def _watch(
    console: Any,
    consumer: Any,
    topics: dict[str, str],
    expected: int,
    daemon: subprocess.Popen[bytes],
    log_path: Path,
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], set[str]]:
    """Read scores and alerts until every window is scored, with a live table of alerts."""
    from rich.live import Live
    from rich.table import Table

    scores: dict[str, list[dict[str, Any]]] = defaultdict(list)
    alerts: list[dict[str, Any]] = []
    seen: set[str] = set()
    last_new = time.monotonic()

    def view() -> Table:
        # One row per alert, its latest record (open, then closed), in order of start.
        latest = {a["id"]: a for a in alerts}
        rows = sorted(latest.values(), key=lambda a: (a["started"], a["sensor"]))
        table = Table(
            title=f"windows scored {len(seen)}/{expected}, alerts {len(latest)} "
            "(the latest 12 by start)"
        )
        for col in ("alert", "sensor", "id", "from sample", "peak score", "top channels"):
            table.add_column(col)
        for a in rows[-12:]:
            table.add_row(
                a["state"],
                a["sensor"],
                a["id"][:10],
                f"{(a['started'] - T0) / SAMPLE_S:.0f}",
                f"{a['peak_score']:.3g}",
                ", ".join(_channel_name(c) for c in a["top_channels"]),
            )
        return table

    with Live(view(), console=console, refresh_per_second=4) as live_view:
        while len(seen) < expected:
            for msg in consumer.consume(1000, 0.2):
                value = msg.value()
                if msg.error() or value is None:
                    continue
                rec = orjson.loads(value)
                if msg.topic() == topics["scores"]:
                    if rec["id"] not in seen:
                        seen.add(rec["id"])
                        scores[rec["sensor"]].append(rec)
                        last_new = time.monotonic()
                else:
                    alerts.append(rec)
            live_view.update(view())
            if daemon.poll() is not None:
                raise StreamerError(f"the daemon exited with {daemon.returncode}; see {log_path}")
            if time.monotonic() - last_new > 120:
                raise StreamerError(f"no new scores for 2 minutes; see {log_path}")
    return scores, alerts, seen


def _wait_for_topics(
    bootstrap: str, names: set[str], daemon: subprocess.Popen[bytes], log_path: Path
) -> None:
    """The daemon creates the topics; wait until it has (for two minutes at most)."""
    deadline = time.monotonic() + 120
    while names - topic_names(bootstrap):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise StreamerError(f"the daemon did not start; see {log_path}")
        time.sleep(0.5)


def _plot_title(version: str, figures: dict[str, float], sensors: int) -> str:
    """The plot's title: the model, and how its alerts matched the injected faults."""
    return (
        f"streamer demo: model {version}\n{int(figures['alerts'])} alerts for "
        f"{int(figures['faults'])} faults, precision {figures['precision']:.2f}, "
        f"recall {figures['recall']:.2f} (all {sensors} pumps; 4 shown, those with a missed "
        "fault first)"
    )


def _log_to_stderr() -> None:
    """Send the demo's own log lines (the broker's start and stop), info and above, to stderr.

    stdout is the live table and the result.
    """
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _simulate_fleet(sensors: int, rows: int, window: int) -> tuple[Plant, Plant]:
    """A normal history to train on, and a live stream with every kind of fault injected."""
    history = simulate(sensors, 3000, period=PERIOD, seed=1)
    live = simulate(
        sensors,
        rows,
        period=PERIOD,
        seed=2,
        anomalies_per_sensor=2,
        clean_prefix=window * 3,
        kinds=ANOMALY_KINDS,
    )
    return history, live


def _start_daemon(cfg_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``streamer run`` on ``cfg_path`` in a subprocess, its output in ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--config", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _start_producer(bootstrap: str, topic: str, live: Plant, rate_hz: float) -> threading.Thread:
    """Stream ``live`` to ``topic`` from a daemon thread, paced at ``rate_hz`` rows a second."""
    thread = threading.Thread(target=_produce, args=(bootstrap, topic, live, rate_hz), daemon=True)
    thread.start()
    return thread


def _drain_alerts(consumer: Any, topic: str) -> list[dict[str, Any]]:
    """The alert records still to come on ``topic`` (within two seconds)."""
    alerts: list[dict[str, Any]] = []
    for msg in consumer.consume(1000, 2.0):
        value = msg.value()
        if not msg.error() and value is not None and msg.topic() == topic:
            alerts.append(orjson.loads(value))
    return alerts


def run_demo(out_dir: Path, sensors: int = 12, rows: int = 1500, rate_hz: float = 60.0) -> int:
    """Run the demo; returns the exit code."""
    from rich.console import Console

    _log_to_stderr()
    console = Console()
    window, stride = 32, 4
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{int(time.time())}"
    history, live = _simulate_fleet(sensors, rows, window)
    console.print(
        f"[bold]streamer demo[/]: {sensors} sensors x {len(CHANNELS)} channels, "
        f"{rows} live samples each, {len(live.injections)} injected faults "
        f"({', '.join(ANOMALY_KINDS)})"
    )
    broker = LocalBroker()
    console.print("starting the local Apache Kafka broker ...")
    bootstrap = broker.start()
    console.print(f"broker at {bootstrap}")
    daemon: subprocess.Popen[bytes] | None = None
    try:
        # Absolute: paths in a config are relative to the config file, which lives in
        # out_dir itself, so a relative --out would point the daemon at out/out/model.
        model_dir = out_dir.resolve() / "model"
        version = _train(history, model_dir, window, stride)
        console.print(
            f"trained model {version} on {history.values.shape[1]} normal samples per sensor"
        )
        config = _config(bootstrap, model_dir, window, stride, run_id)
        cfg_path = out_dir / "demo-config.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = out_dir / "daemon.log"
        daemon = _start_daemon(cfg_path, log_path)
        consumer = plain_consumer(bootstrap, f"demo-viewer-{run_id}")
        topics = config["topics"]
        _wait_for_topics(bootstrap, set(topics.values()), daemon, log_path)
        consumer.subscribe([topics["scores"], topics["alerts"]])
        producer_thread = _start_producer(bootstrap, topics["input"], live, rate_hz)
        expected = sensors * ((rows - window) // stride + 1)
        scores, alerts, seen = _watch(console, consumer, topics, expected, daemon, log_path)
        producer_thread.join(60)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        # Alerts closed during shutdown arrive after the last score.
        alerts += _drain_alerts(consumer, topics["alerts"])
        consumer.close()
        found = faults_found(live, alerts, window)
        figures = _evaluate(live, alerts, window, found)
        plot = out_dir / "demo.png"
        names = plotted_pumps(live, found, sensors)
        _plot(plot, live, scores, alerts, found, names, _plot_title(version, figures, sensors))
        # Collect the clients made while waiting for the topics, so none is left to
        # complain about the broker going away.
        gc.collect()
        result = (
            f"[bold]result[/]: {len(seen)} windows scored, {int(figures['alerts'])} alerts for "
            f"{int(figures['faults'])} injected faults: precision {figures['precision']:.2f}, "
            f"recall {figures['recall']:.2f}"
        )
        where = f"plot: {plot}\ndaemon log: {log_path}\nconfig: {cfg_path}"
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        broker.stop()
    # Last, after the broker's own lines: the result on a line of its own.
    console.print()
    console.print(result)
    console.print(where)
    return 0
