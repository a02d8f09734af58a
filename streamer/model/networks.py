"""Autoencoder presets and the scoring wrapper that turns raw windows into errors.

Every network maps ``(batch, time, channels)`` to a reconstruction of the same
shape. ``ScoringModel`` wraps one with the fitted scaler and the optional FFT
transform, so the inference worker hands it raw windows and gets back the window
score and the per-channel errors, all computed on the model's device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from numpy.typing import NDArray
from torch import Tensor, nn

from streamer.errors import ConfigError

__all__ = [
    "PRESETS",
    "SCORES",
    "Architecture",
    "ScoringModel",
    "build_network",
    "fit_residual_model",
]

PRESETS = ("seed-dense", "dense", "conv1d", "lstm", "gru", "cnn-lstm")
SCORES = ("mean", "max", "mahalanobis")


@dataclass(frozen=True, slots=True)
class Architecture:
    """Everything needed to rebuild a network before loading its weights."""

    preset: str
    window: int
    channels: int
    hidden: int
    latent: int
    fft: bool
    score: str = "mean"

    @property
    def steps(self) -> int:
        """Time steps the network sees: the window, or its rFFT bin count."""
        return self.window // 2 + 1 if self.fft else self.window


class SeedDense(nn.Module):
    """The per-sample dense autoencoder of the original write-up.

    Widths 64-128-256-256-128-64 around the channel count, ReLU, applied to each
    time step on its own: it sees no temporal context.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        widths = [channels, 64, 128, 256, 256, 128, 64]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], channels))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct each sample."""
        out: Tensor = self.net(x)
        return out


class DenseWindow(nn.Module):
    """Dense autoencoder over the flattened window."""

    def __init__(self, steps: int, channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        flat = steps * channels
        width = max(hidden * 4, latent * 2)
        self.encoder = nn.Sequential(
            nn.Linear(flat, width), nn.ReLU(), nn.Linear(width, latent), nn.ReLU()
        )
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, flat))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct the whole window at once."""
        b, t, c = x.shape
        out: Tensor = self.decoder(self.encoder(x.reshape(b, t * c)))
        return out.reshape(b, t, c)


