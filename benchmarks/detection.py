"""Detection quality: presets x window scores x benchmarks, out of fold, with wall times.

Runs ``streamer eval`` (in process) for each combination on the built-in benchmark
settings with the preset and the score replaced, every label-chosen setting chosen
out of fold (``--folds``), and prints a Markdown table::

    .venv/bin/python benchmarks/detection.py --skab ../shared/data/skab --nab ../shared/data/nab

Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
from pathlib import Path
from typing import Any

from streamer.config import parse_config
from streamer.protocols import NAB_DEFAULTS, SKAB_DEFAULTS, eval_nab, eval_skab

PUBLISHED = {
    "skab": "Conv-AE 0.78 / 13.55 / 28.02",
    "nab": "HTM 70.5 / 62.6 / 75.2 (full corpus)",
}


def settings(defaults: dict[str, Any], preset: str, score: str) -> dict[str, Any]:
    """The benchmark's built-in settings with another preset and window score.

    ``novelty`` is the history novelty (``novelty.enabled``) in place of the model's
    window score; any other name is a model score, with the novelty off.
    """
    out = copy.deepcopy(defaults)
    out["train"]["preset"] = preset
    out["novelty"] = {"enabled": score == "novelty"}
    if score != "novelty":
        out["train"]["score"] = score
    return out


def skipped(bench: str, preset: str, score: str, scores: list[str]) -> bool:
    """Combinations that would repeat another row or that a benchmark cannot use."""
    if bench == "nab" and score == "max" and "mean" in scores:
        return True  # one channel: its maximum is its mean
    if score == "novelty":
        # SKAB counts every row of an anomaly, which needs an alarm held while it lasts;
        # the novelty reports events. The model does not score it, so one preset will do.
        return bench == "skab" or preset != "dense"
    return False


def main() -> None:
    """Run the matrix and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--skab", type=Path, default=None, help="SKAB data folder")
    ap.add_argument("--nab", type=Path, default=None, help="NAB data folder")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--presets", default="seed-dense,dense,conv1d")
    ap.add_argument("--scores", default="max,mean,mahalanobis,novelty")
    args = ap.parse_args()
    rows = [
        f"Out of fold, {args.folds} folds (what labels choose is chosen on the other folds).",
        "",
        "| benchmark | preset | score | figures | seconds |",
        "|---|---|---|---|---|",
    ]
    runs = [("skab", args.skab, SKAB_DEFAULTS), ("nab", args.nab, NAB_DEFAULTS)]
    for bench, data, defaults in runs:
        if data is None:
            continue
        scores = args.scores.split(",")
        for preset in args.presets.split(","):
            for score in scores:
                if skipped(bench, preset, score, scores):
                    continue
                cfg = parse_config(settings(defaults, preset, score), f"{bench}/{preset}/{score}")
                with contextlib.redirect_stdout(io.StringIO()):
                    if bench == "skab":
                        got = eval_skab(cfg, data, folds=args.folds)
                        text = (
                            f"F1 {got['f1']:.3f} / FAR {100 * got['far']:.2f} % / "
                            f"MAR {100 * got['mar']:.2f} %"
                        )
                    else:
                        got = eval_nab(cfg, data, folds=args.folds)
                        text = " / ".join(
                            f"{got[k]:.1f}" for k in ("standard", "reward_low_FP", "reward_low_FN")
                        )
                line = f"| {bench} | {preset} | {score} | {text} | {got['seconds']:.0f} |"
                print(line, file=sys.stderr, flush=True)
                rows.append(line)
        rows.append(f"| {bench} | published | | {PUBLISHED[bench]} | |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
