"""Decode micro-benchmark: samples/s of ``Decoder.decode`` on batches of valid messages.

Runs, in one process and on the same messages (the e2e suite's shape: one JSON object
per sample, a sensor id, epoch seconds and a list of channel values):

* **whole batch**: the decoder as the daemon runs it; a batch of valid samples is
  checked with C-level passes over the whole batch;
* **per message**: the same decoder with the whole-batch check switched off, so every
  message is validated by its own Python calls (what a batch holding a malformed
  message falls back to, to name it);
* **parse only**: the single ``orjson.loads`` of the joined batch both paths start from.

Prints samples/s for each and the ratio. Usage::

    .venv/bin/python benchmarks/decode.py [--sensors 1000] [--channels 5] [--batch 2000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import orjson

from streamer.codec import Decoder
from streamer.config import StreamConfig


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
    """Run the three decoders on the same batches and print samples/s."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2000, help="messages per batch (consume_batch)")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
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
        orjson.loads(b"[" + b"\n,".join(v) + b"]")

    r_whole, r_per, r_parse = rates([whole.decode, per.decode, parse], batches, args.repeat)
    print(
        f"{args.samples:,} samples, {args.sensors:,} sensors x {args.channels} channels, "
        f"batches of {args.batch:,}, best of {args.repeat}"
    )
    print("| decoder | samples/s |\n|---|---|")
    print(f"| whole batch | {r_whole:,.0f} |")
    print(f"| per message | {r_per:,.0f} |")
    print(f"| parse only (orjson.loads of the batch) | {r_parse:,.0f} |")
    print(f"whole batch / per message: {r_whole / r_per:.2f}x")


if __name__ == "__main__":
    main()
