"""librdkafka's own log lines as rate-limited structlog events (no broker needed)."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Producer

from streamer.kafka.clientlog import CLIENT_LOGGER, ClientLogHandler, client_logger
from streamer.ratelimit import RateLimiter
from tests.helpers import CapturedLog, Timeout


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _logger(handler: logging.Handler) -> logging.Logger:
    """A logger outside logging's registry, as confluent-kafka would be handed one."""
    logger = logging.Logger("test.librdkafka", logging.DEBUG)
    logger.addHandler(handler)
    return logger


def _fail(logger: logging.Logger, n: int = 1) -> None:
    """Lines exactly as confluent-kafka's log callback sends them."""
    for i in range(n):
        logger.log(
            logging.ERROR,
            "%s [%s] %s",
            "FAIL",
            "rdkafka#consumer-1",
            f"[thrd:127.0.0.1:1/bootstrap]: Connect to ipv4#127.0.0.1:1 failed ({i})",
        )


class TestClientLogHandler:
    def test_a_line_becomes_one_event_with_facility_client_and_message(self) -> None:
        captured = CapturedLog()
        _fail(_logger(ClientLogHandler(logger=captured.logger)))
        (event,) = captured.events()
        assert event == {
            "level": "error",
            "event": "kafka_client_log",
            "facility": "FAIL",
            "client": "rdkafka#consumer-1",
            "message": "[thrd:127.0.0.1:1/bootstrap]: Connect to ipv4#127.0.0.1:1 failed (0)",
        }

    def test_each_facility_is_rate_limited_and_the_count_left_out_is_reported(self) -> None:
        """A flood of FAIL lines gives ``burst`` events a window; others pass beside it."""
        captured = CapturedLog()
        clock = _Clock()
        logger = _logger(
            ClientLogHandler(RateLimiter(3, 60.0, clock=clock), logger=captured.logger)
        )
        _fail(logger, 100)
        logger.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "rdkafka#producer-1", "timed out")
        assert [e["facility"] for e in captured.events()] == ["FAIL"] * 3 + ["REQTMOUT"]
        clock.now = 61.0
        _fail(logger)
        last = captured.events()[-1]
        assert last["facility"] == "FAIL" and last["suppressed"] == 97

    def test_debug_lines_asked_for_are_never_limited(self) -> None:
        """With kafka.client.debug set every debug line is wanted."""
        captured = CapturedLog()
        logger = _logger(ClientLogHandler(RateLimiter(1, 60.0), logger=captured.logger))
        for _ in range(20):
            logger.log(logging.DEBUG, "%s [%s] %s", "BROKER", "rdkafka#producer-1", "state")
        assert len(captured.events()) == 20 and captured.events()[0]["level"] == "debug"

    def test_a_foreign_record_is_still_one_event(self) -> None:
        captured = CapturedLog()
        _logger(ClientLogHandler(logger=captured.logger)).warning("plain %s", "text")
        (event,) = captured.events()
        assert event["facility"] == "-" and event["message"] == "plain text"

    def test_a_failing_log_call_is_dropped_silently(
        self, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """An exception inside the handler would surface from the client's poll: never."""

        class Broken:
            def log(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError("log sink gone")

        _fail(_logger(ClientLogHandler(logger=Broken())))  # type: ignore[arg-type]
        out, err = capfd.readouterr()
        assert "Traceback" not in err + out and "log sink gone" not in err + out

    def test_client_logger_is_one_non_propagating_logger(self) -> None:
        logger = client_logger()
        assert client_logger() is logger and logger.name == CLIENT_LOGGER
        assert sum(isinstance(h, ClientLogHandler) for h in logger.handlers) == 1
        assert not logger.propagate


class TestWithTheClient:
    def test_a_client_of_an_unreachable_broker_prints_nothing_raw(
        self, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """librdkafka's FAIL lines arrive as events from poll, none as ``%3|`` on stderr."""
        captured = CapturedLog()
        logger = _logger(ClientLogHandler(logger=captured.logger))
        producer = Producer({"bootstrap.servers": "127.0.0.1:1", "logger": logger})
        timeout = Timeout(10)
        while not timeout.expired and not captured.events("kafka_client_log"):
            producer.poll(0.2)
        time.sleep(0.5)
        producer.poll(0.1)
        (first, *_) = captured.events("kafka_client_log")
        assert first["facility"] == "FAIL" and "127.0.0.1:1" in first["message"]
        _out, err = capfd.readouterr()
        assert "%3|" not in err and "FAIL" not in err, err[-2000:]
