"""The ONNX Runtime backend: equal scores to torch, backend choice, no torch at run time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.config import InferenceConfig
from streamer.errors import CheckpointError, ConfigError
from streamer.inference import InferenceWorker
from streamer.model.backend import choose_backend, load_model, usable_cpus, worker_threads
from streamer.model.checkpoint import load_checkpoint, save_checkpoint
from streamer.model.networks import PRESETS, SCORES, Architecture, ScoringModel
from streamer.model.onnx_model import load_onnx
from streamer.model.scaler import Scaler

CHANNELS = ["a", "b", "c"]
WINDOW = 16


def _checkpoint(out: Path, preset: str, score: str = "mean", fft: bool = False) -> Path:
    """A checkpoint of a randomly initialised network, with a non-trivial scaler."""
    torch.manual_seed(1)
    rng = np.random.default_rng(2)
    rows = rng.normal(5.0, 3.0, size=(200, len(CHANNELS)))
    scaler = Scaler.fit(rows, "standard")
    arch = Architecture(preset, WINDOW, len(CHANNELS), 16, 4, fft, score)
    module = ScoringModel(arch, torch.from_numpy(scaler.offset), torch.from_numpy(scaler.scale))
    if score == "mahalanobis":
        module.residual_precision.copy_(
            torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
        )
        module.residual_mean.copy_(torch.tensor([0.1, -0.2, 0.05]))
    module.eval()
    save_checkpoint(out, module, scaler, CHANNELS, 4, {"note": "test"}, rng.random(50))
    return out


def _windows(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(5.0, 3.0, size=(n, WINDOW, len(CHANNELS))).astype(np.float32)


def _scores(model_dir: Path, backend: str, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_model(model_dir, backend, "cpu", 1)
    worker = InferenceWorker(model, InferenceConfig(chunk=32), "cpu").start()
    try:
        result = worker.submit(windows).result(timeout=60)
    finally:
        worker.close()
    return result.scores, result.channel_errors


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("score", SCORES)
def test_backends_agree_on_every_preset(tmp_path: Path, preset: str, score: str) -> None:
    """Scores and channel errors from ONNX Runtime equal torch's to 1e-5 of their scale."""
    model_dir = _checkpoint(tmp_path / "m", preset, score)
    sidecar = json.loads((model_dir / "model.json").read_text())
    assert sidecar["onnx"]["file"] == "model.onnx"
    x = _windows(300)
    torch_s, torch_e = _scores(model_dir, "torch", x)
    onnx_s, onnx_e = _scores(model_dir, "onnxruntime", x)
    for want, got in ((torch_s, onnx_s), (torch_e, onnx_e)):
        scale = float(np.max(np.abs(want)))
        assert scale > 0
        assert float(np.max(np.abs(want - got))) <= 1e-5 * scale


@pytest.mark.parametrize("channels", [3, 5, 8])
@pytest.mark.parametrize("score", SCORES)
def test_an_onnx_score_does_not_depend_on_its_row(
    tmp_path: Path, channels: int, score: str
) -> None:
    """A window scores bit for bit alike at every row of a chunk, whatever its neighbours
    (replays reproduce byte-identical records); ONNX Runtime's own reductions did not."""
    names = [f"c{i}" for i in range(channels)]
    torch.manual_seed(3)
    rng = np.random.default_rng(4)
    scaler = Scaler.fit(rng.normal(5.0, 3.0, size=(200, channels)), "standard")
    arch = Architecture("conv1d", WINDOW, channels, 16, 4, False, score)
    module = ScoringModel(arch, torch.from_numpy(scaler.offset), torch.from_numpy(scaler.scale))
    module.eval()
    save_checkpoint(tmp_path / "m", module, scaler, names, 4, {}, rng.random(50))
    model, _ = load_model(tmp_path / "m", "onnxruntime", "cpu", 1)
    network = model.module
    window = rng.normal(5.0, 3.0, size=(WINDOW, channels)).astype(np.float32)
    seen = set()
    for row in range(64):
        chunk = rng.normal(5.0, 3.0, size=(64, WINDOW, channels)).astype(np.float32)
        chunk[row] = window
        score, errors = network(chunk)  # type: ignore[operator]
        seen.add((float(score[row]), errors[row].tobytes()))
    assert len(seen) == 1


def test_onnx_scores_do_not_depend_on_batching(tmp_path: Path) -> None:
    """A window's ONNX score is bit-identical however the windows around it were batched."""
    model, _ = load_model(_checkpoint(tmp_path / "m", "conv1d"), "onnxruntime", "cpu", 1)
    worker = InferenceWorker(model, InferenceConfig(chunk=32), "cpu").start()
    try:
        x = _windows(200)
        whole = worker.submit(x).result(timeout=60).scores
        parts = [worker.submit(x[i : i + 37]) for i in range(0, 200, 37)]
        pieces = np.concatenate([p.result(timeout=60).scores for p in parts])
    finally:
        worker.close()
    np.testing.assert_array_equal(whole, pieces)


