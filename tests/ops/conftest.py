"""Fixtures of the operations tests: tiny models shared by every test in tests/ops."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import train_tiny


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two compatible tiny models (a, b: window 16, stride 4) and one with window 8 (w8)."""
    root = tmp_path_factory.mktemp("ops-models")
    return {
        "a": train_tiny(root / "a"),
        "b": train_tiny(root / "b", epochs=4),
        "w8": train_tiny(root / "w8", window=8),
    }
