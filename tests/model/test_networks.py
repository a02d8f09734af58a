"""Every preset builds, scores and trains on every input transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.config import TrainConfig
from streamer.errors import ConfigError
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.networks import PRESETS, Architecture, ScoringModel, build_network
from streamer.model.train import make_windows, score_windows, train_model


class TestPresets:
    """The model contract: (batch, window, channels) in, scores and channel errors out."""

    @pytest.mark.parametrize("preset", PRESETS)
    @pytest.mark.parametrize("fft", [False, True])
    @pytest.mark.parametrize("window", [16, 21])
    def test_shapes(self, preset: str, fft: bool, window: int) -> None:
        """Scores are (n,) and channel errors (n, C), finite and non-negative."""
        arch = Architecture(preset, window, 4, 8, 4, fft)
        model = ScoringModel(arch, torch.zeros(4), torch.ones(4))
        scores, errors = model(torch.randn(3, window, 4))
        assert scores.shape == (3,)
        assert errors.shape == (3, 4)
        assert torch.isfinite(errors).all() and (errors >= 0).all()
        torch.testing.assert_close(scores, errors.mean(dim=1))

    @pytest.mark.parametrize("preset", PRESETS)
    def test_training_reduces_loss_and_is_deterministic(self, preset: str) -> None:
        """Two runs with one seed give identical weights; training beats the first epoch."""
        t = np.arange(400)
        data = np.stack([np.sin(t / 8), np.cos(t / 8)], axis=1)
        cfg = TrainConfig(preset=preset, epochs=4, hidden=8, latent=4, seed=3, patience=10)
        a = train_model([data], ["x", "y"], 16, cfg, progress=False)
        b = train_model([data], ["x", "y"], 16, cfg, progress=False)
        for (ka, va), (kb, vb) in zip(
            a.module.network.state_dict().items(),
            b.module.network.state_dict().items(),
            strict=True,
        ):
            assert ka == kb
            torch.testing.assert_close(va, vb, rtol=0, atol=0)
        assert a.info["epochs_run"] == 4
        assert a.info["best_validation_loss"] < float("inf")

    def test_unknown_preset(self) -> None:
        """An unknown preset names itself in the error."""
        with pytest.raises(ConfigError, match="'bogus'"):
            build_network(Architecture("bogus", 8, 2, 4, 2, False))


class TestChannelScaling:
    """Per-channel error normalisation and the max reduction."""

    def test_channel_errors_are_in_units_of_training_quantile(self, tmp_path: Path) -> None:
        """With channel_scale_quantile, each channel's training errors have that quantile near 1."""
        rng = np.random.default_rng(0)
        t = np.arange(500)
        # Channel 1 is 100x noisier than channel 0 in scaled units' reconstruction terms.
        data = np.stack([np.sin(t / 8), rng.normal(0, 1, 500)], axis=1)
        cfg = TrainConfig(
            preset="dense", epochs=3, hidden=8, latent=2, score="max", channel_scale_quantile=0.9
        )
        res = train_model([data], ["x", "y"], 16, cfg, progress=False)
        windows = make_windows(data[:400], 16, 1)
        scores, errors = score_windows(res.module, windows)
        np.testing.assert_allclose(np.quantile(errors, 0.9, axis=0), 1.0, rtol=0.05)
        np.testing.assert_allclose(scores, errors.max(axis=1))
        out = tmp_path / "m"
        save_checkpoint(out, res.module, res.scaler, ["x", "y"], 1, {}, res.calibration)
        loaded = load_checkpoint(out)
        again, _ = score_windows(loaded.module, windows)
        np.testing.assert_array_equal(again, scores)
