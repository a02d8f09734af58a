"""Fixtures of the hostile-input suite: a tiny model, and daemons killed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import DaemonProcess, train_tiny


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conv1d model (window 16, stride 4) trained on simulated normal data."""
    return train_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemon processes started by a test; any still running at the end are killed."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.__exit__()
