"""Checkpoint watching and background model loading for hot reload, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from streamer.config import ThresholdConfig
from streamer.dev.simulate import CHANNELS
from streamer.reload import CheckpointWatcher, ModelReloader
from tests.ops.helpers import swap_symlink

SPOT = ThresholdConfig(method="spot", risk=1e-3, level=0.95)


class TestCheckpointWatcher:
    """A change is reported once, and only after the files settle."""

    def test_reports_a_settled_change_once(self, models: dict[str, Path], tmp_path: Path) -> None:
        """Swapping the directory is seen at the second look, then not again."""
        link = tmp_path / "current"
        link.symlink_to(models["a"])
        watcher = CheckpointWatcher(link)
        assert not watcher.changed()
        swap_symlink(link, models["b"])
        assert not watcher.changed()  # first sight: maybe still being written
        assert watcher.changed()
        assert not watcher.changed()

    def test_waits_while_files_keep_changing(self, models: dict[str, Path], tmp_path: Path) -> None:
        """A checkpoint copied file by file is not reported between the two files."""
        current = tmp_path / "current"
        shutil.copytree(models["a"], current)
        watcher = CheckpointWatcher(current)
        shutil.copy2(models["b"] / "model.json", current / "model.json")
        assert not watcher.changed()
        shutil.copy2(models["b"] / "model.safetensors", current / "model.safetensors")
        assert not watcher.changed()
        assert watcher.changed()

    def test_rebase_forgets_a_change(self, models: dict[str, Path], tmp_path: Path) -> None:
        """After rebase (a SIGHUP reload read the files) the same change is not reported."""
        link = tmp_path / "current"
        link.symlink_to(models["a"])
        watcher = CheckpointWatcher(link)
        swap_symlink(link, models["b"])
        watcher.rebase()
        assert not watcher.changed() and not watcher.changed()


class TestModelReloader:
    """Loads validate the checkpoint and the shape; failures say why."""

    def reloader(self, path: Path) -> ModelReloader:
        return ModelReloader(path, "cpu", 16, tuple(CHANNELS), SPOT)

    def test_good_model(self, models: dict[str, Path]) -> None:
        """A compatible checkpoint loads in the background with a calibrated prototype."""
        r = self.reloader(models["b"])
        r.request("signal")
        out = r.wait(30)
        assert out is not None and out.error is None and out.trigger == "signal"
        assert out.model is not None and out.model.version.startswith("conv1d-")
        assert out.prototype is not None and out.seconds > 0

    def test_tampered_weights(self, models: dict[str, Path], tmp_path: Path) -> None:
        """Weights that do not match the sidecar's SHA-256 are refused."""
        bad = shutil.copytree(models["b"], tmp_path / "bad")
        blob = bytearray((bad / "model.safetensors").read_bytes())
        blob[-1] ^= 0xFF
        (bad / "model.safetensors").write_bytes(bytes(blob))
        out = self.reloader(bad).load("signal")
        assert out.model is None and out.error is not None and "SHA-256" in out.error

    def test_pickled_weights(self, models: dict[str, Path], tmp_path: Path) -> None:
        """A torch.save (pickle) archive in place of the weights is refused, never unpickled."""
        bad = shutil.copytree(models["b"], tmp_path / "pickled")
        torch.save({"x": torch.zeros(2)}, bad / "model.safetensors")
        out = self.reloader(bad).load("signal")
        assert out.error is not None and "pickle" in out.error

    def test_incompatible_window(self, models: dict[str, Path]) -> None:
        """A model with another window is refused with both shapes named."""
        out = self.reloader(models["w8"]).load("file_changed")
        assert out.model is None and out.error is not None
        assert "window 8" in out.error and "window 16" in out.error

    def test_missing_directory(self, tmp_path: Path) -> None:
        """A path without a checkpoint is a failure, not an exception."""
        out = self.reloader(tmp_path / "nothing").load("signal")
        assert out.error is not None and "nothing: no such directory" in out.error

    def test_requests_during_a_load_are_served_after(self, models: dict[str, Path]) -> None:
        """A request made while loading is queued, so the newest files are always read."""
        r = self.reloader(models["a"])
        r.request("signal")
        r.request("file_changed")
        first, second = r.wait(30), r.wait(30)
        assert first is not None and first.trigger == "signal"
        # The second request either ran after the first or found it finished.
        assert second is not None and second.trigger == "file_changed"
