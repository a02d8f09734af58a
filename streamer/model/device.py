"""Which device the model runs on (kept for the training code's imports)."""

from __future__ import annotations

from streamer.model.backend import resolve_device

__all__ = ["resolve_device"]
