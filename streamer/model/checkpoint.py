"""Checkpoints with torch: write weights, ONNX graph and sidecar; load the torch module.

The directory's layout and the checks every backend shares live in
``streamer.model.artifact`` (no torch); this module builds and loads the torch side.
Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamer import __version__
from streamer.errors import CheckpointError
from streamer.model.artifact import (
    FORMAT,
    FORMAT_VERSION,
    ONNX_FILE,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    calibration_scores,
    checked_fields,
    fit_to_stream,
    read_sidecar,
    read_verified,
    require,
    sha256,
    stream_mismatch,
    stride_note,
)
from streamer.model.networks import PRESETS, SCORES, Architecture, ScoringModel
from streamer.model.onnx_export import ONNX_OPSET, export_onnx
from streamer.model.scaler import Scaler

__all__ = [
    "FORMAT_VERSION",
    "SIDECAR_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "fit_to_stream",
    "load_checkpoint",
    "save_checkpoint",
    "stream_mismatch",
    "stride_note",
    "torch_module",
]

log = structlog.get_logger(__name__)


def torch_module(model: LoadedModel) -> ScoringModel:
    """The torch module of a model loaded for the torch backend (TypeError otherwise)."""
    module = model.module
    if not isinstance(module, ScoringModel):
        raise TypeError(f"model {model.version} is loaded for {model.backend}, not torch")
    return module


def save_checkpoint(
    out_dir: Path,
    module: ScoringModel,
    scaler: Scaler,
    channels: list[str],
    stride: int,
    training: dict[str, Any],
    calibration: NDArray[np.floating],
) -> LoadedModel:
    """Write weights and sidecar atomically (temp files renamed into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.network.state_dict().items()}
    blob = st_save(state)
    digest = sha256(blob)
    arch = module.arch
    calib = np.asarray(calibration, dtype=np.float64)
    qs = [0.5, 0.9, 0.95, 0.99, 0.999]
    sidecar: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "streamer_version": __version__,
        "model_version": f"{arch.preset}-{digest[:12]}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": {
            "preset": arch.preset,
            "hidden": arch.hidden,
            "latent": arch.latent,
            "fft": arch.fft,
            "score": arch.score,
        },
        "channel_error_scale": module.channel_scale.detach().cpu().double().tolist(),
        **(
            {
                "residual_model": {
                    "mean": module.residual_mean.detach().cpu().double().tolist(),
                    "precision": module.residual_precision.detach().cpu().double().tolist(),
                    "score_scale": float(module.score_scale),
                }
            }
            if arch.score == "mahalanobis"
            else {}
        ),
        "channels": list(channels),
        "window": arch.window,
        "stride": stride,
        "scaler": scaler.to_json(),
        "training": training,
        "calibration": {
            "quantiles": {str(q): float(np.quantile(calib, q)) for q in qs} if calib.size else {},
            "scores": calib.tolist(),
        },
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": len(blob)},
    }
    files = [(WEIGHTS_FILE, blob)]
    graph, why = export_onnx(module)
    if graph is not None:
        sidecar["onnx"] = {
            "file": ONNX_FILE,
            "sha256": sha256(graph),
            "bytes": len(graph),
            "opset": ONNX_OPSET,
        }
        files.append((ONNX_FILE, graph))
    else:
        # The daemon then scores with torch; the reason is kept for `model_backend`.
        sidecar["onnx_unavailable"] = why
        (out_dir / ONNX_FILE).unlink(missing_ok=True)  # a previous model's graph
        log.info("onnx_export_skipped", preset=arch.preset, why=why)
    files.append((SIDECAR_FILE, json.dumps(sidecar, indent=1).encode()))
    # Weights and graph first, sidecar last: a reader that sees the new sidecar sees the
    # files it describes.
    for name, payload in files:
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, out_dir / name)
    return _build(out_dir, sidecar, state, "cpu")


def load_checkpoint(path: Path | str, device: str = "cpu") -> LoadedModel:
    """Load and validate a checkpoint directory as a torch module; CheckpointError says why."""
    path, sidecar = read_sidecar(path)
    blob = read_verified(path, sidecar, "weights", WEIGHTS_FILE)
    try:
        state = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path / WEIGHTS_FILE}: not a valid safetensors file: {exc}"
        ) from exc
    return _build(path, sidecar, state, device)


def _load_residual_model(module: ScoringModel, sidecar: dict[str, Any], where: Path) -> None:
    """The ``mahalanobis`` score's fitted residual distribution, checked."""
    c = module.arch.channels
    found = require(sidecar, "residual_model", dict, where)
    try:
        mean = np.asarray(found["mean"], dtype=np.float64)
        precision = np.asarray(found["precision"], dtype=np.float64)
        scale = float(found["score_scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: residual_model is malformed: {exc!r}") from exc
    if mean.shape != (c,) or precision.shape != (c, c):
        raise CheckpointError(
            f"{where}: residual_model must hold a mean of {c} values and a {c}x{c} precision, "
            f"got {mean.shape} and {precision.shape}"
        )
    finite = np.isfinite(mean).all() and np.isfinite(precision).all() and math.isfinite(scale)
    if not finite or scale <= 0:
        raise CheckpointError(f"{where}: residual_model holds a non-finite or non-positive value")
    module.residual_mean.copy_(torch.from_numpy(mean).float())
    module.residual_precision.copy_(torch.from_numpy(precision).float())
    module.score_scale.copy_(torch.tensor(scale).float())


def _build(
    path: Path, sidecar: dict[str, Any], state: dict[str, torch.Tensor], device: str
) -> LoadedModel:
    where = path / SIDECAR_FILE
    channels, window, stride = checked_fields(path, sidecar)
    arch_d = require(sidecar, "architecture", dict, where)
    if arch_d.get("preset") not in PRESETS:
        raise CheckpointError(f"{where}: unknown preset {arch_d.get('preset')!r}")
    try:
        arch = Architecture(
            preset=arch_d["preset"],
            window=window,
            channels=len(channels),
            hidden=int(arch_d["hidden"]),
            latent=int(arch_d["latent"]),
            fft=bool(arch_d["fft"]),
            score=str(arch_d.get("score", "mean")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: architecture is malformed: {exc!r}") from exc
    if arch.score not in SCORES:
        raise CheckpointError(
            f"{where}: architecture.score must be one of {', '.join(SCORES)}, got {arch.score!r}"
        )
    scaler = Scaler.from_json(require(sidecar, "scaler", dict, where), len(channels))
    module = ScoringModel(arch, torch.from_numpy(scaler.offset), torch.from_numpy(scaler.scale))
    channel_scale = np.asarray(
        sidecar.get("channel_error_scale", [1.0] * len(channels)), dtype=np.float64
    )
    if channel_scale.shape != (len(channels),) or not np.all(channel_scale > 0):
        raise CheckpointError(
            f"{where}: channel_error_scale must hold {len(channels)} positive values"
        )
    module.channel_scale.copy_(torch.from_numpy(channel_scale).float())
    if arch.score == "mahalanobis":
        _load_residual_model(module, sidecar, where)
    try:
        module.network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit the architecture: {exc}") from exc
    module.eval()
    module.to(device)
    return LoadedModel(
        module=module,
        version=str(require(sidecar, "model_version", str, where)),
        channels=tuple(channels),
        window=window,
        stride=stride,
        calibration=calibration_scores(sidecar),
        sidecar=sidecar,
        path=path,
    )
