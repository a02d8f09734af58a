"""Out-of-fold evaluation: folds, choices that never see the held-out files, NAB and SKAB."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from streamer.config import parse_config
from streamer.errors import ConfigError
from streamer.evaluation.folds import assign_folds, choose_out_of_fold
from streamer.evaluation.metrics import Confusion, skab_confusion, skab_metrics
from streamer.evaluation.nab import (
    score_at_threshold,
    score_corpus,
    score_corpus_out_of_fold,
)
from streamer.evaluation.nab_corpus import PROFILE_KEYS, STANDARD_PROFILES
from streamer.protocols import (
    SKAB_ALERT_RULES,
    SKAB_DEFAULTS,
    SKAB_LEVELS,
    Alarm,
    SkabFile,
    alert_decisions,
    eval_skab,
    skab_alarms,
    skab_files,
    skab_score_files,
)
from tests.evaluation.test_nab import random_corpus
from tests.test_cli_offline import make_skab


class TestAssignFolds:
    def test_round_robin(self) -> None:
        assert assign_folds(7, 3) == [0, 1, 2, 0, 1, 2, 0]

    @pytest.mark.parametrize("k", [0, 1, 6])
    def test_impossible_counts_name_the_value(self, k: int) -> None:
        with pytest.raises(ConfigError, match=f"--folds {k}: need 2 to 5"):
            assign_folds(5, k)


class TestChooseOutOfFold:
    def test_objective_never_sees_the_held_out_items(self) -> None:
        folds = assign_folds(6, 3)
        seen: list[tuple[list[int], int]] = []

        def objective(items: list[int], cand: int) -> float:
            seen.append((items, cand))
            return float(cand)

        choices = choose_out_of_fold(folds, [1, 2, 3], objective)
        assert [c.held_out for c in choices] == [[0, 3], [1, 4], [2, 5]]
        for c in choices:
            assert c.chosen == 3
        for items, _ in seen:
            assert len(items) == 4
        # Each fold's objective calls had exactly the other folds' items.
        for c, (items, _) in zip(choices, seen[::3], strict=True):
            assert not set(items) & set(c.held_out)

    def test_each_fold_gets_the_best_candidate_on_the_others(self) -> None:
        # Item i prefers candidate i % 2: fold 0 holds items 0 and 2 (even), so the
        # others (1, 3: odd) prefer candidate 1, and the other way round for fold 1.
        folds = assign_folds(4, 2)

        def objective(items: list[int], cand: int) -> float:
            return float(sum(1 for i in items if i % 2 == cand))

        assert [c.chosen for c in choose_out_of_fold(folds, [0, 1], objective)] == [1, 0]

    def test_ties_go_to_the_first_candidate(self) -> None:
        choices = choose_out_of_fold([0, 1], ["high", "low"], lambda items, c: 1.0)
        assert [c.chosen for c in choices] == ["high", "high"]

    def test_no_candidates_is_an_error(self) -> None:
        with pytest.raises(ConfigError, match="no candidate"):
            choose_out_of_fold([0, 1], [], lambda items, c: 0.0)


class TestNabOutOfFold:
    @pytest.mark.parametrize("seed", range(4))
    def test_matches_a_brute_force_reference(self, tmp_path: Path, seed: int) -> None:
        """Each fold's threshold maximises the other folds' score over every score value."""
        files, scores = random_corpus(tmp_path, seed)
        folds = assign_folds(len(files), 2)
        whole = score_corpus(files, scores)
        oof = score_corpus_out_of_fold(files, scores, folds)
        grid = sorted({1.1, *np.concatenate(list(scores.values())).tolist()}, reverse=True)
        for pname, profile in STANDARD_PROFILES.items():
            key = PROFILE_KEYS[pname]
            total = 0.0
            for fold in (0, 1):
                train = [f for f, k in zip(files, folds, strict=True) if k != fold]
                held = [f for f, k in zip(files, folds, strict=True) if k == fold]
                values = [score_at_threshold(train, scores, profile, t) for t in grid]
                best = grid[int(np.argmax(values))]
                assert oof[key].thresholds[fold] == best
                total += score_at_threshold(held, scores, profile, best)
            assert oof[key].score == pytest.approx(total, abs=1e-9)
            ref = whole[key]
            expected = 100 * (total - ref.null_score) / (ref.perfect_score - ref.null_score)
            assert oof[key].normalized == pytest.approx(expected, abs=1e-9)

    def test_a_folds_threshold_ignores_its_own_scores(self, tmp_path: Path) -> None:
        files, scores = random_corpus(tmp_path, 3)
        folds = assign_folds(len(files), 2)
        before = score_corpus_out_of_fold(files, scores, folds)
        changed = copy.deepcopy(scores)
        for f, k in zip(files, folds, strict=True):
            if k == 0:
                changed[f.name] = np.ones(len(f))  # fold 0 now alarms everywhere
        after = score_corpus_out_of_fold(files, changed, folds)
        for key in before:
            assert after[key].thresholds[0] == before[key].thresholds[0]


@pytest.mark.slow
def test_skab_alert_replay_matches_the_engine(tmp_path: Path) -> None:
    """alert_decisions on a file's scores is what the engine decided at that fixed level."""
    make_skab(tmp_path / "skab", files=1)
    settings = copy.deepcopy(SKAB_DEFAULTS)
    settings["train"].update(epochs=5, patience=5)
    settings["threshold"] = {"method": "fixed", "value": 5.0}
    cfg = parse_config(settings)
    (scored,) = skab_score_files(cfg, skab_files(tmp_path / "skab"), "cpu")
    level = float(settings["threshold"]["value"])
    replayed = alert_decisions(scored.scores, level, cfg)
    assert scored.decision.any() and not scored.decision.all()
    np.testing.assert_array_equal(replayed, scored.decision)
    # Another level decides otherwise: the replay follows the level it is given.
    assert not np.array_equal(alert_decisions(scored.scores, level * 4, cfg), scored.decision)


