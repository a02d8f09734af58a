"""Bytes <-> samples: decode input messages in batches, encode one; pack Kafka positions.

Decoding never raises for bad input: every message either becomes a sample or a
``DeadLetter`` saying why (its ``kind`` and a readable ``reason``), which the daemon
publishes to the dead-letter topic. Each message is judged alone: its fate never
depends on its neighbours in the batch. Every value is parsed by its own
``orjson.loads`` (one C-level ``map`` over the batch); only when one fails is the
batch parsed message by message again, to find the culprits and read NaN and
Infinity for a precise reason. Parsing the joined batch with one ``orjson.loads``
is faster, but the parser then draws the message boundaries: messages crafted to be
invalid alone and valid together (one ending inside an array that the next one
closes, one holding two values) shift every sample after them onto another
message's key and fate.

Input sample (field names configurable, see ``StreamConfig``)::

    {"sensor": "pump-7", "ts": 1764201600.25, "values": [0.91, 3.2, 17.5, 0.02, 412.0]}

``ts`` is epoch seconds or an ISO-8601 string (naive times are UTC); ``values`` is a
list in channel order or an object keyed by the configured channel names. The
message key must be the sensor id (it decides the partition, and so which
instance holds the sensor's window).

A sample's position (partition and offset packed into one int64, see ``to_position``)
travels with it through the ring buffers to the windows it ends up in. The published
records are encoded by ``streamer.encoders``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray

from streamer.config import StreamConfig

__all__ = [
    "DLQ_KINDS",
    "MAX_SENSOR_CHARS",
    "OFFSET_BITS",
    "OFFSET_MASK",
    "DeadLetter",
    "DecodedSamples",
    "Decoder",
    "decode_batch",
    "encode_sample",
    "offset_of",
    "partition_of",
    "position_labels",
    "split_position",
    "to_position",
]

OFFSET_BITS: Final = 40
"""A sample's position is ``partition << 40 | offset``: one int64 the ring buffers carry."""
OFFSET_MASK: Final = (1 << OFFSET_BITS) - 1
"""``position & OFFSET_MASK`` is the offset, ``position >> OFFSET_BITS`` the partition."""

DLQ_KINDS: Final = (
    "oversized",
    "empty",
    "bad_json",
    "not_object",
    "missing_field",
    "bad_sensor",
    "key_mismatch",
    "bad_timestamp",
    "wrong_type",
    "wrong_channel_count",
    "unknown_channel",
    "missing_channel",
    "null_value",
    "non_finite",
    "out_of_order",
    "sensor_limit",
)
"""Every ``error.kind`` a dead letter may carry (``out_of_order`` comes from the ring buffers,
``sensor_limit`` and a future ``bad_timestamp`` from the daemon)."""

MAX_SENSOR_CHARS: Final = 256
"""The longest sensor id a sample may carry; a longer one is dead-lettered (``bad_sensor``)."""
_NUMBER_TYPES: Final = frozenset((float, int))  # exact types: bool is not a number here
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_position(partition: NDArray[np.integer] | int, offset: NDArray[np.integer] | int) -> Any:
    """Pack partition and offset into one int64 position (arrays, or two ints to an int)."""
    if type(partition) is int and type(offset) is int:
        # One state record's anchor at a time on a restore: numpy's scalar path costs more
        # than the arithmetic.
        return (partition << OFFSET_BITS) | offset
    return (np.asarray(partition, dtype=np.int64) << OFFSET_BITS) | np.asarray(
        offset, dtype=np.int64
    )


def split_position(position: int) -> tuple[int, int]:
    """(partition, offset) of a packed position."""
    return int(position) >> OFFSET_BITS, int(position) & OFFSET_MASK


def offset_of(positions: Any) -> Any:
    """The offsets of packed positions (an int, or an int64 array element-wise)."""
    return positions & OFFSET_MASK


def partition_of(positions: Any) -> Any:
    """The partitions of packed positions (an int, or an int64 array element-wise)."""
    return positions >> OFFSET_BITS


