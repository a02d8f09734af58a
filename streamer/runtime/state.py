"""The state-topic record of one sensor, and the commit metadata, as bytes and back.

A state record (key: the sensor id; partition: the sensor's input partition) holds
what a restart needs to carry a sensor on exactly: its threshold and alert state, the
ring anchor (offset and count of the oldest sample its next window needs) and
``upto``, the H of the round that wrote it. The commit metadata holds that H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from streamer.errors import StateError

__all__ = [
    "COMMIT_META_VERSION",
    "STATE_VERSION",
    "SensorRecord",
    "commit_head",
    "commit_metadata",
    "encode_state",
    "parse_state",
]

log = structlog.get_logger("streamer.daemon")

STATE_VERSION = 1
"""Version of the state-topic record; any other version is reported and ignored."""
COMMIT_META_VERSION = 1


@dataclass(frozen=True, slots=True)
class SensorRecord:
    """A validated state record (see ``parse_state``)."""

    sensor: str
    partition: int
    upto: int
    threshold: dict[str, Any] | None
    alerts: dict[str, Any] | None
    # anchor_offset, anchor_count: both present, offset >= 0, count >= 1.
    ring: dict[str, int] | None


def encode_state(
    sensor: str,
    partition: int,
    upto: int,
    ring: dict[str, int] | None,
    threshold: dict[str, Any] | None,
    alerts: dict[str, Any],
) -> bytes:
    """A sensor's state record as written to the state topic (sorted keys, stable bytes)."""
    return orjson.dumps(
        {
            "version": STATE_VERSION,
            "sensor": sensor,
            "partition": partition,
            "upto": upto,
            "threshold": threshold,
            "alerts": alerts,
            "ring": ring,
        },
        option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_state(key: bytes, value: bytes, partition: int) -> SensorRecord:
    """Validate a state record read from ``partition`` under ``key``; StateError says why not."""
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise StateError(f"not JSON: {exc}") from exc
    if not isinstance(rec, dict) or rec.get("version") != STATE_VERSION:
        version = rec.get("version") if isinstance(rec, dict) else None
        raise StateError(f"unknown state record version {version!r}")
    sensor = rec.get("sensor")
    if not isinstance(sensor, str) or sensor.encode() != key:
        raise StateError(f"record sensor {sensor!r} does not match its key")
    if rec.get("partition") != partition:
        raise StateError(f"record is for partition {rec.get('partition')!r}, found in {partition}")
    upto = rec.get("upto")
    if not isinstance(upto, int) or isinstance(upto, bool):
        raise StateError(f"upto must be an integer, got {upto!r}")
    ring = rec.get("ring")
    if ring is not None:
        ok = isinstance(ring, dict) and all(
            _is_int(ring.get(k)) for k in ("anchor_offset", "anchor_count")
        )
        if not ok or ring["anchor_count"] < 1 or ring["anchor_offset"] < 0:
            raise StateError(f"bad ring anchor {ring!r}")
    for k in ("threshold", "alerts"):
        if rec.get(k) is not None and not isinstance(rec[k], dict):
            raise StateError(f"{k} must be an object or null")
    return SensorRecord(sensor, partition, upto, rec.get("threshold"), rec.get("alerts"), ring)


def commit_metadata(h: int) -> str:
    """The metadata committed with a partition's offset: the round's H."""
    return orjson.dumps({"v": COMMIT_META_VERSION, "h": h}).decode()


def commit_head(metadata: str | None, offset: int) -> int:
    """H of a commit: from our metadata, else (another tool committed) offset - 1."""
    if metadata:
        try:
            meta = orjson.loads(metadata)
            if meta.get("v") == COMMIT_META_VERSION and _is_int(meta.get("h")):
                return int(meta["h"])
        except (orjson.JSONDecodeError, AttributeError):
            pass
        log.warning("commit_metadata_unknown", metadata=metadata[:200])
    return offset - 1 if offset >= 0 else -1
