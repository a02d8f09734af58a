"""Fixtures of the hostile-input suite: a tiny model, daemons killed at the end, and a run
that waits until every window of a stream is published."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import Timeout
from tests.integration.helpers import (
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    train_tiny,
    wait_for_ids,
)


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


W, S = 16, 4  # the tiny model's window and stride


ScoreAll = Callable[..., DaemonProcess]


@pytest.fixture
def score_all(kafka_bootstrap: str, daemons: list[DaemonProcess]) -> ScoreAll:
    """``score_all(cfg, topics, stream)``: a daemon started on ``cfg``, once every window due
    on ``stream`` (or the ``windows`` ids given) is published; fails naming how many are not.
    """

    def run(
        cfg: Path,
        topics: Topics,
        stream: Sequence[Sample],
        *,
        windows: Iterable[str] | None = None,
        timeout_s: float = 120.0,
    ) -> DaemonProcess:
        daemon = DaemonProcess(cfg).start()
        daemons.append(daemon)
        wanted = set(expected_windows(topics.input, stream, W, S) if windows is None else windows)
        seen = wait_for_ids(kafka_bootstrap, topics.scores, wanted, Timeout(timeout_s), daemon)
        assert wanted <= seen, f"{len(wanted - seen)} windows missing\n{daemon.tail()}"
        return daemon

    return run