def position_labels(positions: NDArray[np.int64]) -> list[str]:
    """Positions as "partition:offset": stable across runs and instances (alert ids)."""
    return [f"{p >> OFFSET_BITS}:{p & OFFSET_MASK}" for p in positions.tolist()]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that cannot become a sample: index into the batch, kind, readable reason."""

    index: int
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class DecodedSamples:
    """The valid samples of a batch, as arrays (row i came from message ``index[i]``)."""

    keys: NDArray[np.object_]  # sensor ids (str)
    ts: NDArray[np.float64]  # epoch seconds
    values: NDArray[np.float32]  # (n, channels)
    positions: NDArray[np.int64]
    index: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, rows: NDArray[np.int64]) -> DecodedSamples:
        """These rows only."""
        return DecodedSamples(
            self.keys[rows],
            self.ts[rows],
            self.values[rows],
            self.positions[rows],
            self.index[rows],
        )


class _BadMessageError(Exception):
    """Internal: a message failed validation (kind, reason)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(kind, reason)
        self.kind = kind
        self.reason = reason


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_ts(raw: object, field: str) -> float:
    t = type(raw)
    if t is float or t is int:
        try:
            out = float(raw)  # type: ignore[arg-type]
        except OverflowError:
            raise _BadMessageError(
                "bad_timestamp", f"{field} {_short(raw)} is out of range"
            ) from None
        if not math.isfinite(out):
            raise _BadMessageError("bad_timestamp", f"{field} must be finite, got {_short(raw)}")
        return out
    if t is str:
        try:
            parsed = dt.datetime.fromisoformat(raw)  # type: ignore[arg-type]
        except ValueError:
            raise _BadMessageError(
                "bad_timestamp", f"{field} {_short(raw)} is not epoch seconds or ISO-8601"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        # Exact for microsecond timestamps; .timestamp() can round differently per platform.
        delta = parsed - _EPOCH
        return delta.days * 86400.0 + delta.seconds + delta.microseconds / 1e6
    if raw is None:
        raise _BadMessageError("bad_timestamp", f"{field} is null")
    raise _BadMessageError(
        "bad_timestamp", f"{field} must be a number or an ISO-8601 string, got {t.__name__}"
    )


class Decoder:
    """Validates samples against one stream configuration; reusable across batches."""

    def __init__(self, cfg: StreamConfig) -> None:
        self.channels = tuple(cfg.channels)
        self.n_channels = len(self.channels)
        self.sensor_field = cfg.sensor_field
        self.ts_field = cfg.timestamp_field
        self.values_field = cfg.values_field
        self.max_bytes = cfg.max_message_bytes
        self._channel_index = {name: i for i, name in enumerate(self.channels)}

    # -- one parsed message --------------------------------------------------------------

    def _values(self, raw: object) -> list[Any]:
        c = self.n_channels
        if type(raw) is list:
            if len(raw) != c:
                raise _BadMessageError(
                    "wrong_channel_count",
                    f"{self.values_field} has {len(raw)} values, "
                    f"expected {c} {list(self.channels)}",
                )
            vals = raw
        elif type(raw) is dict:
            unknown = [k for k in raw if k not in self._channel_index]
            if unknown:
                raise _BadMessageError(
                    "unknown_channel",
                    f"{self.values_field} names unknown channel(s) {unknown[:5]}; "
                    f"configured: {list(self.channels)}",
                )
            if len(raw) != c:
                missing = [n for n in self.channels if n not in raw]
                raise _BadMessageError(
                    "missing_channel", f"{self.values_field} lacks channel(s) {missing}"
                )
            vals = [raw[n] for n in self.channels]
        elif raw is None:
            raise _BadMessageError("null_value", f"{self.values_field} is null")
        else:
            raise _BadMessageError(
                "wrong_type",
                f"{self.values_field} must be a list or an object, got {type(raw).__name__}",
            )
        for i, v in enumerate(vals):
            t = type(v)
            if t is float or t is int:
                continue
            name = self.channels[i]
            if v is None:
                raise _BadMessageError("null_value", f"channel {name!r} is null")
            raise _BadMessageError(
                "wrong_type", f"channel {name!r} must be a number, got {_short(v)}"
            )
        return vals

    def _one(self, obj: object, key: bytes | None) -> tuple[str, float, list[Any]]:
        if type(obj) is not dict:
            raise _BadMessageError(
                "not_object", f"a sample must be a JSON object, got {type(obj).__name__}"
            )
        try:
            sensor = obj[self.sensor_field]
            ts_raw = obj[self.ts_field]
            vals_raw = obj[self.values_field]
        except KeyError:
            missing = [
                f for f in (self.sensor_field, self.ts_field, self.values_field) if f not in obj
            ]
            raise _BadMessageError("missing_field", f"missing field(s) {missing}") from None
        if type(sensor) is not str or not sensor or len(sensor) > MAX_SENSOR_CHARS:
            raise _BadMessageError(
                "bad_sensor",
                f"{self.sensor_field} must be a non-empty string of at most "
                f"{MAX_SENSOR_CHARS} characters, got {_short(sensor)}",
            )
        if key is None:
            raise _BadMessageError(
                "key_mismatch", f"message has no key; expected the sensor id {sensor!r}"
            )
        try:
            key_matches = key == sensor.encode()
        except UnicodeEncodeError:
            key_matches = False
        if not key_matches:
            raise _BadMessageError(
                "key_mismatch",
                f"message key {_short(key)} is not the sensor id {_short(sensor)}",
            )
        return sensor, _parse_ts(ts_raw, self.ts_field), self._values(vals_raw)

    # -- batches -------------------------------------------------------------------------

    def _all_valid(
        self, objs: list[object], keys: list[bytes | None]
    ) -> tuple[list[str], list[Any], list[list[Any]]] | None:
        """Sensors, timestamps and value rows when every parsed message is a plain valid
        sample (numbers, values as a list); None when any is not.

        The same checks as ``_one``, each made over the whole batch by C-level ``map`` and
        ``set`` passes instead of a Python call per message: on the common all-valid batch
        this replaces most of the decoding time. Numbers parsed by orjson are always
        finite and at most 64-bit, so the range checks of ``_parse_ts`` cannot fail here.
        A batch that fails any check is decoded message by message, which names the
        culprits and their reasons.
        """
        if set(map(type, objs)) != {dict}:
            return None
        try:
            sensors = list(map(operator.itemgetter(self.sensor_field), objs))  # type: ignore[arg-type]
            stamps = list(map(operator.itemgetter(self.ts_field), objs))  # type: ignore[arg-type]
            rows = list(map(operator.itemgetter(self.values_field), objs))  # type: ignore[arg-type]
        except KeyError:
            return None
        if set(map(type, sensors)) != {str}:
            return None
        lengths = set(map(len, sensors))
        if min(lengths) < 1 or max(lengths) > MAX_SENSOR_CHARS:
            return None
        try:
            if not all(map(operator.eq, keys, map(str.encode, sensors))):
                return None
        except UnicodeEncodeError:
            return None
        if not set(map(type, stamps)) <= _NUMBER_TYPES:
            return None
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {self.n_channels}:
            return None
        if not set(map(type, itertools.chain.from_iterable(rows))) <= _NUMBER_TYPES:
            return None
        return sensors, stamps, rows

    def _parse_each(self, raw: bytes) -> object:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            first_error = str(exc)
        # NaN, Infinity and out-of-range numbers are not JSON, but producers write them
        # (Python's json.dumps does): parse them so the reason says "non-finite".
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise _BadMessageError("bad_json", f"not valid JSON: {first_error}") from None

    def _screen(self, values: Sequence[bytes | None]) -> tuple[list[int], list[DeadLetter], bool]:
        """The indices of the messages with a value within the size limit, the dead
        letters of the others, and whether that is every message."""
        n = len(values)
        max_bytes = self.max_bytes
        try:
            sizes = list(map(len, values))  # type: ignore[arg-type]
        except TypeError:  # a null value: find it below
            sizes = [0]
        if n and min(sizes) > 0 and max(sizes) <= max_bytes:
            return list(range(n)), [], True  # the common case, without a Python step per message
        dead: list[DeadLetter] = []
        cand: list[int] = []
        for i, v in enumerate(values):
            if not v:
                dead.append(DeadLetter(i, "empty", "message has no value (null or empty)"))
            elif len(v) > max_bytes:
                dead.append(
                    DeadLetter(i, "oversized", f"value is {len(v)} bytes, limit {max_bytes}")
                )
            else:
                cand.append(i)
        return cand, dead, False

    def _one_by_one(
        self,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        cand: list[int],
        parsed: list[object] | None,
        dead: list[DeadLetter],
    ) -> tuple[list[int], list[str], list[float], list[list[Any]]]:
        """Indices, sensors, timestamps and value rows of the valid messages among ``cand``
        (``parsed``: their parsed values, None to parse each here), judged one at a time;
        the dead letters of the others are appended to ``dead``."""
        good_idx: list[int] = []
        sensors: list[str] = []
        stamps: list[float] = []
        rows: list[list[Any]] = []
        one = self._one
        for j, i in enumerate(cand):
            try:
                obj = parsed[j] if parsed is not None else self._parse_each(values[i])  # type: ignore[arg-type]
                sensor, ts, vals = one(obj, keys[i])
            except _BadMessageError as bad:
                dead.append(DeadLetter(i, bad.kind, bad.reason))
                continue
            good_idx.append(i)
            sensors.append(sensor)
            stamps.append(ts)
            rows.append(vals)
        return good_idx, sensors, stamps, rows

    def decode(
        self,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        positions: NDArray[np.int64] | None = None,
    ) -> tuple[DecodedSamples, list[DeadLetter]]:
        """Decode a batch; ``positions`` (one per message) are carried to the samples."""
        n = len(values)
        cand, dead, all_sized = self._screen(values)
        parsed: list[object] | None = None
        if cand:
            chunk = list(values) if all_sized else [values[i] for i in cand]
            try:
                # One parse per message, never one of the joined batch: only then can no
                # neighbour change where a message ends (see the module docstring). The
                # map runs in C; a valid batch decodes about 10 % slower than with one
                # parse of the joined batch (BENCHMARKS.md), and checking the joined
                # parse's message boundaries instead costs more than it saves.
                parsed = list(map(orjson.loads, chunk))  # type: ignore[arg-type]
            except orjson.JSONDecodeError:
                parsed = None
        fast = None if parsed is None else self._all_valid(parsed, [keys[i] for i in cand])
        if fast is not None:
            good_idx = cand
            sensors, stamps, rows = fast
        else:
            good_idx, sensors, stamps, rows = self._one_by_one(values, keys, cand, parsed, dead)
        arr, bad_rows = self._to_array(rows)
        if bad_rows:
            for j, reason in bad_rows:
                dead.append(DeadLetter(good_idx[j], "non_finite", reason))
            keep = np.ones(len(rows), dtype=bool)
            keep[[j for j, _ in bad_rows]] = False
            arr = arr[keep]
            good_idx = [g for g, k in zip(good_idx, keep.tolist(), strict=True) if k]
            sensors = [s for s, k in zip(sensors, keep.tolist(), strict=True) if k]
            stamps = [t for t, k in zip(stamps, keep.tolist(), strict=True) if k]
        index = np.asarray(good_idx, dtype=np.int64)
        pos = (
            np.asarray(positions, dtype=np.int64)[index] if positions is not None else index.copy()
        )
        keys_arr = np.empty(len(sensors), dtype=object)
        keys_arr[:] = sensors
        dead.sort(key=lambda d: d.index)
        samples = DecodedSamples(keys_arr, np.asarray(stamps, dtype=np.float64), arr, pos, index)
        assert len(samples) + len(dead) == n
        return samples, dead

    def _to_array(self, rows: list[list[Any]]) -> tuple[NDArray[np.float32], list[tuple[int, str]]]:
        """Rows to float32 ``(n, channels)``; rows that are not finite in float32 are reported."""
        c = self.n_channels
        if not rows:
            return np.empty((0, c), dtype=np.float32), []
        try:
            wide = np.array(rows, dtype=np.float64)
        except OverflowError:
            # An integer beyond float range somewhere: convert row by row to find it.
            wide = np.empty((len(rows), c), dtype=np.float64)
            for j, r in enumerate(rows):
                try:
                    wide[j] = r
                except OverflowError:
                    wide[j] = np.inf
        with np.errstate(over="ignore"):
            arr = wide.astype(np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if finite.all():
            return arr, []
        bad = []
        for j in np.flatnonzero(~finite).tolist():
            col = int(np.flatnonzero(~np.isfinite(arr[j]))[0])
            bad.append(
                (
                    j,
                    f"channel {self.channels[col]!r} is {_short(rows[j][col])}, "
                    "not finite in float32",
                )
            )
        return arr, bad


def decode_batch(
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None],
    cfg: StreamConfig,
    positions: NDArray[np.int64] | None = None,
) -> tuple[DecodedSamples, list[DeadLetter]]:
    """Decode one batch with a throwaway ``Decoder`` (the daemon keeps one)."""
    return Decoder(cfg).decode(values, keys, positions)


def encode_sample(cfg: StreamConfig, sensor: str, ts: float, values: Sequence[float]) -> bytes:
    """One input sample as ``Decoder`` reads it, field names from ``cfg``; key it by ``sensor``.

    ``values`` in ``cfg.channels`` order, finite: the decoder dead-letters anything else.
    ``streamer produce`` writes its samples with this, so they are what the daemon reads.
    """
    return orjson.dumps(
        {cfg.sensor_field: sensor, cfg.timestamp_field: ts, cfg.values_field: list(values)}
    )
