"""Fixtures of the hostile-input suite: a tiny model, daemons killed at the end, and a run
that waits until every window of a stream is published."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from tests.helpers import Timeout
from tests.integration.helpers import (
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    wait_for_ids,
)

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
