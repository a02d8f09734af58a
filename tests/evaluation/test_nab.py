"""NAB scorer: loading, scoring rules, the threshold sweep and results files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from streamer.errors import ConfigError, DataError
from streamer.evaluation.nab import (
    scaled_sigmoid,
    score_at_threshold,
    score_corpus,
    threshold_curve,
    write_nab_results,
)
from streamer.evaluation.nab_corpus import (
    STANDARD_PROFILES,
    CostProfile,
    NabFile,
    load_nab_corpus,
    load_nab_profiles,
    probation_length,
)

STANDARD = STANDARD_PROFILES["standard"]
T0 = datetime(2020, 1, 1)
STEP = timedelta(minutes=5)


def stamp(i: int) -> str:
    """Timestamp text of row ``i`` as NAB writes it in data files."""
    return (T0 + i * STEP).strftime("%Y-%m-%d %H:%M:%S")


def make_corpus(
    root: Path,
    specs: Mapping[str, tuple[int, Sequence[tuple[int, int]]]],
    profiles: object | None = None,
) -> Path:
    """Write a NAB-layout folder: ``name -> (rows, windows as inclusive row ranges)``."""
    labels: dict[str, list[list[str]]] = {}
    for name, (n, windows) in specs.items():
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["timestamp,value"] + [f"{stamp(i)},{math.sin(i / 7.0):.6f}" for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
        labels[name] = [[stamp(a) + ".000000", stamp(b) + ".000000"] for a, b in windows]
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    if profiles is not None:
        (root / "profiles.json").write_text(json.dumps(profiles))
    return root


def spikes(f: NabFile, rows: Sequence[int], value: float = 1.0) -> NDArray[np.float64]:
    """Scores that are zero except ``value`` at ``rows``."""
    s = np.zeros(len(f))
    s[list(rows)] = value
    return s


def nab_reference_curve(
    files: Sequence[NabFile], scores: Mapping[str, NDArray[np.float64]], profile: CostProfile
) -> list[tuple[float, float]]:
    """NAB's Sweeper, row by row in plain Python: (threshold, score) pairs from 1.1 down."""

    def sig(x: float) -> float:
        return -1.0 if x > 3.0 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0

    points: list[tuple[float, float, str | None]] = []
    for f in files:
        ts = list(f.timestamps)
        pending = [(f.timestamps[a], f.timestamps[b]) for a, b in f.windows]
        probation = min(math.floor(0.15 * len(ts)), 0.15 * 5000)
        current: str | None = None
        right = width = 0
        prev_right: int | None = None
        prev_width = 0
        end_t = None
        for i, t in enumerate(ts):
            if pending and t == pending[0][0]:
                start_t, end_t = pending.pop(0)
                current = f"{f.name}|{start_t}"
                right = ts.index(end_t)
                width = right - ts.index(start_t) + 1
            if current is not None:
                weight = sig(-(right - i + 1) / width) * profile.tp_weight / sig(-1.0)
            elif prev_right is None:
                weight = -1.0 * profile.fp_weight
            else:
                weight = sig(abs(prev_right - i) / (prev_width - 1)) * profile.fp_weight
            if i >= probation:
                points.append((float(scores[f.name][i]), weight, current))
            if current is not None and t == end_t:
                prev_right, prev_width, current = i, width, None

    points.sort(key=lambda p: p[0], reverse=True)
    parts: dict[str | None, float] = {None: 0.0}
    for _, _, win in points:
        if win is not None:
            parts[win] = -profile.fn_weight
    curve: list[tuple[float, float]] = []
    threshold = 1.1
    for score, weight, win in points:
        if score != threshold:
            curve.append((threshold, sum(parts.values())))
            threshold = score
        parts[win] = parts[win] + weight if win is None else max(parts[win], weight)
    curve.append((threshold, sum(parts.values())))
    return curve


