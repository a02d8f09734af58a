"""``python -m streamer.dev.broker``: the local broker's command line."""

import logging
import sys

import structlog

from streamer.dev.broker.cli import main

# structlog prints to stdout by default, and stdout belongs to the address alone.
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)
sys.exit(main(sys.argv[1:]))
