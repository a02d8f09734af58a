"""Logging set-up: structlog to stdout, JSON lines for journald, a console on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

from streamer.errors import ConfigError

__all__ = ["configure_logging"]

_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure_logging(
    json_logs: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """structlog to ``stream`` (default stdout): JSON lines when it is not a TTY
    (journald), console otherwise.

    The daemon logs to stdout, which journald collects; the offline commands log to
    stderr, so that their stdout carries only their results (tables, JSON).

    The level is ``STREAMER_LOG_LEVEL`` when set, else ``level`` (``logging.level``):
    debug, info or warning. Debug adds one line per commit round (offsets, heads,
    timings) and per heap settle.
    """
    out = sys.stdout if stream is None else stream
    if json_logs is None:
        json_logs = not out.isatty()
    name = os.environ.get("STREAMER_LOG_LEVEL", level).strip().lower()
    if name not in _LOG_LEVELS:
        raise ConfigError(f"STREAMER_LOG_LEVEL={name!r} is not one of {', '.join(_LOG_LEVELS)}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LOG_LEVELS[name]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
