"""Cost and size of the per-sensor state records a commit round writes and a restore reads.

At every commit round the daemon writes one state record per changed sensor (its
threshold, alert state and ring anchor) and, on assignment, reads them back. This
builds a ``ThresholdBank`` of ``--sensors`` DSPOT thresholds, each holding ``--peaks``
learned peaks (about 100 right after calibration at the defaults; ``max_peaks``,
1,000, once a sensor has run for some 50,000 windows), and times, per record:

- *write*: export the threshold of a clone (as a round does) and serialise the
  record, as the daemon's ``_state_value`` does;
- *read*: parse the record and restore the threshold into a fresh bank.

It prints the record size and both rates. The sensors share one state, so the
figures are for comparing builds (run it in each, side by side), not a fleet's
exact mix.

Usage::

    .venv/bin/python benchmarks/state_records.py [--sensors 20000] [--peaks 100,1000]
"""

from __future__ import annotations

import argparse
import base64
import time
from typing import Any

import numpy as np
import orjson

from streamer.config import ThresholdConfig
from streamer.scoring.thresholds import ThresholdBank, make_threshold

_ARRAYS = ("peaks", "window", "ref")


def _floats(v: Any) -> list[float]:
    """An array field of any state version as a list (lists, or base64 little-endian f8)."""
    if isinstance(v, str):
        decoded: list[float] = np.frombuffer(base64.b64decode(v), dtype="<f8").tolist()
        return decoded
    return list(v)


def _with_peaks(bank: ThresholdBank, count: int, rng: np.random.Generator) -> dict[str, Any]:
    """A valid DSPOT state of the bank's prototype holding ``count`` peaks."""
    proto = bank.prototype.state_dict()
    state = {k: (_floats(v) if k in _ARRAYS else v) for k, v in proto.items()}
    old = state["peaks"]
    new = rng.exponential(np.mean(old) if old else 1.0, size=max(count - len(old), 0))
    state["peaks"] = (old + (new + 1e-9).tolist())[-count:]
    state["nt"] = max(state["nt"], count)
    state["n"] = max(state["n"], 50 * count)
    state["version"] = 1  # lists of numbers: every build reads these
    return state


def _record(sensor: str, threshold: dict[str, Any], version: int) -> bytes:
    return orjson.dumps(
        {
            "version": version,
            "sensor": sensor,
            "partition": 0,
            "upto": 123_456_789,
            "threshold": threshold,
            "alerts": {"kind": "alerts", "version": 1, "recent": [], "open": None},
            "ring": {"anchor_offset": 123_456_000, "anchor_count": 64},
        },
        option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
    )


def main() -> None:
    """Time state record writes and reads; print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=20_000)
    ap.add_argument("--peaks", default="100,1000", help="peaks per sensor, comma-separated")
    ap.add_argument("--calibration", type=int, default=5000)
    args = ap.parse_args()

    cfg = ThresholdConfig(method="dspot")
    rng = np.random.default_rng(0)
    proto = make_threshold(cfg.method, **cfg.params())
    proto.calibrate(rng.exponential(size=args.calibration))
    names = [f"sensor-{i:06d}" for i in range(args.sensors)]
    for count in [int(p) for p in args.peaks.split(",")]:
        bank = ThresholdBank(proto)
        state = _with_peaks(bank, count, rng)
        for s in names:
            bank.restore(s, state)
        version = int(bank.export(names[0])["version"])

        started = time.perf_counter()
        records = [_record(s, bank.export(s, of=bank.get(s).clone()), version) for s in names]  # type: ignore[union-attr]
        write_s = time.perf_counter() - started

        fresh = ThresholdBank(proto)
        started = time.perf_counter()
        for raw in records:
            rec = orjson.loads(raw)
            fresh.restore(rec["sensor"], rec["threshold"])
        read_s = time.perf_counter() - started

        size = sum(map(len, records)) / len(records)
        print(
            f"{count:>5} peaks: record {size:,.0f} bytes; write {args.sensors / write_s:,.0f} "
            f"records/s ({write_s * 1e6 / args.sensors:.1f} us each); read "
            f"{args.sensors / read_s:,.0f} records/s ({read_s * 1e6 / args.sensors:.1f} us each)"
        )


if __name__ == "__main__":
    main()
