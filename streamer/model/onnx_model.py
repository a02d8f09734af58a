"""Scoring with ONNX Runtime on the CPU: a checkpoint's ``model.onnx``, without torch.

The graph gives each window's residuals; ``Scoring`` reduces them to channel errors and
a score in numpy, in one fixed order per window, as ``ScoringModel.forward`` does in torch.

``import onnxruntime`` and a session take a fraction of a second where ``import torch``
takes seconds, and ONNX Runtime's CPU kernels run the presets' graphs faster; torch stays
for training and for CUDA. The graph is the one ``streamer.model.onnx_export`` wrote
and checked against torch; its SHA-256 is checked against the sidecar here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamer.config import InferenceConfig
from streamer.errors import CheckpointError
from streamer.model.artifact import (
    ONNX_FILE,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    calibration_scores,
    checked_fields,
    has_onnx,
    read_sidecar,
    read_verified,
    require,
)
from streamer.model.backend import Segments, pad_to_chunks
from streamer.model.scaler import Scaler

__all__ = ["OnnxNetwork", "OnnxRunner", "Scoring", "load_onnx"]

_INPUT = "windows"
_OUTPUTS = ["residuals"]


@dataclass(frozen=True)
class Scoring:
    """How residuals become channel errors and a score (``ScoringModel.forward``'s steps)."""

    kind: str  # mean | max | mahalanobis
    channel_scale: NDArray[np.float32]
    residual_mean: NDArray[np.float32] | None = None
    precision: NDArray[np.float32] | None = None
    score_scale: float = 1.0

    def __call__(self, diff: NDArray[np.float32]) -> tuple[NDArray[Any], NDArray[Any]]:
        """Scores ``(n,)`` and channel errors ``(n, channels)`` of residuals ``(n, T, C)``.

        Every sum adds whole slices along its axis in a fixed order (``_sum``), so each
        window's additions come in one order and its result does not depend on its row in
        the batch (numpy's own reductions may reorder them, and a BLAS product may too).
        """
        steps = np.float32(diff.shape[1])
        channel_errors = _sum(diff * diff, 1) / steps / self.channel_scale
        if self.kind == "mahalanobis":
            assert self.residual_mean is not None and self.precision is not None
            d = _sum(diff, 1) / steps - self.residual_mean
            dp = _sum(d[:, :, None] * self.precision[None, :, :], 1)  # d @ P, row by row
            score = _sum(dp * d, 1) / np.float32(self.score_scale)
            return score, channel_errors
        if self.kind == "max":
            return np.asarray(channel_errors.max(axis=1)), channel_errors
        return _sum(channel_errors, 1) / np.float32(channel_errors.shape[1]), channel_errors


def _sum(x: NDArray[np.float32], axis: int) -> NDArray[np.float32]:
    """``x`` summed over ``axis`` (1 or more) by halves: slice i of the first half plus
    slice i of the second, until one is left (an odd one out joins the next round).

    Every addition is elementwise, so each window's order of additions is fixed by the
    axis length alone; a few whole-array additions instead of one per slice.
    """
    parts = np.moveaxis(x, axis, 0)
    while parts.shape[0] > 1:
        half = parts.shape[0] // 2
        summed = parts[:half] + parts[half : 2 * half]
        parts = summed if parts.shape[0] % 2 == 0 else np.concatenate((summed, parts[-1:]))
    out: NDArray[np.float32] = np.array(parts[0], dtype=np.float32)
    return out


class OnnxNetwork:
    """An ONNX Runtime session over a checkpoint's graph: raw windows to scores.

    ``threads`` intra-op threads (0: ONNX Runtime's choice). One session serves one
    thread at a time here: the inference worker's.
    """

    def __init__(
        self,
        blob: bytes,
        offset: NDArray[np.float64],
        scale: NDArray[np.float64],
        scoring: Scoring,
        threads: int,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning intra-op threads would take the core the consumer thread needs between
        # passes (the same reason the torch path leaves one core to Python).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are noise
        self._session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        self.offset = offset
        self.scale = scale
        self.scoring = scoring
        self.bytes = len(blob)

    def __call__(self, windows: NDArray[np.float32]) -> tuple[NDArray[Any], NDArray[Any]]:
        """Scores ``(n,)`` and per-channel errors ``(n, channels)`` of ``windows``."""
        (diff,) = self._session.run(_OUTPUTS, {_INPUT: windows})
        return self.scoring(diff)


def _scoring(sidecar: dict[str, Any], channels: int, where: Path) -> Scoring:
    """The sidecar's score kind, channel error scale and residual model, checked."""
    arch = require(sidecar, "architecture", dict, where)
    kind = str(arch.get("score", "mean"))
    scale = np.asarray(sidecar.get("channel_error_scale", [1.0] * channels), dtype=np.float32)
    if kind not in ("mean", "max", "mahalanobis") or scale.shape != (channels,):
        raise CheckpointError(f"{where}: architecture.score or channel_error_scale is malformed")
    if kind != "mahalanobis":
        return Scoring(kind, scale)
    found = require(sidecar, "residual_model", dict, where)
    try:
        mean = np.asarray(found["mean"], dtype=np.float32)
        precision = np.asarray(found["precision"], dtype=np.float32)
        score_scale = float(found["score_scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: residual_model is malformed: {exc!r}") from exc
    if mean.shape != (channels,) or precision.shape != (channels, channels):
        raise CheckpointError(f"{where}: residual_model does not fit {channels} channels")
    return Scoring(kind, scale, mean, precision, score_scale)


def load_onnx(path: Path | str, threads: int = 0) -> LoadedModel:
    """Load and validate a checkpoint's ONNX graph; CheckpointError says what is wrong."""
    path, sidecar = read_sidecar(path)
    where = path / SIDECAR_FILE
    if not has_onnx(sidecar):
        raise CheckpointError(
            f"{path}: the checkpoint has no {ONNX_FILE} (written by `streamer train` for "
            "every preset but FFT inputs); retrain, or set model.backend: torch"
        )
    blob = read_verified(path, sidecar, "onnx", ONNX_FILE)
    # The weights are not read here, but a checkpoint is one unit: tampered weights mean
    # a tampered checkpoint, refused as the torch backend refuses it.
    read_verified(path, sidecar, "weights", WEIGHTS_FILE)
    channels, window, stride = checked_fields(path, sidecar)
    scaler = Scaler.from_json(require(sidecar, "scaler", dict, where), len(channels))
    scoring = _scoring(sidecar, len(channels), where)
    try:
        network = OnnxNetwork(blob, scaler.offset, scaler.scale, scoring, threads)
    except Exception as exc:  # onnxruntime raises its own error types
        raise CheckpointError(f"{path / ONNX_FILE}: not a valid ONNX graph: {exc}") from exc
    return LoadedModel(
        module=network,
        version=str(require(sidecar, "model_version", str, where)),
        channels=channels,
        window=window,
        stride=stride,
        calibration=calibration_scores(sidecar),
        sidecar=sidecar,
        path=path,
        backend="onnxruntime",
    )


class OnnxRunner:
    """Scores windows with a model's ONNX Runtime session, a chunk at a time."""

    backend = "onnxruntime"

    def __init__(self, cfg: InferenceConfig) -> None:
        self._chunk = cfg.chunk

    def prepare(self, model: LoadedModel) -> None:
        """Nothing to move: the session was built for the CPU at load."""
        _network(model)

    def traced(self, model: LoadedModel) -> bool:
        """An ONNX graph is compiled by construction."""
        return True

    def segments(self, model: LoadedModel, windows: NDArray[np.float32]) -> Segments:
        """Scores and channel errors of ``windows``, in order, one chunk at a time.

        Fixed-size chunks, as on the torch path: a window's score does not depend on the
        windows batched with it, and the first chunks are handed back (and published)
        while the rest are computed.
        """
        run = _network(model)
        n = windows.shape[0]
        chunk = self._chunk
        windows = pad_to_chunks(windows, chunk)
        for i in range(0, windows.shape[0], chunk):
            score, errors = run(windows[i : i + chunk])
            k = min(chunk, n - i)
            yield (
                np.asarray(score[:k], dtype=np.float64),
                np.asarray(errors[:k], dtype=np.float64),
            )


def _network(model: LoadedModel) -> OnnxNetwork:
    module = model.module
    if not isinstance(module, OnnxNetwork):
        raise TypeError(f"model {model.version} is a {model.backend} model, not an ONNX one")
    return module
