"""The engine end to end on simulated data: training detects injected anomalies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.config import (
    AlertsConfig,
    InferenceConfig,
    NoveltyConfig,
    ThresholdConfig,
    TrainConfig,
)
from streamer.dev.simulate import CHANNELS, simulate
from streamer.engine import Engine
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.train import train_model
from streamer.offline import run_rows
from streamer.scoring.novelty import NoveltySettings, SensorNovelty

WINDOW = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    normal = simulate(4, 1500, seed=10)
    cfg = TrainConfig(
        preset="conv1d", epochs=15, hidden=16, latent=8, patience=5, seed=1, train_stride=2
    )
    res = train_model(list(normal.values), list(CHANNELS), WINDOW, cfg, progress=False)
    out = tmp_path_factory.mktemp("engine") / "model"
    save_checkpoint(out, res.module, res.scaler, list(CHANNELS), 1, {}, res.calibration)
    return out


class TestDetection:
    """Trained on normal data, the engine finds injected faults of every kind."""

    def test_precision_and_recall_on_injected_anomalies(self, model_dir: Path) -> None:
        """Event recall >= 0.8 over all fault kinds, and point precision >= 0.6."""
        model = load_checkpoint(model_dir)
        plant = simulate(6, 1500, seed=11, anomalies_per_sensor=3, clean_prefix=WINDOW * 2)
        tp = fp = 0
        hit_events = 0
        with Engine(
            model,
            max_gap_s=float("inf"),
            threshold=ThresholdConfig(method="spot", risk=1e-3, level=0.98),
            alerts=AlertsConfig(open_after=2, open_within=4, close_after=5),
            inference=InferenceConfig(),
        ) as engine:
            for s in range(plant.sensors):
                res = run_rows(engine, f"s{s}", np.arange(1500.0), plant.values[s])
                labels = plant.labels[s]
                # A window is anomalous if any of its rows is: faults show up in
                # windows that end up to WINDOW rows after them.
                near = np.convolve(labels, np.ones(WINDOW), mode="full")[: len(labels)] > 0
                tp += int((res.anomalous & near).sum())
                fp += int((res.anomalous & ~near).sum())
                for inj in (i for i in plant.injections if i.sensor == s):
                    if res.alert_open[inj.start : inj.end + WINDOW].any():
                        hit_events += 1
        precision = tp / max(tp + fp, 1)
        recall = hit_events / len(plant.injections)
        assert len(plant.injections) == 18
        assert recall >= 0.8, f"event recall {recall:.2f}"
        assert precision >= 0.6, f"precision {precision:.2f}"

    def test_normal_data_raises_few_alerts(self, model_dir: Path) -> None:
        """On fresh normal data the false alarm rate per window stays under 2 %."""
        model = load_checkpoint(model_dir)
        plant = simulate(3, 1500, seed=12)
        with Engine(
            model,
            max_gap_s=float("inf"),
            threshold=ThresholdConfig(method="spot", risk=1e-3, level=0.98),
            alerts=AlertsConfig(),
            inference=InferenceConfig(),
        ) as engine:
            flags = [
                run_rows(engine, f"n{s}", np.arange(1500.0), plant.values[s]) for s in range(3)
            ]
        rate = np.mean([f.anomalous[f.scored].mean() for f in flags])
        assert rate < 0.02, f"false alarm rate {rate:.3f}"


class TestNovelty:
    """With ``novelty.enabled`` the engine scores windows by the sensor's history."""

    def test_window_scores_are_the_history_novelty_and_sensors_are_forgotten(
        self, model_dir: Path
    ) -> None:
        model = load_checkpoint(model_dir)
        plant = simulate(2, 1500, seed=13)
        novelty = NoveltyConfig(
            enabled=True, points=8, scales=[1, 4], history=500, learning_rows=300
        )
        stride = 4
        with Engine(
            model,
            max_gap_s=float("inf"),
            threshold=ThresholdConfig(method="fixed", value=0.99),
            alerts=AlertsConfig(open_after=1, open_within=1, close_after=20),
            inference=InferenceConfig(),
            stride=stride,
            novelty=novelty,
        ) as engine:
            got = run_rows(engine, "a", np.arange(1500.0), plant.values[0])
            assert engine.novelty is not None and len(engine.novelty) == 1
            engine.sensors.forget(["a"])
            assert len(engine.novelty) == 0
        # The same rows through the novelty alone, scaled as the model scales them.
        settings = NoveltySettings(points=8, scales=(1, 4), history=500, learning_rows=300)
        offset = model.module.offset.numpy().astype(np.float64)
        scale = model.module.scale.numpy().astype(np.float64)
        rows = SensorNovelty(settings, len(CHANNELS)).update(
            (plant.values[0].astype(np.float32) - offset) / scale
        )
        ends = np.flatnonzero(got.scored)
        assert ends[0] == WINDOW - 1 and np.all(np.diff(ends) == stride)
        want = [rows[:WINDOW].max()] + [rows[e - stride + 1 : e + 1].max() for e in ends[1:]]
        np.testing.assert_allclose(got.score[ends], want, rtol=1e-6, atol=1e-6)
        # The threshold decides on the novelty, not on the model's error.
        np.testing.assert_array_equal(got.anomalous[ends], got.score[ends] > 0.99)
