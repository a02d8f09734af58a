"""Process housekeeping of the daemon: the heap settle, and the log level."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import structlog

from streamer.errors import ConfigError
from streamer.runtime.heap import SensorGrowth, settle_heap
from streamer.runtime.logs import configure_logging


class _Node:
    """A gc-tracked object that can hold a reference cycle to itself."""

    def __init__(self) -> None:
        self.me: _Node | None = None
        self.payload = [object() for _ in range(10)]


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def _cycle() -> tuple[weakref.ref[_Node], list[_Node]]:
    node = _Node()
    node.me = node
    return weakref.ref(node), [node]


def _walked(cls: type) -> int:
    """How many instances of ``cls`` a full collection would walk."""
    return sum(type(o) is cls for o in gc.get_objects())


def test_full_collections_skip_what_was_settled() -> None:
    keep = [_Node() for _ in range(1_000)]
    assert _walked(_Node) == len(keep)
    settle_heap("test")
    assert gc.get_freeze_count() >= len(keep)
    assert _walked(_Node) == 0
    fresh = _Node()
    assert _walked(_Node) == 1  # objects made after the settle are still collected as usual
    del fresh


def test_a_frozen_cycle_dropped_later_is_collected_at_the_next_settle() -> None:
    ref, holder = _cycle()
    settle_heap("test")
    holder.clear()
    gc.collect()
    assert ref() is not None  # frozen: a plain collection does not look at it
    settle_heap("test")
    assert ref() is None


def test_garbage_at_settle_time_is_collected_not_frozen() -> None:
    ref, holder = _cycle()
    holder.clear()
    settle_heap("test")
    assert ref() is None


def test_a_settle_without_rethaw_freezes_the_new_and_leaves_the_frozen() -> None:
    """Growth settles walk only what was made since the last settle."""
    ref, holder = _cycle()
    settle_heap("test")
    holder.clear()
    fresh = [_Node() for _ in range(100)]
    settle_heap("test", rethaw=False)
    assert _walked(_Node) == 0  # the new nodes are frozen too
    assert ref() is not None  # the earlier frozen cycle was not re-examined
    settle_heap("test")
    assert ref() is None
    del fresh


def test_sensor_growth_settles_at_the_minimum_then_each_doubling() -> None:
    growth = SensorGrowth(minimum=1000)
    settles = []
    for sensors in range(0, 100_001, 50):
        if growth.due(sensors):
            settles.append(sensors)
            growth.settled = sensors
    assert settles == [1000, 2000, 4000, 8000, 16000, 32000, 64000]
    growth.settled = 100_000
    assert not growth.due(150_000)
    assert growth.due(200_000)


class TestLogLevel:
    """``STREAMER_LOG_LEVEL`` picks the daemon's log level; a bad one stops start-up."""

    @pytest.fixture(autouse=True)
    def _restore(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        yield
        monkeypatch.delenv("STREAMER_LOG_LEVEL", raising=False)
        configure_logging(json_logs=True)

    @pytest.mark.parametrize(("level", "shown"), [("debug", True), ("INFO", False)])
    def test_debug_lines_follow_the_level(
        self,
        level: str,
        shown: bool,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("STREAMER_LOG_LEVEL", level)
        configure_logging(json_logs=True)
        log = structlog.get_logger("test.level")
        log.debug("detail_line")
        log.info("info_line")
        out = capsys.readouterr().out
        assert "info_line" in out
        assert ("detail_line" in out) is shown

    def test_the_config_level_applies_unless_the_environment_says_otherwise(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.delenv("STREAMER_LOG_LEVEL", raising=False)
        configure_logging(json_logs=True, level="warning")
        log = structlog.get_logger("test.level")
        log.info("info_line")
        log.warning("warning_line")
        out = capsys.readouterr().out
        assert "warning_line" in out and "info_line" not in out
        monkeypatch.setenv("STREAMER_LOG_LEVEL", "info")
        configure_logging(json_logs=True, level="warning")
        log = structlog.get_logger("test.level")  # loggers are bound at first use
        log.info("info_again")
        assert "info_again" in capsys.readouterr().out

    def test_an_unknown_level_is_a_config_error_naming_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("STREAMER_LOG_LEVEL", "loud")
        with pytest.raises(ConfigError, match="STREAMER_LOG_LEVEL='loud'"):
            configure_logging(json_logs=True)
