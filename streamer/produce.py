"""``streamer produce``: a CSV file into the input topic, one sample per row.

The way to try the daemon on recorded data, and to backfill history: each row
becomes one message in exactly the format the daemon consumes (``codec.encode_sample``,
key = the sensor id), in file order, through the daemon's own producer (``kafka.Sink``:
the same ``kafka.client`` settings, so SASL and TLS configs work, idempotent, acks=all).
The command returns once the broker acknowledged every sample, or fails naming why.

The file is read as ``streamer train`` reads it (``csv.*``; columns ``csv.columns`` or
``stream.channels``), and checked whole before anything is sent: a malformed file
sends nothing. Timestamps must increase row by row (the daemon dead-letters a sample
that is not after its sensor's newest as ``out_of_order``); a file without a time
column (``csv.timestamp_column: null``) stamps each row with its row index in seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from streamer.client_settings import setting_number
from streamer.codec import MAX_SENSOR_CHARS, encode_sample
from streamer.config import Config
from streamer.data import Table, check_increasing, read_csv
from streamer.errors import ConfigError, CsvError, InputError, KafkaError
from streamer.kafka.admin import ensure_input_topic
from streamer.kafka.sink import Sink

__all__ = ["Produced", "produce_csv"]


@dataclass(frozen=True, slots=True)
class Produced:
    """What ``produce_csv`` sent: every sample acknowledged by the broker."""

    samples: int
    sensor: str
    topic: str
    skipped: int  # rows csv.missing dropped (not sent)
    filled: int  # values csv.missing filled from the row before


# librdkafka's message.timeout.ms: how long it retries a record before failing it.
_MESSAGE_TIMEOUT_MS = 300_000
# Delivery reports are served (and a failure raised) at least every so many records.
_POLL_EVERY = 1000
# A progress line on stderr this often while a long or paced run goes on.
_PROGRESS_EVERY_S = 10.0
# The longest JSON number a float64 encodes to (17 digits, sign, point, exponent).
_LONGEST_FLOAT = -2.2250738585072014e-308


def _rows(table: Table, chunk: int = 10_000) -> Iterator[tuple[float, list[float]]]:
    """(timestamp, values) of every row, as Python floats, a chunk at a time (bounded memory)."""
    for lo in range(0, len(table), chunk):
        stamps = table.timestamps[lo : lo + chunk].tolist()
        yield from zip(stamps, table.values[lo : lo + chunk].tolist(), strict=True)


def _check_sizes(cfg: Config, table: Table, sensor: str) -> None:
    """CsvError naming the first row the daemon would dead-letter as ``oversized``.

    One encoding of the largest sample a row can give settles it for the usual file;
    only when that exceeds ``stream.max_message_bytes`` is every row measured.
    """
    limit = cfg.stream.max_message_bytes
    worst = [_LONGEST_FLOAT] * table.values.shape[1]
    if len(encode_sample(cfg.stream, sensor, _LONGEST_FLOAT, worst)) <= limit:
        return
    for i, (ts, row) in enumerate(_rows(table)):
        size = len(encode_sample(cfg.stream, sensor, ts, row))
        if size > limit:
            raise CsvError(
                f"{table.path}: line {int(table.lines[i])}: the sample is {size} bytes, over "
                f"stream.max_message_bytes ({limit}); the daemon would dead-letter it"
            )


def _read(cfg: Config, data: Path, sensor: str) -> Table:
    """The file, checked whole: channel count, gaps (csv.missing), time order, something to send."""
    channels = list(cfg.csv.columns or cfg.stream.channels)
    if len(channels) != len(cfg.stream.channels):
        raise ConfigError(
            f"csv.columns names {len(channels)} columns but stream.channels "
            f"{len(cfg.stream.channels)}: a sample carries one value per stream channel"
        )
    if not 0 < len(sensor) <= MAX_SENSOR_CHARS:
        raise InputError(
            f"sensor id {sensor!r} must be 1 to {MAX_SENSOR_CHARS} characters (--sensor)"
        )
    c = cfg.csv
    table = read_csv(data, c.separator, c.timestamp_column, channels, missing=c.missing)
    check_increasing(table)
    if not len(table):
        dropped = f" (csv.missing {c.missing} dropped {table.skipped})" if table.skipped else ""
        raise CsvError(f"{data}: no rows to produce{dropped}")
    return table


def _flush_timeout_s(cfg: Config) -> float:
    """Long enough for librdkafka to deliver or fail every record: its retry limit, and a bit."""
    client = cfg.kafka.librdkafka()
    raw = client.get("message.timeout.ms", client.get("delivery.timeout.ms"))
    ms = setting_number(raw) if raw is not None else None
    return (ms if ms else _MESSAGE_TIMEOUT_MS) / 1000.0 + 5.0


def _send(
    sink: Sink,
    cfg: Config,
    table: Table,
    sensor: str,
    rate: float | None,
    report: Callable[[int], None],
) -> None:
    """Produce every row in order, at most ``rate`` a second; ``report`` now and then."""
    topic = cfg.topics.input
    started = last_report = time.monotonic()
    for i, (ts, row) in enumerate(_rows(table), 1):
        sink.produce(topic, encode_sample(cfg.stream, sensor, ts, row), key=sensor)
        if rate is not None:
            # Pace against the start, not the previous row, so a slow poll is caught up.
            while (ahead := i / rate - (time.monotonic() - started)) > 0:
                sink.poll(min(ahead, 0.1))
        elif i % _POLL_EVERY == 0:
            sink.poll(0)
        if time.monotonic() - last_report >= _PROGRESS_EVERY_S:
            last_report = time.monotonic()
            report(i)


def produce_csv(
    cfg: Config,
    data: Path,
    *,
    sensor: str | None = None,
    rate: float | None = None,
) -> Produced:
    """Send every row of ``data`` to ``topics.input`` as one sample of ``sensor``.

    ``sensor`` defaults to the file's name without its suffix; ``rate``: rows per
    second (None: as fast as the broker takes them). The input topic is checked first,
    and created when ``kafka.create_topics`` is set.

    Raises:
        CsvError, InputError, ConfigError: the file, the sensor id or the config is
            unusable; nothing was sent.
        KafkaError: the cluster was not reached (within ``kafka.connect_timeout_s``), the
            topic is missing, or a sample was not delivered; says how many were.
    """
    name = data.stem if sensor is None else sensor
    table = _read(cfg, data, name)
    _check_sizes(cfg, table, name)
    topic, bootstrap = cfg.topics.input, cfg.kafka.bootstrap_servers
    ensure_input_topic(cfg.kafka, topic, timeout_s=cfg.kafka.connect_timeout_s)
    # librdkafka's errors only, unless kafka.client says otherwise: its warnings are
    # transient here (a fresh broker's "coordinator load in progress"), and every failure
    # ends in our own line.
    quiet = cfg.kafka.model_copy(update={"client": {"log_level": 3, **cfg.kafka.client}})
    sink = Sink(quiet, client_id="streamer-produce")

    def report(sent: int) -> None:
        print(
            f"streamer: produce: {sent}/{len(table)} samples of {name} sent to {topic}, "
            f"{sink.delivered} acknowledged",
            file=sys.stderr,
            flush=True,
        )

    try:
        _send(sink, cfg, table, name, rate, report)
        sink.flush(_flush_timeout_s(cfg))
    except KafkaError as exc:
        raise KafkaError(
            f"cannot produce {data} to {topic} on {bootstrap}: {exc} "
            f"({sink.delivered} of {len(table)} samples acknowledged)"
        ) from exc
    finally:
        # Delivered or failed by now; nothing is left worth waiting for.
        sink.close(timeout_s=0.0)
    return Produced(len(table), name, topic, table.skipped, table.filled)
