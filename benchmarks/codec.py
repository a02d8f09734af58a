"""Codec micro-benchmark: decoding samples and encoding score records, per batch.

Decoding: samples/s of ``Decoder.decode`` on batches of valid messages.

Runs, in one process and on the same messages (the e2e suite's shape: one JSON object
per sample, a sensor id, epoch seconds and a list of channel values):

* **whole batch**: the decoder as the daemon runs it; a batch of valid samples is
  checked with C-level passes over the whole batch;
* **per message**: the same decoder with the whole-batch check switched off, so every
  message is validated by its own Python calls (what a batch holding a malformed
  message falls back to, to name it);
* **parse only**: the ``orjson.loads`` of each message (one C-level ``map`` over the
  batch) both paths start from.

Encoding: records/s of ``encode_scores`` (a batch of windows at once, as the daemon
publishes them) against ``encode_score`` called window by window, on the same scores.

Prints the rates and the ratios. Usage::

    .venv/bin/python benchmarks/codec.py [--sensors 1000] [--channels 5] [--batch 2000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import orjson

from streamer.codec import Decoder, split_position
from streamer.config import StreamConfig
from streamer.encoders import encode_score, encode_scores, window_id
from streamer.records import ScoredBatch
from streamer.windows import WindowBatch


class PerMessageDecoder(Decoder):
    """The decoder with the whole-batch check switched off."""

    def _all_valid(self, objs: list[object], keys: list[bytes | None]) -> Any:
        return None


def messages(sensors: int, channels: int, n: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` samples round-robin over ``sensors``, as the e2e benchmark's producer writes them."""
    rng = np.random.default_rng(0)
    values, keys = [], []
    for i in range(n):
        s = f"sensor-{i % sensors:05d}"
        values.append(
            orjson.dumps(
                {"sensor": s, "ts": 1.7e9 + i * 0.01, "values": rng.normal(size=channels).tolist()}
            )
        )
        keys.append(s.encode())
    return values, keys


def rates(
    fns: list[Any], batches: list[tuple[list[bytes], list[bytes]]], repeat: int
) -> list[float]:
    """Best samples/s of each ``fn(values, keys)`` over ``repeat`` passes through the batches.

    The decoders take turns pass by pass, so drift in the machine's speed (a shared VM)
    affects them alike.
    """
    total = sum(len(v) for v, _ in batches)
    best = [0.0] * len(fns)
    for _ in range(repeat):
        for j, fn in enumerate(fns):
            started = time.perf_counter()
            for v, k in batches:
                fn(v, k)
            best[j] = max(best[j], total / (time.perf_counter() - started))
    return best


def main() -> None:
    """Run the decoders and the encoders on the same data and print their rates."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2000, help="messages per batch (consume_batch)")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--piece", type=int, default=64, help="windows per published piece (chunk)")
    args = ap.parse_args()
    cfg = StreamConfig(channels=[f"c{i}" for i in range(args.channels)])
    values, keys = messages(args.sensors, args.channels, args.samples)
    batches = [
        (values[i : i + args.batch], keys[i : i + args.batch])
        for i in range(0, len(values), args.batch)
    ]
    whole, per = Decoder(cfg), PerMessageDecoder(cfg)
    got, dead = whole.decode(*batches[0])
    want, _ = per.decode(*batches[0])
    assert not dead and got.values.tobytes() == want.values.tobytes()

    def parse(v: list[bytes], _k: list[bytes]) -> None:
        list(map(orjson.loads, v))

    r_whole, r_per, r_parse = rates([whole.decode, per.decode, parse], batches, args.repeat)
    print(
        f"{args.samples:,} samples, {args.sensors:,} sensors x {args.channels} channels, "
        f"batches of {args.batch:,}, best of {args.repeat}"
    )
    print("| decoder | samples/s |\n|---|---|")
    print(f"| whole batch | {r_whole:,.0f} |")
    print(f"| per message | {r_per:,.0f} |")
    print(f"| parse only (orjson.loads of each message) | {r_parse:,.0f} |")
    print(f"whole batch / per message: {r_whole / r_per:.2f}x")
    r_batch, r_each = encode_rates(args.channels, 20_000, args.piece, args.repeat)
    print(
        f"\nscore records, 20,000 windows x {args.channels} channels, "
        f"pieces of {args.piece}, best of {args.repeat}"
    )
    print("| encoder | records/s |\n|---|---|")
    print(f"| encode_scores (a piece at a time) | {r_batch:,.0f} |")
    print(f"| encode_score per window | {r_each:,.0f} |")
    print(f"batch / per window: {r_batch / r_each:.2f}x")


def encode_rates(channels: int, windows: int, piece: int, repeat: int) -> tuple[float, float]:
    """Records/s of ``encode_scores`` on pieces and of ``encode_score`` per window, in turns."""
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(channels)]
    scores = rng.random(windows)
    cols: dict[str, Any] = {
        "sensors": [f"sensor-{i % 1000:05d}" for i in range(windows)],
        "positions": (np.int64(2) << 40) + np.arange(windows, dtype=np.int64),
        "window_start": 1.7e9 + np.arange(windows, dtype=np.float64),
        "window_end": 1.7e9 + 0.63 + np.arange(windows, dtype=np.float64),
        "scores": scores,
        "thresholds": scores + 0.5,
        "anomalous": scores > 0.9,
        "likelihood": rng.random(windows),
        "channel_errors": rng.random((windows, channels)),
        "model": "conv1d-0123456789ab",
    }

    def scored(lo: int, hi: int) -> ScoredBatch:
        none = np.zeros(hi - lo, dtype=np.int64)
        ts = cols["window_start"][lo:hi]
        w = WindowBatch(
            none,
            np.zeros((hi - lo, 1, 1), np.float32),
            ts,
            cols["window_end"][lo:hi],
            none,
            cols["positions"][lo:hi],
        )
        anomalous = cols["anomalous"][lo:hi]
        return ScoredBatch(
            w,
            cols["sensors"][lo:hi],
            cols["scores"][lo:hi],
            cols["channel_errors"][lo:hi],
            cols["thresholds"][lo:hi],
            anomalous,
            cols["likelihood"][lo:hi],
            anomalous,
            [],
            cols["model"],
        )

    # The daemon publishes a piece (inference.chunk windows, 64 by default) at a time.
    pieces = [scored(lo, min(lo + piece, windows)) for lo in range(0, windows, piece)]

    def batch() -> None:
        for one in pieces:
            encode_scores("sensors", one, names)

    def one_by_one() -> None:
        for i in range(windows):
            p, off = split_position(int(cols["positions"][i]))
            encode_score(
                window_id=window_id("sensors", p, off),
                sensor=cols["sensors"][i],
                window_start=float(cols["window_start"][i]),
                window_end=float(cols["window_end"][i]),
                score=float(scores[i]),
                threshold=float(cols["thresholds"][i]),
                anomalous=bool(cols["anomalous"][i]),
                likelihood=float(cols["likelihood"][i]),
                channels=dict(zip(names, cols["channel_errors"][i].tolist(), strict=True)),
                model="conv1d-0123456789ab",
                partition=p,
                offset=off,
            )

    best = [0.0, 0.0]
    for _ in range(repeat):
        for j, fn in enumerate((batch, one_by_one)):
            started = time.perf_counter()
            fn()
            best[j] = max(best[j], windows / (time.perf_counter() - started))
    return best[0], best[1]


if __name__ == "__main__":
    main()
