"""Out-of-fold evaluation: a setting chosen with labels is judged on files it never saw.

A benchmark's files are dealt into ``k`` folds. For each fold, every setting that
labels choose (an alarm level, a threshold) is chosen on the other folds' files and
applied, unchanged, to the held-out fold; the figures reported pool the held-out
results only. A figure obtained on the files whose labels chose the setting says how
well the setting fits those files, not how the detector will do on the next incident.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from streamer.errors import ConfigError

__all__ = ["FoldChoice", "assign_folds", "choose_out_of_fold"]

C = TypeVar("C")


def assign_folds(n_items: int, k: int) -> list[int]:
    """The fold of each of ``n_items`` items (in their given order): item ``i`` in ``i % k``.

    Dealt round robin, so files that sit together in a benchmark's order (often
    similar experiments) are spread over the folds, and the assignment is reproducible
    without a random seed.

    Raises:
        ConfigError: ``k`` is below 2 or above ``n_items``.
    """
    if k < 2 or k > n_items:
        raise ConfigError(f"--folds {k}: need 2 to {n_items} folds for {n_items} files")
    return [i % k for i in range(n_items)]


@dataclass(frozen=True, slots=True)
class FoldChoice(Generic[C]):
    """The candidate chosen for one fold, and its objective on the other folds."""

    fold: int
    held_out: list[int]  # item indices of the fold
    chosen: C
    objective: float  # on the other folds' items


def choose_out_of_fold(
    folds: Sequence[int],
    candidates: Sequence[C],
    objective: Callable[[list[int], C], float],
) -> list[FoldChoice[C]]:
    """For each fold, the candidate that maximises ``objective`` on the other folds.

    ``objective(items, candidate)`` scores a candidate on the items (indices) it is
    given; it never sees the held-out fold. Ties go to the first candidate in order,
    so order ``candidates`` from the most conservative.
    """
    if not candidates:
        raise ConfigError("no candidate settings to choose from")
    out: list[FoldChoice[C]] = []
    for fold in sorted(set(folds)):
        train = [i for i, f in enumerate(folds) if f != fold]
        held = [i for i, f in enumerate(folds) if f == fold]
        best, best_value = candidates[0], float("-inf")
        for cand in candidates:
            value = objective(train, cand)
            if value > best_value:
                best, best_value = cand, value
        out.append(FoldChoice(fold, held, best, best_value))
    return out
