"""A checkpoint directory as files, without torch: the sidecar, checked blobs, the model.

A checkpoint is a directory::

    model.safetensors   the network weights (safetensors: a JSON header and raw tensors)
    model.onnx          the same network and its scoring as an ONNX graph (optional:
                        written by ``streamer train`` for every preset ONNX can express)
    model.json          architecture, channels, window, stride, scaler, training-data
                        hash, calibration scores, version, and each file's SHA-256

This module reads and checks what every backend shares (the sidecar, a file against
its SHA-256, pickle refused outright: unpickling a model file runs arbitrary code) and
holds :class:`LoadedModel`. It imports neither torch nor onnxruntime, so the daemon can
choose a backend before paying for one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from streamer.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from streamer.model.networks import ScoringModel
    from streamer.model.onnx_model import OnnxNetwork

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ONNX_FILE",
    "SIDECAR_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "fit_to_stream",
    "has_onnx",
    "read_sidecar",
    "read_verified",
    "require",
    "require_fit",
    "sha256",
    "shape_mismatch",
    "stream_mismatch",
    "stride_note",
]

FORMAT = "streamer-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
SIDECAR_FILE = "model.json"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A validated model ready for the inference worker.

    ``module`` is the backend's network: a torch ``ScoringModel`` (backend ``torch``) or
    an ``OnnxNetwork`` (backend ``onnxruntime``). Both take raw windows and give window
    scores and per-channel errors; ``offset`` and ``scale`` are the scaler's, in raw units.
    """

    module: ScoringModel | OnnxNetwork
    version: str
    channels: tuple[str, ...]
    window: int
    stride: int
    calibration: NDArray[np.float64]  # held-out window scores for threshold calibration
    sidecar: dict[str, Any]
    path: Path
    backend: str = "torch"

    def scaler(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The scaler's offset and scale per channel, in raw units."""
        offset: Any = self.module.offset
        scale: Any = self.module.scale
        if not isinstance(offset, np.ndarray):  # torch tensors, perhaps on the GPU
            offset, scale = offset.detach().cpu().numpy(), scale.detach().cpu().numpy()
        return np.asarray(offset, dtype=np.float64), np.asarray(scale, dtype=np.float64)


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _is_safetensors(blob: bytes) -> bool:
    """Safetensors starts with a little-endian u64 header length, then a JSON object."""
    if len(blob) < 10:
        return False
    header_len = int.from_bytes(blob[:8], "little")
    return blob[8:9] == b"{" and 8 + header_len <= len(blob)


def refuse_pickle(path: Path, blob: bytes) -> None:
    """CheckpointError when ``blob`` is a pickle or a torch.save archive."""
    if _is_safetensors(blob):
        return
    if blob[:1] == b"\x80" or blob[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle or torch.save archive; streamer never unpickles model files "
            "because unpickling runs arbitrary code. Retrain with `streamer train` to get a "
            "safetensors checkpoint."
        )


def require(sidecar: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    """``sidecar[key]``, or CheckpointError when it is missing or not a ``kind``."""
    if key not in sidecar:
        raise CheckpointError(f"{where}: sidecar lacks {key!r}")
    value = sidecar[key]
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{where}: sidecar {key!r} has the wrong type ({type(value).__name__})"
        )
    return value


def read_sidecar(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory and its parsed, format-checked sidecar."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".pkl", ".bin"):
        refuse_pickle(path, path.read_bytes())
        raise CheckpointError(
            f"{path}: expected a checkpoint directory written by `streamer train`"
        )
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such directory (a checkpoint written by `streamer train`)"
        )
    sidecar_path = path / SIDECAR_FILE
    if not sidecar_path.is_file():
        for stray in sorted(path.glob("*.p*")) if path.is_dir() else []:
            refuse_pickle(stray, stray.read_bytes())
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
    return path, sidecar


def read_verified(path: Path, sidecar: dict[str, Any], entry: str, name: str) -> bytes:
    """The bytes of the file ``sidecar[entry]`` describes, checked against its SHA-256.

    A tampered file, or one that belongs to another model, is refused.
    """
    where = path / SIDECAR_FILE
    described = require(sidecar, entry, dict, where)
    file_path = path / str(described.get("file", name))
    if file_path.name != name:
        raise CheckpointError(f"{where}: {entry}.file must be {name!r}")
    try:
        blob = file_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file_path}: cannot read {entry}: {exc.strerror}") from exc
    refuse_pickle(file_path, blob)
    if described.get("sha256") != sha256(blob):
        raise CheckpointError(
            f"{file_path}: SHA-256 does not match the sidecar; the file was modified "
            "or belongs to another model"
        )
    return blob


def checked_fields(path: Path, sidecar: dict[str, Any]) -> tuple[tuple[str, ...], int, int]:
    """The sidecar's channels, window and stride, checked."""
    where = path / SIDECAR_FILE
    channels = require(sidecar, "channels", list, where)
    window = require(sidecar, "window", int, where)
    stride = require(sidecar, "stride", int, where)
    if not channels or not all(isinstance(c, str) for c in channels):
        raise CheckpointError(f"{where}: channels must be a non-empty list of names")
    return tuple(channels), window, stride


def calibration_scores(sidecar: dict[str, Any]) -> NDArray[np.float64]:
    """The held-out window scores the thresholds calibrate on (empty when absent)."""
    return np.asarray(sidecar.get("calibration", {}).get("scores", []), dtype=np.float64)


def stream_mismatch(model: LoadedModel, window: int, channels: Sequence[str]) -> list[str]:
    """How a model differs from the stream it is to score, where it cannot (empty: it fits).

    A window of another length or other channels is input the network cannot take.
    The stride may differ (``stride_note``): it only sets how often a window is cut.
    """
    return shape_mismatch(model.window, model.channels, window, channels)


def shape_mismatch(
    model_window: int, model_channels: Sequence[str], window: int, channels: Sequence[str]
) -> list[str]:
    """``stream_mismatch`` from the model's window and channels alone (its sidecar's)."""
    out = []
    if model_window != window:
        out.append(f"model window {model_window}, stream.window {window}")
    if tuple(model_channels) != tuple(channels):
        out.append(f"model channels {list(model_channels)}, stream.channels {list(channels)}")
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
    require_fit(model.path, model.window, model.channels, window, channels)
    return stride_note(model, stride)


def require_fit(
    path: object,
    model_window: int,
    model_channels: Sequence[str],
    window: int,
    channels: Sequence[str],
) -> None:
    """ConfigError naming every difference between the model's shape and the stream's."""
    mismatch = shape_mismatch(model_window, model_channels, window, channels)
    if mismatch:
        raise ConfigError(
            f"model {path} does not fit the stream: {'; '.join(mismatch)} (they must match)"
        )


def has_onnx(sidecar: dict[str, Any]) -> bool:
    """Whether the checkpoint carries an ONNX graph."""
    return isinstance(sidecar.get("onnx"), dict)
