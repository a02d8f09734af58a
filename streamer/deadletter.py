"""Dead-letter records: the original bytes with headers saying why, within the topic's limit.

A dead letter carries the message exactly as it came, so that an operator can
replay or inspect it. A message may be larger than the dead-letter topic accepts
(the input topic allows 2 MB, the DLQ topic the default 1 MB, or less): then a
prefix of it is kept, and headers give the original size and its SHA-256, so the
record can still be matched with the input. A dead letter is never refused for its
size, because a refusal would stop the daemon on the very input it exists to set
aside.

Headers, every value UTF-8:

- ``error.kind``, ``error.reason``: what was wrong (``streamer.codec.DLQ_KINDS``);
- ``source.topic``, ``source.partition``, ``source.offset``: where it came from;
- only when cut: ``error.truncated`` (``"true"``), ``original.size`` (bytes of the
  value), ``original.sha256`` (hex digest of the whole value), and for a key cut too,
  ``original.key_size`` and ``original.key_sha256``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["DEAD_LETTER_OVERHEAD", "KEY_LIMIT", "DeadLetterRecord", "dead_letter_record"]

KEY_LIMIT = 1024
"""Bytes of a key kept in a dead letter (a sensor id is at most 256 characters)."""

DEAD_LETTER_OVERHEAD = 4096
"""Bytes kept free below the limit for the record's headers, key and batch framing."""


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """What is produced to the DLQ topic for one message."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    truncated: bool


def dead_letter_record(
    value: bytes | None,
    key: bytes | None,
    *,
    kind: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    max_value_bytes: int,
) -> DeadLetterRecord:
    """The dead letter of one message, its value cut to at most ``max_value_bytes``."""
    headers = [
        ("error.kind", kind.encode()),
        ("error.reason", reason.encode()),
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]
    cut = False
    if value is not None and len(value) > max_value_bytes:
        headers += [
            ("error.truncated", b"true"),
            ("original.size", str(len(value)).encode()),
            ("original.sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        value = value[: max(max_value_bytes, 0)]
        cut = True
    if key is not None and len(key) > KEY_LIMIT:
        if not cut:
            headers.append(("error.truncated", b"true"))
        headers += [
            ("original.key_size", str(len(key)).encode()),
            ("original.key_sha256", hashlib.sha256(key).hexdigest().encode()),
        ]
        key = key[:KEY_LIMIT]
        cut = True
    return DeadLetterRecord(value, key, headers, cut)
