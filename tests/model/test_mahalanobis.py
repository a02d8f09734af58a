"""The ``mahalanobis`` window score: fitted on normal windows, saved, and what it catches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from streamer.config import TrainConfig
from streamer.errors import CheckpointError
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.networks import SCORE_SCALE_QUANTILE, fit_residual_model
from streamer.model.train import TrainResult, make_windows, score_windows, train_model

CHANNELS = ["a", "b", "c", "d"]
W = 16


def plant(rows: int, seed: int) -> NDArray[np.float64]:
    """Four channels driven by one slow common factor, each with small noise of its own."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    common = np.sin(t / 25.0) + 0.5 * np.sin(t / 7.0)
    return common[:, None] * np.array([1.0, 0.8, -0.6, 1.2]) + rng.normal(0, 0.05, (rows, 4))


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    torch.manual_seed(0)
    cfg = TrainConfig(preset="dense", epochs=40, hidden=16, latent=4, score="mahalanobis")
    return train_model([plant(1500, 0)], CHANNELS, W, cfg, progress=False)


def scores(res: TrainResult, rows: NDArray[np.float64]) -> NDArray[np.float64]:
    s, _ = score_windows(res.module, make_windows(rows, W, 1))
    return s


class TestScore:
    def test_normal_data_scores_in_units_of_its_99th_percentile(self, trained: TrainResult) -> None:
        fresh = scores(trained, plant(1500, 1))
        # Fitted on other windows of the same process: about 1 % above 1, none far above.
        assert 0.001 <= float(np.mean(fresh > 1.0)) <= 0.05
        assert float(np.quantile(fresh, 0.999)) < 4.0
        assert SCORE_SCALE_QUANTILE == 0.99

    def test_a_small_shift_of_one_channel_is_caught(self, trained: TrainResult) -> None:
        """A shift of 0.25 (5 noise sigmas, an eighth of the channel's range) in one channel.

        Too small for the mean squared error to notice against the channel's normal
        error; the channels no longer move together, which the residuals' covariance sees.
        """
        rows = plant(600, 2)
        shifted = rows.copy()
        shifted[300:, 1] += 0.25
        base, hit = scores(trained, rows), scores(trained, shifted)
        after = slice(300, None)  # windows that end after the shift starts and hold it all
        assert float(np.mean(hit[after] > 5.0)) > 0.9, np.quantile(hit[after], [0.1, 0.5])
        assert float(np.mean(base[after] > 5.0)) < 0.01
        # The channel errors themselves barely move: the mean over channels stays near
        # its normal range, which is why a mean or max reduction misses such a shift.
        _, err_base = score_windows(trained.module, make_windows(rows, W, 1))
        _, err_hit = score_windows(trained.module, make_windows(shifted, W, 1))
        ratio = float(np.median(err_hit[after].mean(1)) / np.median(err_base[after].mean(1)))
        assert ratio < 5.0, ratio

    def test_a_noisy_channel_weighs_as_its_noise(self) -> None:
        """Doubling a channel's normal noise does not make its normal windows alarm."""
        rng = np.random.default_rng(3)
        data = plant(1500, 4)
        data[:, 3] += rng.normal(0, 0.4, 1500)  # channel d is noisy in normal operation
        torch.manual_seed(0)
        cfg = TrainConfig(preset="dense", epochs=40, hidden=16, latent=4, score="mahalanobis")
        res = train_model([data], CHANNELS, W, cfg, progress=False)
        fresh = plant(1500, 5)
        fresh[:, 3] += rng.normal(0, 0.4, 1500)
        assert float(np.mean(scores(res, fresh) > 2.0)) < 0.02


class TestFit:
    def test_constant_channel_does_not_make_it_singular(self, trained: TrainResult) -> None:
        r = np.random.default_rng(0).normal(size=(200, 4))
        r[:, 2] = 0.0
        fit_residual_model(trained.module, r)
        assert torch.isfinite(trained.module.residual_precision).all()
        assert float(trained.module.score_scale) > 0

    def test_needs_two_windows(self, trained: TrainResult) -> None:
        with pytest.raises(ValueError, match="at least 2 windows"):
            fit_residual_model(trained.module, np.zeros((1, 4)))


class TestCheckpoint:
    def test_round_trip_scores_identically(self, trained: TrainResult, tmp_path: Path) -> None:
        res = trained
        save_checkpoint(tmp_path / "m", res.module, res.scaler, CHANNELS, 1, {}, res.calibration)
        loaded = load_checkpoint(tmp_path / "m")
        x = make_windows(plant(200, 7), W, 1)
        np.testing.assert_array_equal(
            score_windows(loaded.module, x)[0], score_windows(res.module, x)[0]
        )
        sidecar = json.loads((tmp_path / "m" / "model.json").read_text())
        assert sidecar["architecture"]["score"] == "mahalanobis"
        assert len(sidecar["residual_model"]["precision"]) == 4

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda rm: rm.pop("precision"), "residual_model is malformed"),
            (lambda rm: rm.update(mean=[0.0, 0.0]), "a mean of 4 values"),
            (lambda rm: rm.update(score_scale=0.0), "non-finite or non-positive"),
            (lambda rm: rm.update(score_scale=float("nan")), "non-finite or non-positive"),
        ],
    )
    def test_bad_residual_model_is_refused(
        self, trained: TrainResult, tmp_path: Path, edit: object, message: str
    ) -> None:
        res = trained
        save_checkpoint(tmp_path / "m", res.module, res.scaler, CHANNELS, 1, {}, res.calibration)
        path = tmp_path / "m" / "model.json"
        sidecar = json.loads(path.read_text())
        edit(sidecar["residual_model"])  # type: ignore[operator]
        path.write_text(json.dumps(sidecar))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "m")
