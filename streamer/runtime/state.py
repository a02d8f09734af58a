"""The commit metadata: H of the round that committed, as the group keeps it and back.

The per-sensor state record is ``streamer.sensors``' (``encode_record``,
``parse_record``).
"""

from __future__ import annotations

import orjson
import structlog

__all__ = ["COMMIT_META_VERSION", "commit_head", "commit_metadata"]

log = structlog.get_logger("streamer.daemon")

COMMIT_META_VERSION = 1


def commit_metadata(h: int) -> str:
    """The metadata committed with a partition's offset: the round's H."""
    return orjson.dumps({"v": COMMIT_META_VERSION, "h": h}).decode()


def commit_head(metadata: str | None, offset: int) -> int:
    """H of a commit: from our metadata, else (another tool committed) offset - 1."""
    if metadata:
        try:
            meta = orjson.loads(metadata)
            h = meta.get("h")
            if meta.get("v") == COMMIT_META_VERSION and type(h) is int:  # not a bool
                return h
        except (orjson.JSONDecodeError, AttributeError):
            pass
        log.warning("commit_metadata_unknown", metadata=metadata[:200])
    return offset - 1 if offset >= 0 else -1
