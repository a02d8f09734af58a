"""From nothing to scores with no file edited by hand: the README's quick start, as commands.

``broker start --write-config`` -> ``train`` -> ``produce`` -> ``run``, each a real
subprocess in an empty folder, against a broker of the test's own (not the session's):
the written config must be all the daemon needs. Only ``--set`` keeps the training small.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from streamer.dev.simulate import CHANNELS, simulate
from streamer.encoders import window_id
from tests.helpers import Timeout, consume_all
from tests.integration.helpers import DaemonProcess, validator, wait_for_ids

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_764_201_600  # 2025-11-27T00:00:00Z
WINDOW, STRIDE = 64, 8  # the built-in stream.window and stream.stride
LIVE_ROWS = 200
SMALL_TRAINING = ["train.epochs=2", "train.hidden=8", "train.latent=4", "train.patience=2"]


def write_csv(path: Path, values: np.ndarray, t0: float) -> None:
    """A CSV as a plant historian exports one: an ISO time column, one column per channel."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", *CHANNELS])
        for i, row in enumerate(values.tolist()):
            stamp = np.datetime64(int(t0 + i), "s")
            w.writerow([str(stamp), *(f"{v:.6f}" for v in row)])


def streamer(
    cwd: Path, env: dict[str, str], *args: str, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m streamer ARGS`` in ``cwd``; fails the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"streamer {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_broker_config_train_produce_run(
    tmp_path: Path, broker_cli_env: dict[str, str], daemons: list[DaemonProcess]
) -> None:
    env = broker_cli_env
    plant = simulate(1, 600 + LIVE_ROWS, seed=21)
    write_csv(tmp_path / "normal.csv", plant.values[0, :600], T0)
    write_csv(tmp_path / "live.csv", plant.values[0, 600:], T0 + 600)

    started = streamer(tmp_path, env, "broker", "start", "--write-config", "dev.yaml")
    bootstrap = started.stdout.strip()
    assert started.stdout == f"{bootstrap}\n"  # the address alone: BOOTSTRAP=$(...) works
    assert f"wrote dev.yaml, a config for the broker at {bootstrap}" in started.stderr

    trained = streamer(tmp_path, env, "train", "--config", "dev.yaml", "--data", "normal.csv",
                       *(x for s in SMALL_TRAINING for x in ("--set", s)))  # fmt: skip
    # No --out: the config's model.path, "model" next to the config file (here).
    assert trained.stdout.startswith("wrote model ("), trained.stdout
    version = json.loads((tmp_path / "model" / "model.json").read_text())["model_version"]

    produced = streamer(tmp_path, env, "produce", "--config", "dev.yaml", "--data", "live.csv")
    assert produced.stdout == f"produced {LIVE_ROWS} samples of live to sensors\n"
    inputs = consume_all(bootstrap, "sensors", expected=None)
    assert [m.offset() for m in inputs] == list(range(LIVE_ROWS))

    daemon = DaemonProcess(tmp_path / "dev.yaml").start()
    daemons.append(daemon)
    timeout = Timeout(180)
    # Ready: it created the output topics (kafka.create_topics) and consumes.
    daemon.wait_event("daemon_ready", timeout)
    # One window every STRIDE samples once WINDOW have arrived, ending at these offsets.
    wanted = {window_id("sensors", 0, end) for end in range(WINDOW - 1, LIVE_ROWS, STRIDE)}
    seen = wait_for_ids(bootstrap, "sensor-scores", wanted, timeout, daemon)
    assert seen >= wanted, daemon.tail()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.tail()

    scores = [orjson.loads(m.value() or b"") for m in consume_all(bootstrap, "sensor-scores")]
    assert sorted(s["id"] for s in scores) == sorted(wanted)  # one score per window, no repeats
    check = validator("score")
    for s in scores:
        check.validate(s)
        assert (s["sensor"], s["model"], s["partition"]) == ("live", version, 0)
    assert sorted(s["window_end"] for s in scores) == [
        float(T0 + 600 + end) for end in range(WINDOW - 1, LIVE_ROWS, STRIDE)
    ]

    stopped = streamer(tmp_path, env, "broker", "stop")
    assert f"stopped the broker on {bootstrap}" in stopped.stderr
