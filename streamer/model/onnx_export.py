"""Export a scoring model to ONNX: raw windows in, reconstruction residuals out.

``streamer train`` writes the graph beside the safetensors weights, so the daemon can
score on the CPU with ONNX Runtime and never import torch (``model.backend``). The
graph is checked against the torch module on sample windows before it is written.

The graph stops at the residuals (scaling, network, reconstruction minus input); the
reductions to channel errors and a score run in numpy (``onnx_model``). ONNX Runtime's
reduction kernels give a window a result that depends on its row in the batch (a
ReduceMean over five channels differs in the last bit by row), which would break the
replay guarantee: a window's score must not depend on what it was batched with.

The conv1d preset is exported with a chunk's windows as the rows of one image
(``_RowImage``): the same weights as 2-D convolutions of kernel height 1, so each layer
is one large convolution instead of one small one per window.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from streamer.model.networks import ConvWindow, ScoringModel

__all__ = ["ONNX_OPSET", "export_onnx"]

# Opset 17 is read by every ONNX Runtime release of the last years and covers every op
# the presets use (LSTM, GRU, Conv, Gemm, reductions).
ONNX_OPSET = 17
# The largest difference allowed between the graph and the module on the check windows,
# relative to the output's largest value (observed: under 1e-6 for every preset).
_CHECK_TOLERANCE = 1e-5
INPUT_NAME = "windows"
OUTPUT_NAMES = ("residuals",)


def _as_rows(layer: nn.Module) -> nn.Module:
    """A 1-D convolution as the 2-D one of kernel height 1 with the same weights."""
    if isinstance(layer, nn.Conv1d | nn.ConvTranspose1d):
        kind = nn.Conv2d if isinstance(layer, nn.Conv1d) else nn.ConvTranspose2d
        flat = kind(
            layer.in_channels,
            layer.out_channels,
            (1, layer.kernel_size[0]),
            stride=(1, layer.stride[0]),
            padding=(0, _first(layer.padding)),
            bias=layer.bias is not None,
        )
        with torch.no_grad():
            flat.weight.copy_(layer.weight.unsqueeze(2))
            if layer.bias is not None and flat.bias is not None:
                flat.bias.copy_(layer.bias)
        return flat
    return copy.deepcopy(layer)


def _first(padding: object) -> int:
    assert isinstance(padding, tuple) and isinstance(padding[0], int), padding
    return padding[0]


class _RowImage(nn.Module):
    """``ConvWindow`` with the batch's windows as the rows of one image (kernel height 1).

    The same arithmetic per window, but ONNX Runtime then runs each layer as one large
    convolution over every window of a chunk instead of one small one per window: the
    default preset scores in about half the time (36 -> 23 us a window on one core).
    """

    def __init__(self, network: ConvWindow) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*map(_as_rows, network.encoder))
        self.decoder = nn.Sequential(*map(_as_rows, network.decoder))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(batch, steps, channels)`` as ``ConvWindow.forward`` does."""
        t = x.shape[1]
        image = x.permute(2, 0, 1).unsqueeze(0)  # (1, channels, batch, steps)
        out: torch.Tensor = self.decoder(self.encoder(image)).squeeze(0).transpose(0, 1)
        if out.shape[-1] != t:
            out = functional.interpolate(out, size=t, mode="linear", align_corners=False)
        return out.transpose(1, 2)


class _Residuals(nn.Module):
    """The scoring model's residuals ``(batch, steps, channels)``, as the graph's output."""

    def __init__(self, module: ScoringModel) -> None:
        super().__init__()
        self.module = module
        network = module.network
        self.network = _RowImage(network) if isinstance(network, ConvWindow) else network

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = self.module.prepare(windows)
        out: torch.Tensor = self.network(x)
        return out.float() - x.float()


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
