"""Checkpoint round trip, pickle refusal and tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.config import TrainConfig
from streamer.errors import CheckpointError
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.train import score_windows, train_model

CHANNELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(600)
    data = np.stack([np.sin(t / 10), np.cos(t / 10), np.sin(t / 5)], axis=1) + rng.normal(
        0, 0.05, (600, 3)
    )
    cfg = TrainConfig(preset="conv1d", epochs=3, hidden=8, latent=4)
    res = train_model([data], CHANNELS, 16, cfg, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(out, res.module, res.scaler, CHANNELS, 4, {"note": "test"}, res.calibration)
    return out


class TestCheckpoint:
    """Saving and loading models."""

    def test_round_trip_scores_identically(self, trained: Path) -> None:
        """A reloaded model gives the same scores, channels, window and stride."""
        a = load_checkpoint(trained)
        b = load_checkpoint(trained)
        x = np.random.default_rng(1).normal(size=(5, 16, 3)).astype(np.float32)
        sa, ea = score_windows(a.module, x)
        sb, eb = score_windows(b.module, x)
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(ea, eb)
        assert a.channels == tuple(CHANNELS)
        assert (a.window, a.stride) == (16, 4)
        assert a.version.startswith("conv1d-")
        assert a.calibration.size > 0
        sidecar = json.loads((trained / "model.json").read_text())
        assert set(sidecar["scaler"]) == {"kind", "offset", "scale"}
        assert "0.99" in sidecar["calibration"]["quantiles"]

    def test_pickle_is_refused(self, trained: Path, tmp_path: Path) -> None:
        """A torch.save archive in place of the weights is refused without unpickling."""
        bad = tmp_path / "model"
        bad.mkdir()
        (bad / "model.json").write_text((trained / "model.json").read_text())
        torch.save({"w": torch.zeros(1)}, bad / "model.safetensors")
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_checkpoint(bad)
        torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(tmp_path / "model.pt")

    def test_tampered_weights_are_refused(self, trained: Path, tmp_path: Path) -> None:
        """Changing one byte of the weights fails the SHA-256 check."""
        bad = tmp_path / "model"
        bad.mkdir()
        (bad / "model.json").write_text((trained / "model.json").read_text())
        blob = bytearray((trained / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (bad / "model.safetensors").write_bytes(bytes(blob))
        with pytest.raises(CheckpointError, match="SHA-256"):
            load_checkpoint(bad)

    def test_missing_and_foreign_sidecars(self, trained: Path, tmp_path: Path) -> None:
        """A directory without a sidecar, or with another format version, is refused."""
        with pytest.raises(CheckpointError, match=r"no model\.json"):
            load_checkpoint(tmp_path)
        bad = tmp_path / "model"
        bad.mkdir()
        sidecar = json.loads((trained / "model.json").read_text())
        sidecar["format_version"] = 99
        (bad / "model.json").write_text(json.dumps(sidecar))
        (bad / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match="format_version 99"):
            load_checkpoint(bad)