class TestProbationLength:
    """NAB's probationary period."""

    @pytest.mark.parametrize(
        ("rows", "expected"),
        [(100, 15), (4032, 604), (4730, 709), (4999, 749), (5000, 750), (22695, 750)],
    )
    def test_matches_nab_formula(self, rows: int, expected: int) -> None:
        """Probation is min(floor(0.15 * rows), 750)."""
        assert probation_length(rows) == expected


class TestScaledSigmoid:
    """NAB's scaled sigmoid."""

    def test_reference_points(self) -> None:
        """The left edge, right edge, one width past and beyond 3 match NAB's documented values."""
        got = scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.5]))
        np.testing.assert_allclose(got, [0.98661, 0.84828, 0.0, -0.98661, -1.0], atol=1e-5)


class TestLoadNabCorpus:
    """Loading a NAB-layout folder."""

    def test_loads_files_windows_and_probation(self, tmp_path: Path) -> None:
        """Files come back sorted with row-index windows, probation and parsed columns."""
        make_corpus(tmp_path, {"b/two.csv": (200, [(50, 59), (120, 140)]), "a/one.csv": (40, [])})
        files = load_nab_corpus(tmp_path)
        assert [f.name for f in files] == ["a/one.csv", "b/two.csv"]
        one, two = files
        assert one.windows == ()
        assert one.probation == 6
        assert two.windows == ((50, 59), (120, 140))
        assert two.probation == 30
        assert two.timestamps.dtype == np.dtype("datetime64[ns]")
        assert two.timestamps[1] - two.timestamps[0] == np.timedelta64(5, "m")
        assert two.values[7] == pytest.approx(math.sin(1.0))

    def test_repeated_timestamps_are_positional(self, tmp_path: Path) -> None:
        """A repeated timestamp outside window limits loads, and windows are row positions."""
        make_corpus(tmp_path, {"c/f.csv": (100, [(60, 70)])})
        path = tmp_path / "data" / "c" / "f.csv"
        lines = path.read_text().splitlines()
        lines.insert(31, lines[30])  # row 29 repeated, like NAB's DST files
        path.write_text("\n".join(lines) + "\n")
        (f,) = load_nab_corpus(tmp_path)
        assert len(f) == 101
        assert f.windows == ((61, 71),)

    def test_profiles_fallback_and_file(self, tmp_path: Path) -> None:
        """Without profiles.json the standard three are used; with it, its weights are read."""
        make_corpus(tmp_path, {"a/f.csv": (30, [])})
        assert load_nab_profiles(tmp_path) == dict(STANDARD_PROFILES)
        custom = {"mine": {"CostMatrix": {"tpWeight": 2, "fpWeight": 0.5, "fnWeight": 3.0}}}
        make_corpus(tmp_path, {"a/f.csv": (30, [])}, profiles=custom)
        assert load_nab_profiles(tmp_path) == {"mine": CostProfile(2.0, 0.5, 3.0)}

    def test_malformed_profile_raises(self, tmp_path: Path) -> None:
        """A profile without a numeric weight names the profile and key."""
        bad = {"p": {"CostMatrix": {"tpWeight": 1.0, "fpWeight": "x", "fnWeight": 1.0}}}
        make_corpus(tmp_path, {"a/f.csv": (30, [])}, profiles=bad)
        with pytest.raises(DataError, match=r"'p' CostMatrix\.fpWeight"):
            load_nab_profiles(tmp_path)

    def test_window_timestamp_not_in_file_raises(self, tmp_path: Path) -> None:
        """A window limit that matches no row names the label key."""
        make_corpus(tmp_path, {"a/f.csv": (50, [(10, 20)])})
        labels = {"a/f.csv": [["2020-01-01 00:01:00.000000", stamp(20)]]}
        (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
        with pytest.raises(DataError, match=r"'a/f\.csv'.*matches 0 rows"):
            load_nab_corpus(tmp_path)

    def test_unlabelled_data_file_raises(self, tmp_path: Path) -> None:
        """A data file missing from the label file is named."""
        make_corpus(tmp_path, {"a/f.csv": (50, [])})
        (tmp_path / "labels" / "combined_windows.json").write_text("{}")
        with pytest.raises(DataError, match=r"no entry for data file 'a/f\.csv'"):
            load_nab_corpus(tmp_path)

    def test_label_without_data_file_raises(self, tmp_path: Path) -> None:
        """A label key whose data file is missing is named."""
        make_corpus(tmp_path, {"a/f.csv": (50, [])})
        labels: dict[str, list[list[str]]] = {"a/f.csv": [], "a/gone.csv": []}
        (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
        with pytest.raises(DataError, match=r"'a/gone\.csv' has no data file"):
            load_nab_corpus(tmp_path)

    def test_bad_value_raises(self, tmp_path: Path) -> None:
        """A non-numeric value names the file and line."""
        make_corpus(tmp_path, {"a/f.csv": (20, [])})
        path = tmp_path / "data" / "a" / "f.csv"
        path.write_text(path.read_text().replace(",0.000000", ",oops", 1))
        with pytest.raises(DataError, match=r"a/f\.csv: line 2"):
            load_nab_corpus(tmp_path)

    def test_bad_header_raises(self, tmp_path: Path) -> None:
        """A file without timestamp and value columns is rejected."""
        make_corpus(tmp_path, {"a/f.csv": (20, [])})
        path = tmp_path / "data" / "a" / "f.csv"
        path.write_text(path.read_text().replace("timestamp,value", "time,val"))
        with pytest.raises(DataError, match="header"):
            load_nab_corpus(tmp_path)

    def test_overlapping_windows_raise(self, tmp_path: Path) -> None:
        """Overlapping or unsorted windows are rejected."""
        make_corpus(tmp_path, {"a/f.csv": (100, [(40, 60), (50, 70)])})
        with pytest.raises(DataError, match="sorted and disjoint"):
            load_nab_corpus(tmp_path)

    def test_missing_labels_file_raises(self, tmp_path: Path) -> None:
        """A folder without labels/combined_windows.json is rejected."""
        make_corpus(tmp_path, {"a/f.csv": (20, [])})
        (tmp_path / "labels" / "combined_windows.json").unlink()
        with pytest.raises(DataError, match=r"combined_windows\.json"):
            load_nab_corpus(tmp_path)


@pytest.fixture
def two_files(tmp_path: Path) -> list[NabFile]:
    """One file with two windows and one without anomalies."""
    make_corpus(tmp_path, {"x/a.csv": (400, [(100, 139), (250, 289)]), "y/b.csv": (300, [])})
    return load_nab_corpus(tmp_path)


class TestScoringRules:
    """NAB's window, false-positive and probation rules."""

    def test_perfect_detector_scores_100(self, two_files: list[NabFile]) -> None:
        """Detecting exactly at every window start and nowhere else normalises to 100."""
        a, b = two_files
        scores = {a.name: spikes(a, [100, 250]), b.name: spikes(b, [])}
        for result in score_corpus(two_files, scores).values():
            assert result.normalized == pytest.approx(100.0)
            assert result.score == pytest.approx(result.perfect_score)
            assert result.threshold == 1.0

    @pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
    def test_constant_detector_scores_0(self, two_files: list[NabFile], level: float) -> None:
        """A constant detector, like NAB's null detector, normalises to 0 on every profile."""
        scores = {f.name: np.full(len(f), level) for f in two_files}
        for result in score_corpus(two_files, scores).values():
            assert result.normalized == pytest.approx(0.0)
            assert result.score == pytest.approx(result.null_score)

    def test_null_and_perfect_baselines(self, two_files: list[NabFile]) -> None:
        """The null score is -fnWeight per window and the perfect score tpWeight per window."""
        scores = {f.name: np.zeros(len(f)) for f in two_files}
        results = score_corpus(two_files, scores)
        assert (results["standard"].null_score, results["standard"].perfect_score) == (-2.0, 2.0)
        assert results["reward_low_FN"].null_score == -4.0

    def test_output_keys(self, two_files: list[NabFile]) -> None:
        """NAB profile names map to the CLI's short keys."""
        scores = {f.name: np.zeros(len(f)) for f in two_files}
        assert list(score_corpus(two_files, scores)) == [
            "standard",
            "reward_low_FP",
            "reward_low_FN",
        ]

    def test_right_edge_detection_earns_almost_nothing(self, two_files: list[NabFile]) -> None:
        """A detection on a window's last row earns about 0 instead of about 1."""
        a, b = two_files
        scores = {a.name: spikes(a, [139, 250]), b.name: spikes(b, [])}
        # Window 2 is caught at its start (+1); window 1 only at its right edge.
        edge_credit = score_at_threshold(two_files, scores, STANDARD, 0.5) - 1.0
        expected = scaled_sigmoid(np.array([-1 / 40, -1.0]))  # window 1 is 40 rows wide
        assert edge_credit == pytest.approx(expected[0] / expected[1])
        assert 0.0 < edge_credit < 0.07

    def test_earlier_detection_in_window_earns_more(self, two_files: list[NabFile]) -> None:
        """Credit falls as the first detection moves right through the window."""
        a, b = two_files
        credits = [
            score_at_threshold(
                two_files, {a.name: spikes(a, [r]), b.name: spikes(b, [])}, STANDARD, 0.5
            )
            for r in (100, 110, 120, 130, 139)
        ]
        assert credits == sorted(credits, reverse=True)

    def test_only_earliest_detection_counts(self, two_files: list[NabFile]) -> None:
        """Extra detections later in an already-detected window change nothing."""
        a, b = two_files
        once = {a.name: spikes(a, [100, 250]), b.name: spikes(b, [])}
        many = {a.name: spikes(a, [100, 101, 130, 250, 289]), b.name: spikes(b, [])}
        assert score_at_threshold(two_files, many, STANDARD, 0.5) == pytest.approx(
            score_at_threshold(two_files, once, STANDARD, 0.5)
        )

    def test_false_positive_just_after_window_costs_less(self, two_files: list[NabFile]) -> None:
        """An FP right after a window costs less than one far after it or before any window."""
        a, b = two_files
        detected = [100, 250]

        def with_fp(f: NabFile, row: int) -> float:
            rows = {a.name: detected, b.name: []}
            rows[f.name] = [*rows[f.name], row]
            scores = {g.name: spikes(g, rows[g.name]) for g in two_files}
            return score_at_threshold(two_files, scores, STANDARD, 0.5) - 2.0

        near, mid, far = with_fp(a, 140), with_fp(a, 175), with_fp(a, 399)
        before_any = with_fp(b, 200)
        assert 0.0 > near > mid > far
        assert near > -0.01
        assert far == pytest.approx(-0.11, abs=1e-5)
        assert before_any == pytest.approx(-0.11)

    def test_detection_in_probation_is_ignored(self, two_files: list[NabFile]) -> None:
        """Detections inside probation neither cost nor count, even at score 1."""
        a, b = two_files
        assert a.probation == 60
        assert b.probation == 45
        scores = {a.name: spikes(a, [0, 30, 59]), b.name: spikes(b, [10, 44])}
        result = score_corpus(two_files, scores)["standard"]
        assert result.score == pytest.approx(-2.0)
        assert result.normalized == pytest.approx(0.0)
        assert score_at_threshold(two_files, scores, STANDARD, 0.5) == pytest.approx(-2.0)

    def test_nan_in_probation_is_accepted(self, two_files: list[NabFile]) -> None:
        """NaN scores inside probation are allowed and ignored."""
        a, b = two_files
        sa, sb = spikes(a, [100, 250]), spikes(b, [])
        sa[: a.probation] = np.nan
        sb[: b.probation] = np.nan
        assert score_corpus(two_files, {a.name: sa, b.name: sb})[
            "standard"
        ].normalized == pytest.approx(100.0)

    def test_window_inside_probation_is_not_charged(self, tmp_path: Path) -> None:
        """A window wholly inside probation is never missed, but still counts toward perfect."""
        make_corpus(tmp_path, {"a/f.csv": (400, [(10, 20), (200, 220)])})
        (f,) = load_nab_corpus(tmp_path)
        result = score_corpus([f], {f.name: np.zeros(len(f))})["standard"]
        assert result.null_score == pytest.approx(-1.0)
        assert result.perfect_score == pytest.approx(2.0)

    def test_fn_weight_doubles_in_reward_low_fn(self, two_files: list[NabFile]) -> None:
        """A missed window costs 2 under reward_low_FN and 1 under standard."""
        a, b = two_files
        scores = {a.name: spikes(a, [100]), b.name: spikes(b, [])}
        low_fn = STANDARD_PROFILES["reward_low_FN_rate"]
        assert score_at_threshold(two_files, scores, STANDARD, 0.5) == pytest.approx(1.0 - 1.0)
        assert score_at_threshold(two_files, scores, low_fn, 0.5) == pytest.approx(1.0 - 2.0)

    def test_fp_weight_doubles_in_reward_low_fp(self, two_files: list[NabFile]) -> None:
        """A far false positive costs 0.22 under reward_low_FP and 0.11 under standard."""
        a, b = two_files
        scores = {a.name: spikes(a, [100, 250]), b.name: spikes(b, [100])}
        low_fp = STANDARD_PROFILES["reward_low_FP_rate"]
        assert score_at_threshold(two_files, scores, STANDARD, 0.5) == pytest.approx(2.0 - 0.11)
        assert score_at_threshold(two_files, scores, low_fp, 0.5) == pytest.approx(2.0 - 0.22)

    def test_invalid_scores_raise(self, two_files: list[NabFile]) -> None:
        """Missing files, wrong lengths and out-of-range scores after probation are rejected."""
        a, b = two_files
        with pytest.raises(DataError, match=r"no anomaly scores for 'y/b\.csv'"):
            score_corpus(two_files, {a.name: np.zeros(len(a))})
        with pytest.raises(DataError, match="shape"):
            score_corpus(two_files, {a.name: np.zeros(3), b.name: np.zeros(len(b))})
        bad = np.zeros(len(a))
        bad[200] = 1.5
        with pytest.raises(DataError, match="row 200"):
            score_corpus(two_files, {a.name: bad, b.name: np.zeros(len(b))})
        bad[200] = np.nan
        with pytest.raises(DataError, match="row 200"):
            score_corpus(two_files, {a.name: bad, b.name: np.zeros(len(b))})


def random_corpus(root: Path, seed: int) -> tuple[list[NabFile], dict[str, NDArray[np.float64]]]:
    """Small random corpus with windows anywhere (inside probation too) and tied scores."""
    rng = np.random.default_rng(seed)
    specs: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    for k in range(4):
        n = int(rng.integers(60, 260))
        cuts = np.sort(rng.choice(np.arange(1, n), size=2 * int(rng.integers(0, 4)), replace=False))
        specs[f"c{k % 2}/f{k}.csv"] = (n, [(int(s), int(e)) for s, e in cuts.reshape(-1, 2)])
    files = load_nab_corpus(make_corpus(root, specs))
    # Rounded scores so that many rows share a value, as real detectors' do.
    scores = {f.name: np.round(rng.beta(0.4, 2.0, len(f)), 2) for f in files}
    return files, scores


class TestThresholdSweep:
    """The corpus-wide threshold optimisation."""

    @pytest.mark.parametrize("seed", range(8))
    def test_curve_matches_nab_reference(self, tmp_path: Path, seed: int) -> None:
        """Every (threshold, score) pair equals a row-by-row port of NAB's sweeper."""
        files, scores = random_corpus(tmp_path, seed)
        for profile in STANDARD_PROFILES.values():
            thresholds, values = threshold_curve(files, scores, profile)
            ref = nab_reference_curve(files, scores, profile)
            np.testing.assert_array_equal(thresholds, [t for t, _ in ref])
            np.testing.assert_allclose(values, [s for _, s in ref], rtol=0, atol=1e-9)

    @pytest.mark.parametrize("seed", range(8))
    def test_best_threshold_is_brute_force_maximum(self, tmp_path: Path, seed: int) -> None:
        """The chosen threshold maximises the score over a brute-force grid of thresholds."""
        files, scores = random_corpus(tmp_path, seed)
        # k / 100 are the very doubles np.round(..., 2) produces for the scores.
        grid = np.r_[np.arange(101) / 100, 1.1]
        for name, profile in STANDARD_PROFILES.items():
            brute = [score_at_threshold(files, scores, profile, float(t)) for t in grid]
            result = score_corpus(files, scores, {name: profile}).popitem()[1]
            assert result.score == pytest.approx(max(brute), abs=1e-9)
            assert score_at_threshold(files, scores, profile, result.threshold) == pytest.approx(
                result.score, abs=1e-9
            )
            ref = nab_reference_curve(files, scores, profile)
            # NAB: stable sort by score, descending, so ties go to the higher threshold.
            assert result.threshold == sorted(ref, key=lambda p: p[1], reverse=True)[0][0]

    def test_ties_choose_highest_threshold(self, two_files: list[NabFile]) -> None:
        """When a lower threshold adds only later in-window rows, the higher one is kept."""
        a, b = two_files
        sa = spikes(a, [100, 250], 0.9)
        sa[[105, 260]] = 0.8
        result = score_corpus(two_files, {a.name: sa, b.name: spikes(b, [])})["standard"]
        assert result.threshold == 0.9
        assert result.normalized == pytest.approx(100.0)

    def test_counts_at_best_threshold(self, two_files: list[NabFile]) -> None:
        """Row counts at the chosen threshold cover every scorable row once."""
        a, b = two_files
        sa = spikes(a, [100, 101, 250])
        result = score_corpus(two_files, {a.name: sa, b.name: spikes(b, [])})["standard"]
        assert (result.tp, result.fp) == (3, 0)
        assert result.fn == 80 - 3
        assert result.tp + result.fp + result.fn + result.tn == (400 - 60) + (300 - 45)


class TestWriteNabResults:
    """NAB results files."""

    def test_layout_header_and_format(self, tmp_path: Path, two_files: list[NabFile]) -> None:
        """The file lands in <out>/<category>/<detector>_<name> with NAB's columns."""
        a, _ = two_files
        scores = np.linspace(0.0, 1.0, len(a))
        scores[:5] = np.nan
        path = write_nab_results(tmp_path / "out", "ae", a, a.timestamps, scores)
        assert path == tmp_path / "out" / "x" / "ae_a.csv"
        lines = path.read_text().splitlines()
        assert lines[0] == "timestamp,anomaly_score"
        assert lines[1] == f"{stamp(0)},0.0"
        ts, value = lines[-1].split(",")
        assert ts == stamp(len(a) - 1)
        assert float(value) == scores[-1]
        assert len(lines) == len(a) + 1

    def test_unix_seconds_timestamps(self, tmp_path: Path, two_files: list[NabFile]) -> None:
        """Float Unix seconds are written in the same text format."""
        a, _ = two_files
        seconds = a.timestamps.astype("datetime64[s]").astype(np.int64).astype(np.float64)
        path = write_nab_results(tmp_path, "d", a, seconds, np.zeros(len(a)))
        assert path.read_text().splitlines()[2].split(",")[0] == stamp(1)

    def test_bad_detector_name_raises(self, tmp_path: Path, two_files: list[NabFile]) -> None:
        """A detector name that is not a plain file-name part is rejected."""
        a, _ = two_files
        with pytest.raises(ConfigError, match="detector"):
            write_nab_results(tmp_path, "../x", a, a.timestamps, np.zeros(len(a)))