@pytest.mark.slow
def test_skab_folds_choose_level_and_alert_rule_on_the_other_folds(tmp_path: Path) -> None:
    """Each fold's alarm (level and alert rule) is the best pooled F1 on the other folds,
    and the held-out files are decided by it."""
    make_skab(tmp_path / "skab", files=4)
    settings = copy.deepcopy(SKAB_DEFAULTS)
    settings["train"].update(epochs=5, patience=5)
    cfg = parse_config(settings)
    paths = skab_files(tmp_path / "skab")
    got = eval_skab(cfg, tmp_path / "skab", scores_out=tmp_path / "out", folds=2)
    assert len(got["levels"]) == len(got["alert_rules"]) == 2
    assert all(level in SKAB_LEVELS for level in got["levels"])
    assert all(tuple(rule) in SKAB_ALERT_RULES for rule in got["alert_rules"])
    # Recompute each fold's choice independently from the same scores.
    scored = skab_score_files(cfg, paths, "cpu")
    folds = assign_folds(len(paths), 2)
    for fold, (level, rule) in enumerate(zip(got["levels"], got["alert_rules"], strict=True)):
        others = [f for f, k in zip(scored, folds, strict=True) if k != fold]

        def f1(alarm: Alarm, others: list[SkabFile] = others) -> float:
            parts = [skab_confusion(f.labels, alarm.decisions(f.scores)[400:]) for f in others]
            return skab_metrics(Confusion.pooled(parts))["f1"]

        best = max(f1(a) for a in skab_alarms())
        chosen = next(
            a
            for a in skab_alarms()
            if a.level == level and [a.open_after, a.open_within, a.close_after] == rule
        )
        assert f1(chosen) == best
        for f, k in zip(scored, folds, strict=True):
            if k == fold:
                written = np.loadtxt(
                    tmp_path / "out" / "valve9" / f"{f.path.stem}.csv",
                    delimiter=",",
                    skiprows=1,
                    usecols=2,
                )
                decided = chosen.decisions(f.scores)[400:]
                np.testing.assert_array_equal(written.astype(bool), decided)
