"""Records -> bytes: the score and alert records streamer publishes.

Encoding is deterministic: the same inputs give the same bytes (sorted keys,
orjson's shortest float repr, no wall-clock fields), so a replayed window
republishes a byte-identical record. JSON has no NaN or infinity: a non-finite
number is written as null.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from streamer.codec import OFFSET_BITS, OFFSET_MASK
from streamer.records import ScoredBatch
from streamer.scoring.alerts import AlertEvent

__all__ = ["encode_alert", "encode_score", "encode_scores", "window_id"]


def window_id(topic: str, partition: int, offset: int) -> str:
    """Id of the window whose last sample is at ``offset``: same input, same id, on any run."""
    raw = f"{topic}\0{partition}\0{offset}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _num(x: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return x if math.isfinite(x) else None


def encode_score(
    *,
    window_id: str,
    sensor: str,
    window_start: float,
    window_end: float,
    score: float,
    threshold: float,
    anomalous: bool,
    likelihood: float,
    channels: Mapping[str, float],
    model: str,
    partition: int,
    offset: int,
) -> bytes:
    """One score record (see schemas/score.schema.json)."""
    return orjson.dumps(
        {
            "id": window_id,
            "sensor": sensor,
            "window_start": window_start,
            "window_end": window_end,
            "score": _num(score),
            "threshold": _num(threshold),
            "anomalous": anomalous,
            "likelihood": _num(likelihood),
            "channels": {k: _num(v) for k, v in channels.items()},
            "model": model,
            "partition": partition,
            "offset": offset,
        },
        option=orjson.OPT_SORT_KEYS,
    )


def encode_scores(topic: str, batch: ScoredBatch, channels: Sequence[str]) -> list[bytes]:
    """The score records of a batch of windows: the bytes ``encode_score`` gives each one.

    The windows' last samples (``batch.windows.end_pos``) were read from ``topic``.
    Built with one dict per window in sorted key order, so orjson needs no key sort and
    there is no keyword call per window; a batch holding a non-finite number goes
    through ``encode_score`` window by window, which writes those as null.
    """
    sensors = [str(s) for s in batch.sensors]
    positions, model = batch.windows.end_pos, batch.model_version
    window_start, window_end = batch.windows.start_ts, batch.windows.end_ts
    scores, thresholds, likelihood = batch.scores, batch.thresholds, batch.likelihood
    anomalous, channel_errors = batch.anomalous, batch.channel_errors
    n = len(sensors)
    numbers = (scores, thresholds, likelihood, channel_errors)
    parts = (positions >> OFFSET_BITS).tolist()
    offsets = (positions & OFFSET_MASK).tolist()
    ids = [window_id(topic, p, off) for p, off in zip(parts, offsets, strict=True)]
    starts, ends = window_start.tolist(), window_end.tolist()
    score_l, thr_l, anom_l, lik_l = (
        scores.tolist(),
        thresholds.tolist(),
        anomalous.tolist(),
        likelihood.tolist(),
    )
    if not all(bool(np.isfinite(a).all()) for a in numbers):
        errors = channel_errors.tolist()
        return [
            encode_score(
                window_id=ids[i],
                sensor=sensors[i],
                window_start=starts[i],
                window_end=ends[i],
                score=score_l[i],
                threshold=thr_l[i],
                anomalous=anom_l[i],
                likelihood=lik_l[i],
                channels=dict(zip(channels, errors[i], strict=True)),
                model=model,
                partition=parts[i],
                offset=offsets[i],
            )
            for i in range(n)
        ]
    # OPT_SORT_KEYS sorts nested objects too: channels go in name order (code point
    # order, which is also UTF-8 byte order).
    order = sorted(range(len(channels)), key=channels.__getitem__)
    names = [channels[j] for j in order]
    errors = channel_errors[:, order].tolist()
    dumps = orjson.dumps
    return [
        dumps(
            {
                "anomalous": anom_l[i],
                "channels": dict(zip(names, errors[i], strict=True)),
                "id": ids[i],
                "likelihood": lik_l[i],
                "model": model,
                "offset": offsets[i],
                "partition": parts[i],
                "score": score_l[i],
                "sensor": sensors[i],
                "threshold": thr_l[i],
                "window_end": ends[i],
                "window_start": starts[i],
            }
        )
        for i in range(n)
    ]


def encode_alert(event: AlertEvent) -> bytes:
    """One alert record (see schemas/alert.schema.json)."""
    return orjson.dumps(
        {
            "state": event.state,
            "id": event.id,
            "sensor": event.sensor,
            "started": event.started,
            "ended": event.ended,
            "peak_score": _num(event.peak_score),
            "threshold": _num(event.threshold),
            "top_channels": [
                {"channel": name, "error": _num(err)} for name, err in event.top_channels
            ],
            "first_position": event.first_position,
            "position": event.position,
        },
        option=orjson.OPT_SORT_KEYS,
    )