class ConvWindow(nn.Module):
    """1-D convolutional encoder-decoder (two stride-2 stages)."""

    def __init__(self, channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(channels, hidden, 7, padding=3),
            nn.ReLU(),
            nn.Conv1d(hidden, hidden, 7, stride=2, padding=3),
            nn.ReLU(),
            nn.Conv1d(hidden, latent, 7, stride=2, padding=3),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(latent, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(hidden, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(hidden, channels, 7, padding=3),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct; resampled to the input length when the strides do not divide it."""
        t = x.shape[1]
        out: Tensor = self.decoder(self.encoder(x.transpose(1, 2)))
        if out.shape[-1] != t:
            out = F.interpolate(out, size=t, mode="linear", align_corners=False)
        return out.transpose(1, 2)


class RecurrentWindow(nn.Module):
    """LSTM or GRU encoder-decoder: the final encoder state, repeated, seeds the decoder.

    With ``conv=True`` the encoder is convolutional (the ``cnn-lstm`` preset).
    """

    def __init__(self, channels: int, hidden: int, latent: int, cell: str, conv: bool) -> None:
        super().__init__()
        rnn: type[nn.LSTM] | type[nn.GRU] = nn.LSTM if cell == "lstm" else nn.GRU
        self.conv = conv
        if conv:
            self.encoder: nn.Module = nn.Sequential(
                nn.Conv1d(channels, hidden, 5, padding=2),
                nn.ReLU(),
                nn.Conv1d(hidden, hidden, 5, stride=2, padding=2),
                nn.ReLU(),
            )
        else:
            self.encoder = rnn(channels, hidden, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.from_latent = nn.Linear(latent, hidden)
        self.decoder = rnn(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Encode to one latent vector, then decode the whole sequence from it."""
        t = x.shape[1]
        if self.conv:
            summary = self.encoder(x.transpose(1, 2)).mean(dim=-1)
        else:
            seq, _ = self.encoder(x)
            summary = seq[:, -1]
        z = torch.relu(self.from_latent(torch.relu(self.to_latent(summary))))
        dec, _ = self.decoder(z.unsqueeze(1).expand(-1, t, -1).contiguous())
        out: Tensor = self.head(dec)
        return out


def build_network(arch: Architecture) -> nn.Module:
    """The untrained network for ``arch``; ConfigError for an unknown preset."""
    c, h, z, t = arch.channels, arch.hidden, arch.latent, arch.steps
    if arch.preset == "seed-dense":
        return SeedDense(c)
    if arch.preset == "dense":
        return DenseWindow(t, c, h, z)
    if arch.preset == "conv1d":
        return ConvWindow(c, h, z)
    if arch.preset in ("lstm", "gru"):
        return RecurrentWindow(c, h, z, arch.preset, conv=False)
    if arch.preset == "cnn-lstm":
        return RecurrentWindow(c, h, z, "lstm", conv=True)
    raise ConfigError(f"unknown model preset {arch.preset!r}; choose one of {', '.join(PRESETS)}")


class ScoringModel(nn.Module):
    """Scaler + optional FFT + network + error reduction, as one module.

    ``forward`` takes raw windows ``(batch, window, channels)`` and returns
    ``(score, channel_errors)``: the mean squared reconstruction error per channel
    (in scaled units, divided by ``channel_scale``) and the window score, by
    ``arch.score``:

    * ``mean`` or ``max``: of the channel errors;
    * ``mahalanobis``: the squared Mahalanobis distance of the window's mean residual
      per channel (reconstruction minus input, signed, averaged over the window) from
      its distribution on normal windows (``residual_mean``, ``residual_precision``),
      divided by ``score_scale`` (its 99th percentile on normal windows). A shift too
      small to stand out in any one channel counts when channels that move together in
      normal operation part ways, and a channel that is noisy in normal operation
      weighs as little as its noise; see ``fit_residual_model``.
    """

    offset: Tensor
    scale: Tensor
    channel_scale: Tensor
    residual_mean: Tensor
    residual_precision: Tensor
    score_scale: Tensor

    def __init__(self, arch: Architecture, offset: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.arch = arch
        self.network = build_network(arch)
        # Not persistent: the sidecar JSON is the one source of truth for the scaler.
        self.register_buffer("offset", offset.to(torch.float32), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)
        self.register_buffer("channel_scale", torch.ones(arch.channels), persistent=False)
        c = arch.channels
        self.register_buffer("residual_mean", torch.zeros(c), persistent=False)
        self.register_buffer("residual_precision", torch.eye(c), persistent=False)
        self.register_buffer("score_scale", torch.ones(()), persistent=False)

    def prepare(self, windows: Tensor) -> Tensor:
        """Scale, then take the rFFT magnitude over time when the model uses FFT inputs."""
        x = (windows - self.offset) / self.scale
        if self.arch.fft:
            # Normalised by the window length so magnitudes stay O(1) for any W.
            x = torch.fft.rfft(x.float(), dim=1, norm="forward").abs()
        return x

    def reconstruct(self, x: Tensor) -> Tensor:
        """Run the network on prepared inputs."""
        out: Tensor = self.network(x)
        return out

    def residuals(self, windows: Tensor) -> Tensor:
        """Reconstruction minus prepared input, ``(batch, steps, channels)``."""
        x = self.prepare(windows)
        return self.reconstruct(x).float() - x.float()

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """Window scores and per-channel errors for raw windows."""
        diff = self.residuals(windows)
        channel_errors = diff.pow(2).mean(dim=1) / self.channel_scale
        if self.arch.score == "mahalanobis":
            d = diff.mean(dim=1) - self.residual_mean
            score = ((d @ self.residual_precision) * d).sum(dim=1) / self.score_scale
            return score, channel_errors
        if self.arch.score == "max":
            return channel_errors.amax(dim=1), channel_errors
        return channel_errors.mean(dim=1), channel_errors


# Shrinkage of the residual covariance towards its diagonal: with a few hundred normal
# windows, eight channels' covariance is estimated well enough, but a channel constant in
# training makes it singular. SKAB out of fold: 0, 0.1 and 0.5 scored within 0.006 F1.
RESIDUAL_SHRINKAGE = 0.1
# The Mahalanobis score is divided by this quantile of its values on normal windows.
SCORE_SCALE_QUANTILE = 0.99


def fit_residual_model(module: ScoringModel, mean_residuals: NDArray[np.floating]) -> None:
    """Fit the ``mahalanobis`` score's residual distribution on normal windows.

    ``mean_residuals``: ``(windows, channels)``, each normal window's mean residual per
    channel. Sets ``residual_mean``, ``residual_precision`` (the inverse of the
    covariance shrunk towards its diagonal) and ``score_scale``.
    """
    r = np.asarray(mean_residuals, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2:
        raise ValueError(f"need at least 2 windows of mean residuals, got shape {r.shape}")
    mu = r.mean(axis=0)
    cov = np.atleast_2d(np.cov(r, rowvar=False))
    diag = np.diag(np.diag(cov))
    cov = (1 - RESIDUAL_SHRINKAGE) * cov + RESIDUAL_SHRINKAGE * diag
    # A channel without any residual variance must not make the matrix singular.
    cov += np.eye(len(mu)) * max(1e-12, 1e-9 * float(np.trace(cov)))
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2  # exactly symmetric, whatever inv rounded
    d = r - mu
    d2 = np.einsum("ij,jk,ik->i", d, precision, d)
    scale = max(float(np.quantile(d2, SCORE_SCALE_QUANTILE)), 1e-12)
    target = module.residual_mean
    module.residual_mean.copy_(torch.from_numpy(mu).to(target))
    module.residual_precision.copy_(torch.from_numpy(precision).to(target))
    module.score_scale.copy_(torch.tensor(scale).to(target))
