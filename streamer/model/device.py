"""Which torch device the model runs on."""

from __future__ import annotations

import torch

from streamer.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    return device
