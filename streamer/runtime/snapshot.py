"""Local state snapshots: a clean stop leaves each partition's state in a file beside it.

A restore reads a partition's state from the compacted state topic: every record the
broker has not compacted yet, which grows with the write rate, not the sensors. A clean
stop (SIGTERM) therefore also writes, per partition it owned, every sensor's state record
as of its final commit into ``kafka.state_snapshot_dir``, with the state topic's end
offset at that moment, as Kafka Streams keeps a local store with a checkpoint. The next
assignment of that partition on this host uses the file instead of the topic when
nothing happened since: the group's commit is still the one the file was written at,
and the state topic's partition still ends where it ended then (no one wrote state
since). Otherwise the file is ignored and the topic read. Either way the file is removed
once read: from then on the state moves on without it.

File layout: one JSON header line (``FORMAT``, the group, state topic, partition, the
commit's H, the state topic's end offset), then per record its key and value, each as a
4-byte big-endian length and the bytes, then ``_TRAILER``, the record count and the
CRC32 of everything before the trailer. Written to a temporary name and renamed, so a
crash mid-write leaves no file that looks whole.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
import structlog

__all__ = [
    "FORMAT",
    "Snapshot",
    "read_snapshot",
    "snapshot_dir",
    "snapshot_path",
    "write_snapshot",
]

log = structlog.get_logger("streamer.daemon")

FORMAT = "streamer-state-snapshot/1"
_TRAILER = b"\nEND"
_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A partition's state records as a clean stop left them."""

    partition: int
    h: int  # H of the commit the records were written at
    state_end: int  # the state topic partition's end offset then
    values: dict[bytes, bytes]  # sensor -> its state record


def snapshot_dir(configured: Path | None, environ: Mapping[str, str]) -> Path | None:
    """Where clean stops leave the partitions' state: the config's, else systemd's state folder."""
    if configured is not None:
        return configured
    state = environ.get("STATE_DIRECTORY")  # StateDirectory=; several are ':'-separated
    return Path(state.split(":")[0]) / "snapshots" if state else None


def snapshot_path(directory: Path, group: str, state_topic: str, partition: int) -> Path:
    """Where a partition's snapshot lives (names reduced to safe file name characters)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{group}.{state_topic}")
    return directory / f"{safe}.{partition}.snapshot"


def write_snapshot(
    path: Path,
    *,
    group: str,
    state_topic: str,
    partition: int,
    h: int,
    state_end: int,
    records: Iterable[tuple[bytes, bytes]],
) -> int:
    """Write one partition's records (atomically: a temporary file, then a rename); the count."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "group": group,
        "state_topic": state_topic,
        "partition": partition,
        "h": h,
        "state_end": state_end,
    }
    n = 0
    with tmp.open("wb") as f:
        crc = _write(f, orjson.dumps(header) + b"\n", 0)
        body = bytearray()
        for key, value in records:
            body += _LEN.pack(len(key)) + key + _LEN.pack(len(value)) + value
            n += 1
            if len(body) >= 1 << 20:
                crc = _write(f, bytes(body), crc)
                body.clear()
        crc = _write(f, bytes(body), crc)
        f.write(_TRAILER + _LEN.pack(n) + _LEN.pack(crc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def _write(f: BinaryIO, data: bytes, crc: int) -> int:
    f.write(data)
    return zlib.crc32(data, crc)


def read_snapshot(path: Path, *, group: str, state_topic: str, partition: int) -> Snapshot | None:
    """The snapshot at ``path`` if it is whole and for this partition; None otherwise (logged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("state_snapshot_unreadable", path=str(path), error=str(exc))
        return None
    try:
        return _parse(raw, group, state_topic, partition)
    except ValueError as exc:
        log.warning("state_snapshot_ignored", path=str(path), reason=str(exc))
        return None


def _parse(raw: bytes, group: str, state_topic: str, partition: int) -> Snapshot:
    size = len(_TRAILER) + 8
    if len(raw) < size or raw[-size:-8] != _TRAILER:
        raise ValueError("cut short (no trailer)")
    count, crc = _LEN.unpack(raw[-8:-4])[0], _LEN.unpack(raw[-4:])[0]
    if zlib.crc32(raw[:-size]) != crc:
        raise ValueError("damaged (checksum)")
    line_end = raw.find(b"\n")
    try:
        header = orjson.loads(raw[:line_end])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    wanted = {"group": group, "state_topic": state_topic, "partition": partition}
    for k, v in wanted.items():
        if header.get(k) != v:
            raise ValueError(f"it is for {k} {header.get(k)!r}, not {v!r}")
    h, end = header.get("h"), header.get("state_end")
    if not isinstance(h, int) or not isinstance(end, int):
        raise ValueError(f"h {h!r} and state_end {end!r} must be integers")
    body = memoryview(raw)[line_end + 1 : -size]
    values: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        (klen,) = _LEN.unpack_from(body, pos)
        key = bytes(body[pos + 4 : pos + 4 + klen])
        pos += 4 + klen
        (vlen,) = _LEN.unpack_from(body, pos)
        values[key] = bytes(body[pos + 4 : pos + 4 + vlen])
        pos += 4 + vlen
    if len(values) != count:
        raise ValueError(f"{len(values)} records, the trailer says {count}")
    return Snapshot(partition, h, end, values)
