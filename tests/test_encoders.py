"""Deterministic encoding of the score and alert records."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from streamer.codec import split_position, to_position
from streamer.encoders import encode_alert, encode_score, encode_scores, window_id
from streamer.records import ScoredBatch
from streamer.scoring.alerts import AlertEvent
from streamer.windows import WindowBatch


class TestEncode:
    """Records are deterministic bytes with JSON-safe numbers."""

    @pytest.mark.parametrize("non_finite", [False, True])
    def test_batch_matches_one_by_one(self, non_finite: bool) -> None:
        """encode_scores gives encode_score's bytes for every window, nested keys sorted."""
        rng = np.random.default_rng(3)
        n = 50
        channels = ["zeta", "alpha", "\u00e9t\u00e9", "Beta", "a"]  # not in sorted order
        errors = rng.random((n, len(channels)))
        scores, thresholds, likelihood = rng.random(n), rng.random(n) + 0.5, rng.random(n)
        if non_finite:
            scores[3], errors[7, 2], likelihood[9] = np.inf, np.nan, -np.inf
        positions = to_position(rng.integers(0, 4, n), rng.integers(0, 10**9, n))
        sensors = [f"s{i % 7}" for i in range(n)]
        start = rng.random(n) * 1e9
        anomalous = scores > thresholds
        none = np.zeros(n, dtype=np.int64)
        windows = WindowBatch(
            none, np.zeros((n, 1, 1), np.float32), start, start + 6.3, none, positions
        )
        batch = ScoredBatch(
            windows,
            list(sensors),
            scores,
            errors,
            thresholds,
            anomalous,
            likelihood,
            anomalous,
            [],
            "m1",
        )
        got = encode_scores("in", batch, channels)
        want = []
        for i in range(n):
            p, off = split_position(int(positions[i]))
            want.append(
                encode_score(
                    window_id=window_id("in", p, off),
                    sensor=sensors[i],
                    window_start=float(start[i]),
                    window_end=float(start[i] + 6.3),
                    score=float(scores[i]),
                    threshold=float(thresholds[i]),
                    anomalous=bool(anomalous[i]),
                    likelihood=float(likelihood[i]),
                    channels=dict(zip(channels, errors[i].tolist(), strict=True)),
                    model="m1",
                    partition=p,
                    offset=off,
                )
            )
        assert got == want
        assert list(orjson.loads(got[0])["channels"]) == sorted(channels)

    def test_score_is_deterministic(self) -> None:
        """Same inputs, same bytes; non-finite numbers become null."""
        kw = {
            "window_id": "ab",
            "sensor": "s",
            "window_start": 1.0,
            "window_end": 2.0,
            "score": math.inf,
            "threshold": 0.5,
            "anomalous": True,
            "likelihood": 1.0,
            "channels": {"b": 0.1, "a": math.nan},
            "model": "m1",
            "partition": 0,
            "offset": 9,
        }
        one = encode_score(**kw)  # type: ignore[arg-type]
        assert one == encode_score(**kw)  # type: ignore[arg-type]
        rec = orjson.loads(one)
        assert rec["score"] is None and rec["channels"] == {"a": None, "b": 0.1}
        assert list(rec) == sorted(rec)

    def test_alert(self) -> None:
        """An open alert has a null end and its top channels as objects."""
        ev = AlertEvent("open", "id1", "s", 5.0, None, 3.0, 1.0, (("a", 2.0),), "0:5", "0:7")
        rec = orjson.loads(encode_alert(ev))
        assert rec["ended"] is None and rec["top_channels"] == [{"channel": "a", "error": 2.0}]

    def test_window_id_is_stable(self) -> None:
        """A window id depends on topic, partition and offset only."""
        assert window_id("t", 1, 5) == window_id("t", 1, 5)
        assert len({window_id("t", 1, 5), window_id("t", 5, 1), window_id("u", 1, 5)}) == 3
