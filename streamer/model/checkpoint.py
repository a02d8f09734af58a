"""Checkpoints: safetensors weights plus a JSON sidecar; nothing is ever unpickled.

A checkpoint is a directory::

    model.safetensors   the network weights (safetensors: a JSON header and raw tensors)
    model.json          architecture, channels, window, stride, scaler, training-data
                        hash, calibration scores, version, and the weights' SHA-256

Loading checks the weights' SHA-256 against the sidecar (a tampered or swapped
file is refused) and refuses pickle and ``torch.save`` archives outright:
unpickling a model file runs arbitrary code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamer import __version__
from streamer.errors import CheckpointError, ConfigError
from streamer.model.networks import PRESETS, SCORES, Architecture, ScoringModel
from streamer.model.scaler import Scaler

__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "fit_to_stream",
    "load_checkpoint",
    "save_checkpoint",
    "stream_mismatch",
    "stride_note",
]

FORMAT = "streamer-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A validated model ready for the inference worker."""

    module: ScoringModel
    version: str
    channels: tuple[str, ...]
    window: int
    stride: int
    calibration: NDArray[np.float64]  # held-out window scores for threshold calibration
    sidecar: dict[str, Any]
    path: Path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    digest = _sha256(blob)
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
    # Weights first, sidecar last: a reader that sees the new sidecar sees matching weights.
    for name, payload in (
        (WEIGHTS_FILE, blob),
        (SIDECAR_FILE, json.dumps(sidecar, indent=1).encode()),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, out_dir / name)
    return _build(out_dir, sidecar, state, "cpu")


def _is_safetensors(blob: bytes) -> bool:
    """Safetensors starts with a little-endian u64 header length, then a JSON object."""
    if len(blob) < 10:
        return False
    header_len = int.from_bytes(blob[:8], "little")
    return blob[8:9] == b"{" and 8 + header_len <= len(blob)


def _refuse_pickle(path: Path, blob: bytes) -> None:
    if _is_safetensors(blob):
        return
    if blob[:1] == b"\x80" or blob[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle or torch.save archive; streamer never unpickles model files "
            "because unpickling runs arbitrary code. Retrain with `streamer train` to get a "
            "safetensors checkpoint."
        )


def _require(sidecar: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in sidecar:
        raise CheckpointError(f"{where}: sidecar lacks {key!r}")
    value = sidecar[key]
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{where}: sidecar {key!r} has the wrong type ({type(value).__name__})"
        )
    return value


def stream_mismatch(model: LoadedModel, window: int, channels: Sequence[str]) -> list[str]:
    """How a model differs from the stream it is to score, where it cannot (empty: it fits).

    A window of another length or other channels is input the network cannot take.
    The stride may differ (``stride_note``): it only sets how often a window is cut.
    """
    out = []
    if model.window != window:
        out.append(f"model window {model.window}, stream.window {window}")
    if tuple(model.channels) != tuple(channels):
        out.append(f"model channels {list(model.channels)}, stream.channels {list(channels)}")
    return out


def stride_note(model: LoadedModel, stride: int) -> str | None:
    """Why a stream stride other than the model's is worth a line in the log, or None.

    The model was trained and calibrated on windows of any stride; what changes is
    what a count of windows means: alerts open and close after so many windows, and
    DSPOT's moving mean spans so many, which now cover another stretch of time.
    """
    if model.stride == stride:
        return None
    return (
        f"stream.stride {stride} cuts a window every {stride} samples; the model was "
        f"trained for {model.stride}: alerts.open_after, close_after and a DSPOT depth "
        "count windows, so they now span another stretch of time"
    )


def fit_to_stream(
    model: LoadedModel, window: int, channels: Sequence[str], stride: int
) -> str | None:
    """Refuse a model that cannot score this stream; else ``stride_note``'s line, if any.

    ``run`` and ``score`` both go through here, so they refuse and warn alike.

    Raises:
        ConfigError: naming every difference (the CLI exits 2, as for a bad config).
    """
    mismatch = stream_mismatch(model, window, channels)
    if mismatch:
        raise ConfigError(
            f"model {model.path} does not fit the stream: {'; '.join(mismatch)} (they must match)"
        )
    return stride_note(model, stride)


def load_checkpoint(path: Path | str, device: str = "cpu") -> LoadedModel:
    """Load and validate a checkpoint directory; CheckpointError says what is wrong."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".pkl", ".bin"):
        _refuse_pickle(path, path.read_bytes())
        raise CheckpointError(
            f"{path}: expected a checkpoint directory written by `streamer train`"
        )
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such directory (a checkpoint written by `streamer train`)"
        )
    sidecar_path = path / SIDECAR_FILE
    weights_path = path / WEIGHTS_FILE
    if not sidecar_path.is_file():
        for stray in sorted(path.glob("*.p*")) if path.is_dir() else []:
            _refuse_pickle(stray, stray.read_bytes())
        raise CheckpointError(f"{path}: no {SIDECAR_FILE}; not a streamer checkpoint directory")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sidecar_path}: unreadable sidecar: {exc}") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar_path}: not a streamer model sidecar")
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path}: format_version {sidecar.get('format_version')!r} is not supported "
            f"(this streamer reads {FORMAT_VERSION})"
        )
    try:
        blob = weights_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights_path}: cannot read weights: {exc.strerror}") from exc
    _refuse_pickle(weights_path, blob)
    weights = _require(sidecar, "weights", dict, sidecar_path)
    if weights.get("sha256") != _sha256(blob):
        raise CheckpointError(
            f"{weights_path}: SHA-256 does not match the sidecar; the weights were modified "
            "or belong to another model"
        )
    try:
        state = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_path}: not a valid safetensors file: {exc}") from exc
    return _build(path, sidecar, state, device)


def _load_residual_model(module: ScoringModel, sidecar: dict[str, Any], where: Path) -> None:
    """The ``mahalanobis`` score's fitted residual distribution, checked."""
    c = module.arch.channels
    found = _require(sidecar, "residual_model", dict, where)
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
    channels = _require(sidecar, "channels", list, where)
    window = _require(sidecar, "window", int, where)
    stride = _require(sidecar, "stride", int, where)
    arch_d = _require(sidecar, "architecture", dict, where)
    if not channels or not all(isinstance(c, str) for c in channels):
        raise CheckpointError(f"{where}: channels must be a non-empty list of names")
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
    scaler = Scaler.from_json(_require(sidecar, "scaler", dict, where), len(channels))
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
    calib = np.asarray(sidecar.get("calibration", {}).get("scores", []), dtype=np.float64)
    return LoadedModel(
        module=module,
        version=str(_require(sidecar, "model_version", str, where)),
        channels=tuple(channels),
        window=window,
        stride=stride,
        calibration=calib,
        sidecar=sidecar,
        path=path,
    )
