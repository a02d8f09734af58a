"""Export a scoring model to ONNX: raw windows in, reconstruction residuals out.

``streamer train`` writes the graph beside the safetensors weights, so the daemon can
score on the CPU with ONNX Runtime and never import torch (``model.backend``). The
graph is checked against the torch module on sample windows before it is written.

The graph stops at the residuals (scaling, network, reconstruction minus input); the
reductions to channel errors and a score run in numpy (``onnx_model``). ONNX Runtime's
reduction kernels give a window a result that depends on its row in the batch (a
ReduceMean over five channels differs in the last bit by row), which would break the
replay guarantee: a window's score must not depend on what it was batched with.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from streamer.model.networks import ScoringModel

__all__ = ["ONNX_OPSET", "export_onnx"]

# Opset 17 is read by every ONNX Runtime release of the last years and covers every op
# the presets use (LSTM, GRU, Conv, Gemm, reductions).
ONNX_OPSET = 17
# The largest difference allowed between the graph and the module on the check windows,
# relative to the output's largest value (observed: under 1e-6 for every preset).
_CHECK_TOLERANCE = 1e-5
INPUT_NAME = "windows"
OUTPUT_NAMES = ("residuals",)


class _Residuals(torch.nn.Module):
    """The scoring model's residuals ``(batch, steps, channels)``, as the graph's output."""

    def __init__(self, module: ScoringModel) -> None:
        super().__init__()
        self.module = module

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.module.residuals(windows)


def _run_export(module: torch.nn.Module, example: torch.Tensor, target: Path) -> bytes | str:
    """The exported graph's bytes, or why the exporter refused."""
    try:
        with warnings.catch_warnings():
            # The TorchScript-based exporter warns that it is the legacy path; it is the
            # one that needs no extra packages at run time, and its graphs are checked.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(target),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "n"}},
                opset_version=ONNX_OPSET,
            )
        return target.read_bytes()
    except Exception as exc:  # the exporter raises many types; any failure means "no graph"
        return f"export failed: {type(exc).__name__}: {str(exc)[:200]}"


def export_onnx(module: ScoringModel, check_rows: int = 256) -> tuple[bytes | None, str]:
    """The module as ONNX bytes and ``"ok"``, or None and why it cannot be exported.

    The batch axis is dynamic; the window and channels are fixed by the architecture.
    """
    arch = module.arch
    if arch.fft:
        return None, "FFT inputs (torch.fft.rfft) have no ONNX export in this exporter"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    cpu = copy.deepcopy(module).cpu().eval()
    gen = torch.Generator().manual_seed(0)
    shape = (check_rows, arch.window, arch.channels)
    # Raw-unit windows around the scaler's offset, as the daemon will hand them.
    example, check = (torch.randn(shape, generator=gen) * cpu.scale + cpu.offset for _ in "ab")
    with tempfile.TemporaryDirectory() as tmp:
        blob = _run_export(_Residuals(cpu), example, Path(tmp) / "model.onnx")
    if isinstance(blob, str):
        return None, blob
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = [cpu.residuals(check).numpy()]
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: check.numpy()})
    for name, w, g in zip(OUTPUT_NAMES, want, got, strict=True):
        # Relative to the output's scale: a near-zero error may differ by rounding alone.
        rel = float(np.max(np.abs(w - g)) / max(float(np.max(np.abs(w))), 1e-12))
        if not rel <= _CHECK_TOLERANCE:
            return None, f"the exported {name} differs from torch by {rel:.2e} (relative)"
    return blob, "ok"
