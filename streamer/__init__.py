"""streamer: streaming anomaly detection for industrial sensor feeds."""

from __future__ import annotations

__version__ = "0.1.0"
