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
is one large convolution instead of one small one per window, and each transposed
convolution as two ordinary ones whose outputs interleave (``_Upsample2``).
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


class _Upsample2(nn.Module):
    """A transposed convolution of kernel 4, stride 2, padding 1, as two convolutions.

    Output 2m is ``x[m-1] w[3] + x[m] w[1]`` and output 2m+1 is ``x[m] w[2] + x[m+1] w[0]``
    (plus the bias): two 2-tap convolutions whose outputs interleave. ONNX Runtime runs a
    convolution in its blocked-channel kernels, a transposed one through a column buffer
    at several times the cost.
    """

    def __init__(self, layer: nn.ConvTranspose1d) -> None:
        super().__init__()
        weight = layer.weight.detach().permute(1, 0, 2)  # (out, in, 4)
        bias = layer.bias
        self.even = nn.Conv2d(layer.in_channels, layer.out_channels, (1, 2), bias=bias is not None)
        self.odd = nn.Conv2d(layer.in_channels, layer.out_channels, (1, 2), bias=bias is not None)
        with torch.no_grad():
            self.even.weight.copy_(weight[:, :, [3, 1]].unsqueeze(2))
            self.odd.weight.copy_(weight[:, :, [2, 0]].unsqueeze(2))
            if bias is not None and self.even.bias is not None and self.odd.bias is not None:
                self.even.bias.copy_(bias)
                self.odd.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, in, rows, L)`` to ``(1, out, rows, 2L)``."""
        even = self.even(functional.pad(x, (1, 0)))
        odd = self.odd(functional.pad(x, (0, 1)))
        both = torch.stack((even, odd), dim=-1)  # (1, out, rows, L, 2)
        return both.flatten(-2)


def _is_upsample2(layer: nn.ConvTranspose1d) -> bool:
    return (
        layer.kernel_size == (4,)
        and layer.stride == (2,)
        and layer.padding == (1,)
        and layer.output_padding == (0,)
        and layer.dilation == (1,)
        and layer.groups == 1
    )


def _as_rows(layer: nn.Module) -> nn.Module:
    """A 1-D convolution as the 2-D one of kernel height 1 with the same weights."""
    if isinstance(layer, nn.ConvTranspose1d) and _is_upsample2(layer):
        return _Upsample2(layer)
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
    """``ConvWindow``'s residuals with the batch's windows as the rows of one image.

    The same arithmetic per window (the 2-D convolutions have kernel height 1), but ONNX
    Runtime then runs each layer as one large convolution over every window of a chunk
    instead of one small one per window. Scaling and the residual are taken in the
    image's layout too, where each channel is one contiguous block (ONNX Runtime's
    broadcast over a last axis of a few channels cost a tenth of the pass). With
    ``_Upsample2`` the default preset scores in half the time (36 -> 18 us a window on
    one core).
    """

    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self, module: ScoringModel, network: ConvWindow) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*map(_as_rows, network.encoder))
        self.decoder = nn.Sequential(*map(_as_rows, network.decoder))
        shape = (1, module.arch.channels, 1, 1)
        self.register_buffer("offset", module.offset.reshape(shape).clone())
        self.register_buffer("scale", module.scale.reshape(shape).clone())

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Residuals ``(batch, steps, channels)`` of raw windows, as ``residuals`` gives."""
        t = windows.shape[1]
        # (1, channels, batch, steps), scaled as ScoringModel.prepare scales.
        image = (windows.permute(2, 0, 1).unsqueeze(0) - self.offset) / self.scale
        out: torch.Tensor = self.decoder(self.encoder(image))
        if out.shape[-1] != t:  # resampled as ConvWindow.forward does, window by window
            rows = functional.interpolate(
                out.squeeze(0).transpose(0, 1), size=t, mode="linear", align_corners=False
            )
            out = rows.transpose(0, 1).unsqueeze(0)
        return (out - image).squeeze(0).permute(1, 2, 0)


class _Residuals(nn.Module):
    """The scoring model's residuals ``(batch, steps, channels)``, as the graph's output."""

    def __init__(self, module: ScoringModel) -> None:
        super().__init__()
        self.module = module

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.module.residuals(windows)


def _graph_module(module: ScoringModel) -> nn.Module:
    """What is exported: the row-image form for the conv preset, else the residuals."""
    network = module.network
    if isinstance(network, ConvWindow) and not module.arch.fft:
        return _RowImage(module, network)
    return _Residuals(module)


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
        blob = _run_export(_graph_module(cpu), example, Path(tmp) / "model.onnx")
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