class TestChoice:
    """model.backend: what auto picks, and what an impossible choice says."""

    def test_auto_picks_onnx_on_the_cpu(self, tmp_path: Path) -> None:
        model, why = load_model(_checkpoint(tmp_path / "m", "dense"), "auto", "cpu", 1)
        assert model.backend == "onnxruntime"
        assert "ONNX graph" in why
        assert model.version == load_checkpoint(tmp_path / "m").version

    def test_fft_checkpoint_has_no_graph_and_auto_uses_torch(self, tmp_path: Path) -> None:
        model_dir = _checkpoint(tmp_path / "m", "conv1d", fft=True)
        assert not (model_dir / "model.onnx").exists()
        sidecar = json.loads((model_dir / "model.json").read_text())
        assert "FFT" in sidecar["onnx_unavailable"]
        model, why = load_model(model_dir, "auto", "cpu", 1)
        assert model.backend == "torch"
        assert "FFT" in why
        with pytest.raises(CheckpointError, match=r"no model\.onnx"):
            load_model(model_dir, "onnxruntime", "cpu", 1)

    def test_a_retrained_fft_model_removes_the_old_graph(self, tmp_path: Path) -> None:
        """A graph left from the previous model never scores for the new one."""
        _checkpoint(tmp_path / "m", "dense")
        assert (tmp_path / "m" / "model.onnx").exists()
        _checkpoint(tmp_path / "m", "dense", fft=True)
        assert not (tmp_path / "m" / "model.onnx").exists()

    def test_onnx_on_cuda_is_refused_naming_the_keys(self) -> None:
        with pytest.raises(ConfigError, match=r"model.backend: onnxruntime.*model.device"):
            choose_backend("onnxruntime", "cuda", {"onnx": {}})

    def test_auto_on_cuda_is_torch(self) -> None:
        assert choose_backend("auto", "cuda", {"onnx": {}})[0] == "torch"

    def test_onnx_threads_default_to_every_usable_cpu(self) -> None:
        """0 gives ONNX Runtime every CPU of the process (its threads sleep between
        passes); a set number is kept as it is."""
        assert worker_threads(InferenceConfig()) == usable_cpus()
        assert worker_threads(InferenceConfig(threads=3)) == 3

    def test_tampered_graph_is_refused(self, tmp_path: Path) -> None:
        model_dir = _checkpoint(tmp_path / "m", "dense")
        blob = bytearray((model_dir / "model.onnx").read_bytes())
        blob[-10] ^= 0xFF
        (model_dir / "model.onnx").write_bytes(bytes(blob))
        with pytest.raises(CheckpointError, match="SHA-256 does not match"):
            load_onnx(model_dir)
        # torch still loads: its weights are intact.
        assert load_model(model_dir, "torch", "cpu", 1)[0].backend == "torch"


def test_the_onnx_path_never_imports_torch(tmp_path: Path) -> None:
    """Loading, the worker and the engine's imports on the ONNX path leave torch unloaded."""
    model_dir = _checkpoint(tmp_path / "m", "conv1d")
    code = f"""
import sys
import numpy as np
import streamer.daemon
from streamer.config import InferenceConfig
from streamer.inference import InferenceWorker
from streamer.model.backend import load_model, resolve_device
model, why = load_model({str(model_dir)!r}, "auto", resolve_device("cpu"), 1)
worker = InferenceWorker(model, InferenceConfig(chunk=8), "cpu").start()
out = worker.submit(np.ones((5, {WINDOW}, {len(CHANNELS)}), dtype=np.float32)).result(60)
worker.close()
print(model.backend, out.scores.shape[0], "torch" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["onnxruntime", "5", "False"], done.stderr


@pytest.mark.parametrize("window", [16, 30])
def test_the_conv_graph_runs_a_chunk_as_one_image(tmp_path: Path, window: int) -> None:
    """conv1d is exported as 2-D convolutions of kernel height 1 over all of a chunk's
    windows at once (ONNX Runtime's fast path; no transposed convolution), with torch's
    scores to 1e-5 of their scale, also when the reconstruction is resampled to a window
    the strides do not divide."""
    import onnx

    torch.manual_seed(5)
    rng = np.random.default_rng(6)
    scaler = Scaler.fit(rng.normal(5.0, 3.0, size=(200, len(CHANNELS))), "standard")
    arch = Architecture("conv1d", window, len(CHANNELS), 16, 4, False, "mean")
    module = ScoringModel(arch, torch.from_numpy(scaler.offset), torch.from_numpy(scaler.scale))
    module.eval()
    save_checkpoint(tmp_path / "m", module, scaler, CHANNELS, 4, {}, rng.random(50))
    graph = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    kernels = [
        list(a.ints)
        for n in graph.node
        if n.op_type in ("Conv", "ConvTranspose")
        for a in n.attribute
        if a.name == "kernel_shape"
    ]
    # Four convolutions, and each transposed one as two 2-tap convolutions.
    assert len(kernels) == 8 and all(len(k) == 2 and k[0] == 1 for k in kernels), kernels
    assert not [n for n in graph.node if n.op_type == "ConvTranspose"]
    x = rng.normal(5.0, 3.0, size=(100, window, len(CHANNELS))).astype(np.float32)
    with torch.inference_mode():
        want_s, want_e = (t.numpy() for t in module(torch.from_numpy(x)))
    model, _ = load_model(tmp_path / "m", "onnxruntime", "cpu", 1)
    got_s, got_e = model.module(x)  # type: ignore[operator]
    for want, got in ((want_s, got_s), (want_e, got_e)):
        assert float(np.max(np.abs(want - got))) <= 1e-5 * float(np.max(np.abs(want)))
    alone = np.concatenate([model.module(x[i : i + 1])[0] for i in range(5)])  # type: ignore[operator]
    np.testing.assert_array_equal(alone, got_s[:5])
