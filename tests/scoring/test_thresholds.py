"""Adaptive thresholds: one contract suite over every kind, then each kind's own maths."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.config import ThresholdConfig
from streamer.errors import ConfigError, DataError, StateError
from streamer.scoring.thresholds import (
    DspotThreshold,
    FixedThreshold,
    QuantileThreshold,
    SpotThreshold,
    Threshold,
    ThresholdBank,
    ThresholdResult,
    fit_gpd,
    make_threshold,
    pack_floats,
    unpack_floats,
)
from tests.helpers import THRESHOLD_ARRAYS as ARRAYS
from tests.helpers import threshold_as_version_1

CALIBRATION = np.random.default_rng(7).exponential(size=3000)
STREAM = np.random.default_rng(8).exponential(size=600)
STREAM[[50, 51, 300]] = [40.0, 55.0, 80.0]  # a few certain alarms inside the stream

FACTORIES: dict[str, Callable[[], Threshold]] = {
    "spot": lambda: SpotThreshold(risk=1e-3),
    "dspot": lambda: DspotThreshold(risk=1e-3, depth=20),
    "quantile": lambda: QuantileThreshold(quantile=0.99, window=500, margin=1.5),
    "fixed": lambda: FixedThreshold(float(np.quantile(CALIBRATION, 0.99))),
}
ADAPTIVE = ["spot", "dspot", "quantile"]


def calibrated(kind: str) -> Threshold:
    th = FACTORIES[kind]()
    th.calibrate(CALIBRATION)
    return th


@pytest.fixture(params=sorted(FACTORIES))
def threshold(request: pytest.FixtureRequest) -> Threshold:
    return calibrated(request.param)


def same_result(a: ThresholdResult, b: ThresholdResult) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def concat(results: list[ThresholdResult]) -> ThresholdResult:
    return ThresholdResult(*(np.concatenate(parts) for parts in zip(*results, strict=True)))


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(state, allow_nan=False))
    return out


def orjson_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """Through orjson, as the daemon writes and reads state records (inf and NaN -> null)."""
    json.dumps(state, allow_nan=False)  # only finite numbers: nothing would turn into null
    out: dict[str, Any] = orjson.loads(orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


# Window scores of a sample near the float32 limit: overflowed, failed, or merely huge.
HOSTILE = np.array([np.inf, np.nan, -np.inf, 3e38, float(np.finfo(np.float32).max), 1e301, 1.7e308])


def hostile(scores: np.ndarray, every: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` with a HOSTILE value every ``every`` points, and where they are."""
    out = scores.astype(np.float64)
    where = np.zeros(out.size, dtype=bool)
    where[::every] = True
    out[where] = np.resize(HOSTILE, int(where.sum()))
    return out, where


class TestThresholdContract:
    """Every threshold kind keeps the Threshold protocol's promises."""

    def test_value_is_finite_and_above_most_calibration_scores(self, threshold: Threshold) -> None:
        """The calibrated threshold is finite and above at least 95 % of the calibration scores."""
        assert math.isfinite(threshold.value)
        assert np.mean(threshold.value > CALIBRATION) > 0.95

    def test_step_returns_arrays_of_the_right_shape_and_dtype(self, threshold: Threshold) -> None:
        """step returns float64 thresholds, bool flags and float64 likelihoods, one per point."""
        res = threshold.step(STREAM.astype(np.float32))
        assert res.threshold.shape == res.anomalous.shape == res.likelihood.shape == STREAM.shape
        assert res.threshold.dtype == np.float64
        assert res.anomalous.dtype == np.bool_
        assert res.likelihood.dtype == np.float64
        assert np.all(np.isfinite(res.threshold))
        assert np.array_equal(res.anomalous, res.threshold < STREAM)

    def test_empty_batch_is_a_no_op(self, threshold: Threshold) -> None:
        """Stepping no points returns empty arrays and changes nothing."""
        before = threshold.state_dict()
        res = threshold.step(np.zeros(0))
        assert res.threshold.size == res.anomalous.size == res.likelihood.size == 0
        assert threshold.state_dict() == before

    def test_huge_score_alarms(self, threshold: Threshold) -> None:
        """A score far beyond anything seen is anomalous with likelihood near 1."""
        res = threshold.step(np.array([1e9]))
        assert res.anomalous.tolist() == [True]
        assert res.likelihood[0] > 0.999

    def test_alarmed_points_do_not_change_state(self, threshold: Threshold) -> None:
        """Points that alarm, non-finite ones included, leave the state exactly as it was."""
        before = threshold.state_dict()
        res = threshold.step(np.array([1e6, np.inf, np.nan, 1e9, -np.inf]))
        assert res.anomalous.all()
        assert threshold.state_dict() == before

    def test_overflowing_scores_alarm_unlearned_and_the_state_round_trips(
        self, threshold: Threshold
    ) -> None:
        """Scores of inf, NaN or near the float limits alarm and teach nothing; the state
        then holds only finite numbers, restores through orjson, and continues identically."""
        head, wild = hostile(STREAM[:200])
        tail, _ = hostile(STREAM[200:], every=7)
        twin = threshold.clone()
        res = threshold.step(head)
        assert res.anomalous[wild].all()
        assert np.isfinite(res.threshold).all()
        twin.step(head[~wild])  # the same stream without them
        assert threshold.state_dict() == twin.state_dict()
        restored = threshold.clone()
        restored.load_state_dict(orjson_round_trip(threshold.state_dict()))
        assert same_result(threshold.step(tail), restored.step(tail))
        assert threshold.state_dict() == restored.state_dict()

    def test_huge_calibration_keeps_state_finite_and_restorable(self, threshold: Threshold) -> None:
        """Calibrated on scores up to 1e150, inf still alarms and the state restores."""
        threshold.calibrate(CALIBRATION / CALIBRATION.max() * 1e150)
        res = threshold.step(np.array([np.inf, 1.7e308, np.nan, 1e140]))
        assert res.anomalous[:3].all() and np.isfinite(res.threshold).all()
        restored = threshold.clone()
        restored.load_state_dict(orjson_round_trip(threshold.state_dict()))
        assert threshold.state_dict() == restored.state_dict()

    def test_state_without_reference_is_the_state_less_its_sample(
        self, threshold: Threshold
    ) -> None:
        """state_dict(reference=False) is state_dict() without "ref", and nothing else."""
        threshold.step(STREAM)
        full = threshold.state_dict()
        bare = threshold.state_dict(reference=False)
        assert "ref" not in bare
        assert {k: v for k, v in full.items() if k != "ref"} == bare

    def test_likelihood_is_pure(self, threshold: Threshold) -> None:
        """likelihood() changes no state."""
        before = threshold.state_dict()
        threshold.likelihood(STREAM)
        assert threshold.state_dict() == before

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        xs=st.lists(
            st.floats(min_value=-10, max_value=1e6, allow_nan=False), min_size=1, max_size=40
        )
    )
    def test_likelihood_is_in_unit_interval_and_monotone(
        self, threshold: Threshold, xs: list[float]
    ) -> None:
        """The likelihood lies in [0, 1] and never decreases as the score grows."""
        lik = threshold.likelihood(np.sort(np.array(xs)))
        assert np.all((lik >= 0.0) & (lik <= 1.0))
        assert np.all(np.diff(lik) >= 0.0)

    def test_step_likelihood_is_the_likelihood_before_the_point(self, threshold: Threshold) -> None:
        """The likelihood step reports for a point equals likelihood() just before it."""
        for x in STREAM[:40]:
            expected = threshold.likelihood(np.array([x]))
            assert threshold.step(np.array([x])).likelihood[0] == expected[0]

    def test_clone_is_independent(self, threshold: Threshold) -> None:
        """Stepping a clone leaves the original untouched, and vice versa."""
        before = threshold.state_dict()
        twin = threshold.clone()
        twin.step(STREAM)
        assert threshold.state_dict() == before
        threshold.step(STREAM[:10])
        assert twin.state_dict() != before or isinstance(twin, FixedThreshold)

    def test_state_round_trip_through_json_continues_identically(
        self, threshold: Threshold
    ) -> None:
        """A state restored from JSON produces exactly the results the original does."""
        threshold.step(STREAM[:200])
        restored = threshold.clone()
        restored.load_state_dict(json_round_trip(threshold.state_dict()))
        assert same_result(threshold.step(STREAM[200:]), restored.step(STREAM[200:]))
        assert threshold.state_dict() == restored.state_dict()
        assert threshold.value == restored.value

    def test_state_dict_has_kind_and_version(self, threshold: Threshold) -> None:
        """The state dict names its kind and format version."""
        state = threshold.state_dict()
        assert state["kind"] in FACTORIES
        assert state["version"] == 2
        # Float arrays are packed, not lists of numbers.
        assert not any(isinstance(v, list) for v in state.values())

    def test_version_1_state_loads_and_continues_identically(self, threshold: Threshold) -> None:
        """A version-1 state (float arrays as JSON lists) restores exactly what it held."""
        threshold.step(STREAM[:200])
        v1 = threshold_as_version_1(threshold.state_dict())
        assert any(isinstance(v, list) for v in v1.values())
        restored = threshold.clone()
        restored.load_state_dict(json_round_trip(v1))
        assert threshold.state_dict() == restored.state_dict()
        assert same_result(threshold.step(STREAM[200:]), restored.step(STREAM[200:]))

    @pytest.mark.parametrize(
        "corrupt",
        [
            pytest.param(lambda s: {**s, "kind": "nope"}, id="wrong-kind"),
            pytest.param(lambda s: {**s, "version": 99}, id="wrong-version"),
            pytest.param(
                lambda s: {k: v for k, v in s.items() if k not in ("kind", "version")},
                id="no-header",
            ),
            pytest.param(lambda s: {"kind": s["kind"], "version": 1}, id="empty"),
            pytest.param(
                lambda s: {k: ("garbage!" if k in ARRAYS else v) for k, v in s.items()},
                id="garbage-arrays",
            ),
            pytest.param(
                lambda s: {k: (["garbage"] if k in ARRAYS else v) for k, v in s.items()},
                id="garbage-lists",
            ),
            pytest.param(
                lambda s: {k: ([True] if k in ARRAYS else v) for k, v in s.items()},
                id="booleans-as-numbers",
            ),
            pytest.param(
                lambda s: {
                    k: (pack_floats([1.0])[:-4] if k in ARRAYS else v) for k, v in s.items()
                },
                id="truncated-arrays",
            ),
            pytest.param(
                lambda s: {
                    k: (pack_floats([1.0, math.inf]) if k in ARRAYS else v) for k, v in s.items()
                },
                id="non-finite-arrays",
            ),
            pytest.param(lambda s: {**s, "version": True}, id="boolean-version"),
            pytest.param(
                lambda s: {k: (-1.0 if isinstance(v, float) else v) for k, v in s.items()},
                id="negative-numbers",
            ),
            pytest.param(
                lambda s: {k: (None if k not in ("kind", "version") else v) for k, v in s.items()},
                id="nulls",
            ),
            pytest.param(lambda s: ["not", "a", "dict"], id="not-a-mapping"),
        ],
    )
    def test_load_rejects_unusable_state(
        self, threshold: Threshold, corrupt: Callable[[dict[str, Any]], Any]
    ) -> None:
        """Wrong kind, wrong version or corrupt content raise StateError and change nothing."""
        state = threshold.state_dict()
        target = threshold.clone()
        with pytest.raises(StateError):
            target.load_state_dict(corrupt(state))
        assert target.state_dict() == state

    def test_calibrate_rejects_non_finite_scores(self, threshold: Threshold) -> None:
        """Calibration scores with a NaN raise ConfigError saying how many and where."""
        bad = CALIBRATION.copy()
        bad[17] = np.nan
        with pytest.raises(ConfigError, match=r"1 non-finite value.*index 17"):
            threshold.calibrate(bad)

    def test_calibrate_rejects_scores_beyond_1e300(self, threshold: Threshold) -> None:
        """A finite calibration score past 1e300 is refused: thresholds must stay finite."""
        bad = CALIBRATION.copy()
        bad[5] = 1e301
        with pytest.raises(ConfigError, match=r"within ±1e\+300.*index 5"):
            threshold.calibrate(bad)

    def test_calibrate_rejects_too_few_scores(self, threshold: Threshold) -> None:
        """Calibration with a handful of scores raises ConfigError with the count."""
        with pytest.raises(ConfigError, match=r"got 5"):
            threshold.calibrate(np.arange(5.0))

    def test_batching_does_not_change_results(self, threshold: Threshold) -> None:
        """Stepping a stream in pieces gives the same results and state as in one call."""
        twin = threshold.clone()
        whole = threshold.step(STREAM)
        parts = concat([twin.step(p) for p in np.array_split(STREAM, [1, 2, 51, 52, 53, 299, 400])])
        assert same_result(whole, parts)
        assert threshold.state_dict() == twin.state_dict()


class TestPackedFloats:
    """Float arrays in state dicts: base64 of little-endian float64, exact both ways."""

    def test_round_trip_is_bit_exact(self) -> None:
        """Every float64, the awkward ones included, comes back with the same bits."""
        values = np.array([0.1, -0.0, 5e-324, 1.7976931348623157e308, 1 / 3, math.pi])
        back = unpack_floats(pack_floats(values))
        assert back.dtype == np.float64 and back.flags.writeable
        assert back.tobytes() == values.astype("<f8").tobytes()

    def test_packed_is_smaller_than_json_numbers(self) -> None:
        """Packed values take 32 bytes per 3 values; JSON numbers of full precision more."""
        values = np.random.default_rng(3).exponential(size=999)
        assert len(pack_floats(values)) == 999 * 8 * 4 // 3
        assert len(pack_floats(values)) < 0.75 * len(json.dumps(values.tolist()))

    def test_read_only_arrays_are_still_checked(self) -> None:
        """Only the prototype's own (validated) sample skips the checks, not any read-only array."""
        spot = SpotThreshold(risk=1e-3)
        spot.calibrate(CALIBRATION)
        state = spot.state_dict()
        unsorted = np.frombuffer(np.array([3.0, 1.0, 2.0]).tobytes())
        assert not unsorted.flags.writeable
        with pytest.raises(StateError, match="ref must be sorted"):
            spot.clone().load_state_dict({**state, "ref": unsorted})

    @pytest.mark.parametrize(
        ("packed", "message"),
        [("not base64!", "not base64"), ("AAAAAAAA", "6 bytes is not a whole number")],
    )
    def test_malformed_is_refused_with_the_reason(self, packed: str, message: str) -> None:
        """Text that is not base64, or not whole float64 values, raises ValueError saying so."""
        with pytest.raises(ValueError, match=message):
            unpack_floats(packed)


class TestConstructorValidation:
    """Bad constructor arguments raise ConfigError naming the argument and the value."""

    @pytest.mark.parametrize(
        ("method", "params", "message"),
        [
            ("spot", {"risk": 1.5}, "risk must be in (0, 1), got 1.5"),
            ("spot", {"risk": 0.0}, "risk must be in (0, 1), got 0.0"),
            ("spot", {"level": 1.0}, "level must be in (0, 1), got 1.0"),
            ("spot", {"risk": 0.05, "level": 0.98}, "risk must be smaller than 1 - level"),
            ("spot", {"max_peaks": 3}, "max_peaks must be an integer >= 10, got 3"),
            ("spot", {"risk": float("nan")}, "risk must be finite, got nan"),
            ("spot", {"risk": "high"}, "risk must be a number, got 'high'"),
            ("dspot", {"depth": 0}, "depth must be an integer >= 1, got 0"),
            ("dspot", {"depth": 2.5}, "depth must be an integer >= 1, got 2.5"),
            ("quantile", {"quantile": 0.0}, "quantile must be in (0, 1], got 0.0"),
            ("quantile", {"window": 0}, "window must be an integer >= 1, got 0"),
            ("quantile", {"margin": 1.0}, "margin must be > 1"),
            ("fixed", {"value": 0.0}, "value must be > 0, got 0.0"),
            ("fixed", {"value": float("inf")}, "value must be finite, got inf"),
            ("spot", {"bogus": 1}, "bogus"),
        ],
    )
    def test_bad_argument_raises_config_error(
        self, method: Any, params: dict[str, Any], message: str
    ) -> None:
        """The message names the argument and its bad value."""
        with pytest.raises(ConfigError) as info:
            make_threshold(method, **params)
        assert message in str(info.value)

    def test_unknown_method_is_named(self) -> None:
        """An unknown method raises ConfigError naming it."""
        with pytest.raises(ConfigError, match="'median'"):
            make_threshold("median")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("method", "cls"),
        [
            ("spot", SpotThreshold),
            ("dspot", DspotThreshold),
            ("quantile", QuantileThreshold),
            ("fixed", FixedThreshold),
        ],
    )
    def test_factory_builds_each_kind(self, method: Any, cls: type) -> None:
        """make_threshold returns the class for each method name."""
        params = {"value": 1.0} if method == "fixed" else {}
        assert isinstance(make_threshold(method, **params), cls)

    @pytest.mark.parametrize("kind", ADAPTIVE)
    def test_uncalibrated_threshold_refuses_to_step(self, kind: str) -> None:
        """An adaptive threshold used before calibration raises StateError."""
        with pytest.raises(StateError, match="not calibrated"):
            FACTORIES[kind]().step(np.ones(3))


def gpd_sample(rng: np.random.Generator, gamma: float, sigma: float, n: int) -> np.ndarray:
    """Inverse-CDF sampling of a generalized Pareto distribution."""
    u = rng.random(n)
    if gamma == 0.0:
        return -sigma * np.log1p(-u)
    return sigma / gamma * ((1.0 - u) ** -gamma - 1.0)


class TestSpotTail:
    """SPOT's GPD fit and z_q against distributions with a known tail."""

    def test_exponential_quantile(self) -> None:
        """On Exp(1) calibration data z_q is within 10 % of the true quantile -log(risk)."""
        risk = 1e-4
        spot = SpotThreshold(risk=risk)
        spot.calibrate(np.random.default_rng(0).exponential(size=20_000))
        assert spot.value == pytest.approx(-math.log(risk), rel=0.10)
        _, gamma, sigma = spot.tail
        assert abs(gamma) < 0.1
        assert sigma == pytest.approx(1.0, rel=0.15)

    def test_gpd_quantile(self) -> None:
        """On GPD(0.2, 1) data z_q is within 10 % of the true quantile (median over 8 seeds)."""
        risk, g = 1e-4, 0.2
        truth = (risk**-g - 1.0) / g
        errors, gammas = [], []
        for seed in range(8):
            spot = SpotThreshold(risk=risk)
            spot.calibrate(gpd_sample(np.random.default_rng(seed), g, 1.0, 20_000))
            errors.append(spot.value / truth - 1.0)
            t, gamma, sigma = spot.tail
            gammas.append(gamma)
            # Excesses over t of a GPD are GPD with the same gamma and scale sigma + gamma t.
            assert sigma == pytest.approx(1.0 + g * t, rel=0.25)
        assert abs(float(np.median(errors))) < 0.10
        assert float(np.mean(gammas)) == pytest.approx(g, abs=0.05)

    @pytest.mark.parametrize("gamma", [-0.3, -0.1, 0.0, 0.25, 0.5])
    def test_fit_recovers_shape_and_scale(self, gamma: float) -> None:
        """fit_gpd recovers gamma and sigma from 5000 GPD draws."""
        peaks = gpd_sample(np.random.default_rng(1), gamma, 2.0, 5000)
        g, s = fit_gpd(peaks)
        assert g == pytest.approx(gamma, abs=0.06)
        assert s == pytest.approx(2.0, rel=0.08)

    def test_fit_is_the_maximum_likelihood(self) -> None:
        """No point of a fine (gamma, sigma) grid has a higher log-likelihood than the fit."""
        y = gpd_sample(np.random.default_rng(3), 0.15, 1.0, 300)

        def loglik(g: float, s: float) -> float:
            z = 1.0 + g * y / s
            if s <= 0 or np.any(z <= 0):
                return -math.inf
            return float(-y.size * math.log(s) - (1.0 + 1.0 / g) * np.log(z).sum())

        g_hat, s_hat = fit_gpd(y)
        best = loglik(g_hat, s_hat)
        for g in np.linspace(-0.4, 0.8, 61):
            for s in np.linspace(0.5, 1.5, 61):
                if abs(g) > 1e-9:
                    assert loglik(g, s) <= best + 1e-9

    def test_constant_calibration_gives_a_finite_threshold_above_it(self) -> None:
        """Constant calibration gives a finite z_q just above the constant, deterministically."""
        a, b = SpotThreshold(), SpotThreshold()
        a.calibrate(np.full(100, 0.5))
        b.calibrate(np.full(100, 0.5))
        assert 0.5 < a.value < 0.51
        assert a.state_dict() == b.state_dict()
        res = a.step(np.array([0.5, 0.5, 0.7]))
        assert res.anomalous.tolist() == [False, False, True]
        assert np.all(np.isfinite(res.likelihood))

    def test_all_zero_calibration(self) -> None:
        """All-zero calibration scores still give a positive finite threshold."""
        spot = SpotThreshold()
        spot.calibrate(np.zeros(50))
        assert 0.0 < spot.value < 1e-6

    def test_few_peaks_fall_back_to_an_exponential_tail(self) -> None:
        """With fewer than 5 peaks the tail is exponential with the peaks' mean as scale."""
        spot = SpotThreshold(risk=1e-3, level=0.98)
        spot.calibrate(np.r_[np.zeros(997), [1.0, 2.0, 3.0]])
        t, gamma, sigma = spot.tail
        assert (t, gamma, sigma) == (0.0, 0.0, 2.0)
        assert spot.value == pytest.approx(2.0 * math.log(3 / (1e-3 * 1000)))

    def test_peak_refits_and_normal_points_do_not(self) -> None:
        """A point between t and z_q moves z_q; a point below t leaves it alone."""
        spot = calibrated("spot")
        assert isinstance(spot, SpotThreshold)
        t = spot.tail[0]
        z = spot.value
        spot.step(np.array([t * 0.5]))
        assert spot.value == pytest.approx(z, rel=1e-3)  # only n moved, z_q is not refitted
        spot.step(np.array([(t + z) / 2]))
        assert spot.value != z

    def test_peaks_are_bounded(self) -> None:
        """At most max_peaks peaks are kept, while Nt keeps counting every peak."""
        spot = SpotThreshold(risk=1e-3, max_peaks=20)
        rng = np.random.default_rng(4)
        spot.calibrate(rng.exponential(size=2000))
        spot.step(rng.exponential(size=3000))
        state = spot.state_dict()
        assert unpack_floats(state["peaks"]).size == 20
        assert state["nt"] > 60

    @pytest.mark.parametrize("method", ["spot", "dspot"])
    def test_config_bounds_the_peaks(self, method: str) -> None:
        """threshold.max_peaks reaches the threshold: no sensor keeps more peaks than that."""
        cfg = ThresholdConfig(method=method, max_peaks=40)  # type: ignore[arg-type]
        th = make_threshold(cfg.method, **cfg.params())
        rng = np.random.default_rng(5)
        th.calibrate(rng.exponential(size=2000))
        th.step(rng.exponential(size=6000))
        state = th.state_dict()
        assert state["max_peaks"] == 40
        assert unpack_floats(state["peaks"]).size == 40 < state["nt"]

    @pytest.mark.parametrize("method", ["spot", "dspot"])
    @pytest.mark.parametrize("learned", [300, 3000], ids=["buffer-growing", "buffer-full"])
    def test_clones_learn_peaks_apart(self, method: str, learned: int) -> None:
        """A clone and its original share their peaks until either learns one, never after.

        Cloned while the peak buffer has room (growing) and once it is full (wrapping):
        each then learns peaks of its own stream, and both end as copies made from their
        JSON states (arrays of their own) end after the same streams.
        """
        rng = np.random.default_rng(6)
        th = make_threshold(method, risk=1e-3, max_peaks=60)  # type: ignore[arg-type]
        th.calibrate(rng.exponential(size=2000))
        th.step(rng.exponential(size=learned))
        twin = th.clone()
        # Shared until then: the memory a sensor's copy of the prototype saves.
        assert np.shares_memory(th._core.peaks, twin._core.peaks)  # type: ignore[attr-defined]
        apart = [th.clone(), th.clone()]
        for t in apart:
            t.load_state_dict(json_round_trip(th.state_dict()))
        mine, theirs = rng.exponential(size=400), rng.exponential(size=400)
        assert same_result(twin.step(theirs), apart[1].step(theirs))
        assert same_result(th.step(mine), apart[0].step(mine))
        assert same_result(twin.step(mine), apart[1].step(mine))
        assert th.state_dict() == apart[0].state_dict()
        assert twin.state_dict() == apart[1].state_dict()
        assert th.state_dict() != twin.state_dict()

    def test_likelihood_is_continuous_at_t(self) -> None:
        """Just below and just above t the likelihood agrees (both near 1 - Nt/n)."""
        spot = calibrated("spot")
        assert isinstance(spot, SpotThreshold)
        t = spot.tail[0]
        lo, hi = spot.likelihood(np.array([t, np.nextafter(t, np.inf)]))
        assert hi - lo < 1e-9
        assert lo == pytest.approx(0.98, abs=0.01)


class TestDspot:
    """DSPOT follows drift that SPOT cannot."""

    def test_follows_a_slow_linear_drift(self) -> None:
        """Under a linear drift DSPOT's false-alarm rate stays low while SPOT's explodes."""
        rng = np.random.default_rng(5)
        n = 12_000
        x = rng.exponential(size=n) + 0.005 * np.arange(n)  # drifts 0.5 % of the noise per point
        spot, dspot = SpotThreshold(risk=1e-3), DspotThreshold(risk=1e-3, depth=50)
        spot.calibrate(x[:2000])
        dspot.calibrate(x[:2000])
        spot_rate = spot.step(x[2000:]).anomalous.mean()
        dspot_rate = dspot.step(x[2000:]).anomalous.mean()
        assert dspot_rate < 0.005
        assert spot_rate > 0.5

    def test_reported_threshold_is_z_plus_local_mean(self) -> None:
        """value is z_q on the residuals plus the mean of the last depth learned scores."""
        dspot = DspotThreshold(risk=1e-3, depth=10)
        x = np.random.default_rng(6).exponential(size=500)
        dspot.calibrate(x)
        state = dspot.state_dict()
        assert dspot.mean == pytest.approx(x[-10:].mean())
        assert dspot.value == pytest.approx(state["z"] + x[-10:].mean())

    def test_alarmed_points_stay_out_of_the_moving_window(self) -> None:
        """After an alarm the local mean is that of the last depth non-alarmed scores."""
        dspot = DspotThreshold(risk=1e-3, depth=4)
        dspot.calibrate(np.random.default_rng(7).exponential(size=200))
        res = dspot.step(np.array([0.1, 0.2, 1e6, 0.3, 0.4]))
        assert res.anomalous.tolist() == [False, False, True, False, False]
        assert dspot.mean == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4]))


class TestQuantile:
    """The rolling quantile threshold."""

    def test_calibrated_value_is_margin_times_the_window_quantile(self) -> None:
        """After calibration the threshold is margin x the quantile of the last window scores."""
        q = QuantileThreshold(quantile=0.9, window=100, margin=1.25)
        q.calibrate(CALIBRATION)
        assert q.value == pytest.approx(1.25 * np.quantile(CALIBRATION[-100:], 0.9))

    def test_window_slides_over_learned_scores(self) -> None:
        """New normal scores push out the oldest; alarmed ones are not learned."""
        q = QuantileThreshold(quantile=1.0, window=10, margin=2.0)
        q.calibrate(np.arange(1.0, 11.0))
        assert q.value == 20.0
        q.step(np.array([0.5, 100.0]))  # 0.5 pushes out 1.0; 100 > 20 alarms
        window = unpack_floats(q.state_dict()["window"])
        assert window.tolist() == [*np.arange(2.0, 11.0).tolist(), 0.5]

    def test_threshold_is_capped_below_the_float_range(self) -> None:
        """margin x quantile can pass the float range: capped at 1e300, the threshold stays
        finite, so an inf score still alarms and is not learned."""
        th = QuantileThreshold(quantile=0.99, window=100, margin=1e9)
        th.calibrate(np.linspace(1e299, 1e300, 100))
        assert th.value == 1e300
        before = th.state_dict()
        assert th.step(np.array([np.inf, np.nan])).anomalous.all()
        assert th.state_dict() == before

    def test_alarm_rate_stays_bounded_on_a_stationary_stream(self) -> None:
        """On i.i.d. scores the alarm rate stays near its fixed point instead of ratcheting."""
        rng = np.random.default_rng(9)
        q = QuantileThreshold(quantile=0.99, window=500, margin=1.5)
        q.calibrate(rng.exponential(size=1000))
        res = q.step(rng.exponential(size=20_000))
        assert res.anomalous[-5000:].mean() < 0.01


class TestFixed:
    """The constant threshold."""

    def test_uncalibrated_likelihood_is_score_over_score_plus_value(self) -> None:
        """Without calibration the likelihood is score / (score + value), 0 for scores <= 0."""
        th = FixedThreshold(2.0)
        lik = th.likelihood(np.array([-1.0, 0.0, 2.0, 6.0, np.inf]))
        assert lik.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
        assert th.step(np.array([1.0, 3.0])).anomalous.tolist() == [False, True]

    def test_calibrated_likelihood_is_the_empirical_cdf(self) -> None:
        """After calibration the likelihood is the empirical CDF of the calibration scores."""
        th = FixedThreshold(5.0)
        th.calibrate(np.arange(1.0, 101.0))
        assert th.likelihood(np.array([0.0, 50.0, 100.0])).tolist() == [0.0, 0.5, 1.0]


def state_of(bank: ThresholdBank, sensor: str) -> dict[str, Any]:
    """The sensor's full state dict (calibration sample included)."""
    th = bank.get(sensor)
    assert th is not None
    return th.state_dict()


class TestThresholdBank:
    """Per-sensor thresholds behind one batch call."""

    @settings(max_examples=60, deadline=None)
    @given(
        kind=st.sampled_from(sorted(FACTORIES)),
        owners=st.lists(st.sampled_from(list("abcdefghijkl")), min_size=1, max_size=160),
        cut=st.integers(0, 160),
        offset=st.integers(0, 500),
        spoil=st.lists(st.integers(0, 159), max_size=3),
    )
    def test_interleaved_sensors_match_stepping_each_alone(
        self, kind: str, owners: list[str], cut: int, offset: int, spoil: list[int]
    ) -> None:
        """A batch mixing sensors gives each sensor the results it gets when stepped alone.

        Covers both paths of a batch: sensors with few rows are stepped in rounds across
        sensors, sensors with many rows on their own; non-finite scores included.
        """
        proto = calibrated(kind)
        scores = np.resize(np.roll(STREAM, offset), len(owners))
        for i in spoil:
            if i < scores.size:
                scores[i] = np.nan if i % 2 else np.inf
        bank = ThresholdBank(proto)
        mixed = concat(
            [bank.step(owners[:cut], scores[:cut]), bank.step(owners[cut:], scores[cut:])]
        )
        keys = np.array(owners)
        for sensor in set(owners):
            rows = keys == sensor
            single = proto.clone()
            alone = single.step(scores[rows])
            assert same_result(ThresholdResult(*(a[rows] for a in mixed)), alone)
            assert state_of(bank, sensor) == single.state_dict()

    @pytest.mark.parametrize("kind", sorted(FACTORIES))
    def test_many_small_batches_across_many_sensors_match_each_alone(self, kind: str) -> None:
        """The daemon's shape: each batch holds a few rows of many sensors, for many batches."""
        proto = calibrated(kind)
        rng = np.random.default_rng(3)
        sensors = [f"s{i}" for i in range(40)]
        owners: list[str] = []
        batches = []
        for _ in range(40):
            batch = [s for s in sensors for _ in range(int(rng.integers(0, 4)))]
            batch = [batch[i] for i in rng.permutation(len(batch))]
            batches.append(batch)
            owners += batch
        scores = rng.exponential(size=len(owners))
        scores[rng.choice(len(owners), 20, replace=False)] = 60.0  # certain alarms
        bank = ThresholdBank(proto)
        parts, lo = [], 0
        for batch in batches:
            parts.append(bank.step(batch, scores[lo : lo + len(batch)]))
            lo += len(batch)
        mixed = concat(parts)
        keys = np.array(owners)
        for sensor in sensors:
            rows = keys == sensor
            single = proto.clone()
            alone = single.step(scores[rows])
            assert same_result(ThresholdResult(*(a[rows] for a in mixed)), alone), sensor
            assert state_of(bank, sensor) == single.state_dict(), sensor

    @pytest.mark.parametrize("kind", ["spot", "dspot"])
    def test_refits_owed_by_a_burst_are_settled_later_with_the_same_results(
        self, kind: str
    ) -> None:
        """A burst (one row per sensor) leaves each new peak's refit owed; settling it at
        any point, or never, gives every sensor the results and state of stepping alone."""
        proto = calibrated(kind)
        rng = np.random.default_rng(11)
        sensors = [f"s{i:02d}" for i in range(40)]
        rounds = 60
        scores = rng.exponential(size=(rounds, len(sensors)))
        bank = ThresholdBank(proto)
        owed_after_bursts = []
        thresholds, likelihood = np.empty_like(scores), np.empty_like(scores)
        for k in range(rounds):
            order = rng.permutation(len(sensors))
            res = bank.step([sensors[i] for i in order], scores[k, order])
            thresholds[k, order], likelihood[k, order] = res.threshold, res.likelihood
            owed_after_bursts.append(bank.unsettled)
            if k % 3 == 1:
                left = bank.settle(0.0)  # one refit, then the budget is spent
                assert left == max(owed_after_bursts[-1] - 1, 0)
        assert max(owed_after_bursts) > 1
        for j, sensor in enumerate(sensors):
            single = proto.clone()
            alone = single.step(scores[:, j])
            assert np.array_equal(thresholds[:, j], alone.threshold), sensor
            assert np.array_equal(likelihood[:, j], alone.likelihood), sensor
            assert state_of(bank, sensor) == single.state_dict(), sensor
        bank.settle(60.0)
        assert bank.unsettled == 0

    def test_a_dropped_or_restored_sensor_owes_nothing(self) -> None:
        """Dropping or restoring a sensor forgets the refit its old threshold owed."""
        bank = ThresholdBank(calibrated("dspot"))
        names = [f"s{i}" for i in range(30)]
        peak = float(np.quantile(CALIBRATION, 0.99))  # above t, below z_q: a peak each
        res = bank.step(names, np.full(30, peak))
        assert not res.anomalous.any()
        assert bank.unsettled == 30
        exported = bank.export("s0")
        bank.drop(["s1", "s2"])
        bank.restore("s0", exported)
        assert bank.unsettled == 27
        assert bank.settle(60.0) == 0

    @pytest.mark.parametrize("kind", sorted(FACTORIES))
    def test_overflowing_scores_across_sensors_export_and_restore(self, kind: str) -> None:
        """Sensors stepped together through inf and NaN scores export, restore, continue."""
        proto = calibrated(kind)
        owners = [f"s{i % 7}" for i in range(420)]
        scores, _ = hostile(np.resize(STREAM, len(owners)), every=5)
        bank = ThresholdBank(proto)
        bank.step(owners[:210], scores[:210])
        other = ThresholdBank(proto)
        for sensor in sorted(set(owners)):
            other.restore(sensor, orjson_round_trip(bank.export(sensor)))
        assert same_result(
            bank.step(owners[210:], scores[210:]), other.step(owners[210:], scores[210:])
        )
        for sensor in sorted(set(owners)):
            assert state_of(bank, sensor) == state_of(other, sensor)

    def test_restored_sensors_share_the_prototype_reference(self) -> None:
        """A restored sensor with the prototype's calibration sample shares its array."""
        proto = calibrated("dspot")
        bank = ThresholdBank(proto)
        bank.step(["a", "b"], STREAM[:2])
        bank.restore("c", json_round_trip(bank.export("a")))
        got = [bank.get(s) for s in "abc"]
        refs = [th.reference for th in got if th is not None]
        assert len(refs) == 3
        assert all(r is refs[0] for r in refs)
        res = bank.step(["a", "c"], STREAM[2:4])
        assert res.threshold[0] == res.threshold[1]  # same state, same result

    def test_new_sensor_starts_from_the_prototype(self) -> None:
        """A sensor seen for the first time behaves like a clone of the calibrated prototype."""
        proto = calibrated("spot")
        before = proto.state_dict()
        bank = ThresholdBank(proto)
        res = bank.step(["x"], np.array([1e9]))
        assert res.anomalous.tolist() == [True]
        assert res.threshold[0] == proto.value
        assert proto.state_dict() == before

    def test_membership_drop_export_restore(self) -> None:
        """len/in/get/drop track sensors; export/restore moves one sensor's state intact."""
        bank = ThresholdBank(calibrated("dspot"))
        bank.step(["a", "b", "a"], STREAM[:3])
        assert len(bank) == 2
        assert "a" in bank
        assert bank.get("zzz") is None
        exported = json_round_trip(bank.export("a"))
        bank.drop(["a", "unknown"])
        assert "a" not in bank
        assert len(bank) == 1
        other = ThresholdBank(calibrated("dspot"))
        other.restore("a", exported)
        assert other.export("a") == exported

    def test_export_names_the_shared_calibration_sample_by_digest(self) -> None:
        """A sensor still on the prototype's sample exports its SHA-256, not 256 numbers."""
        bank = ThresholdBank(calibrated("dspot"))
        bank.step(["a"], STREAM[:1])
        exported = json_round_trip(bank.export("a"))
        assert "ref" not in exported
        assert len(exported["ref_sha256"]) == 64
        assert len(json.dumps(exported)) < len(json.dumps(state_of(bank, "a"))) / 2
        other = ThresholdBank(calibrated("dspot"))
        other.restore("a", exported)
        assert state_of(other, "a") == state_of(bank, "a")
        res = [b.step(["a"] * 39, STREAM[1:40]) for b in (bank, other)]
        assert same_result(*res)

    def test_digest_of_another_models_sample_is_refused(self) -> None:
        """After a model change the digest no longer matches: StateError, sensor untouched."""
        bank = ThresholdBank(calibrated("dspot"))
        bank.step(["a"], STREAM[:1])
        exported = json_round_trip(bank.export("a"))
        retrained = DspotThreshold(risk=1e-3, depth=20)
        retrained.calibrate(CALIBRATION * 1.1)
        other = ThresholdBank(retrained)
        with pytest.raises(StateError, match="calibration sample"):
            other.restore("a", exported)
        assert "a" not in other

    def test_sensor_kept_through_a_prototype_change_exports_its_own_sample(self) -> None:
        """After a reload, a known sensor keeps its old sample, and its state carries it."""
        bank = ThresholdBank(calibrated("dspot"))
        bank.step(["a"], STREAM[:1])
        retrained = DspotThreshold(risk=1e-3, depth=20)
        retrained.calibrate(CALIBRATION * 1.1)
        bank.set_prototype(retrained)
        exported = bank.export("a")
        assert "ref_sha256" not in exported
        assert exported == state_of(bank, "a")

    def test_restore_of_another_kind_raises_and_keeps_the_sensor(self) -> None:
        """Restoring a state of another kind raises StateError and leaves the sensor as it was."""
        bank = ThresholdBank(calibrated("spot"))
        bank.step(["a"] * 5, STREAM[:5])
        before = bank.export("a")
        with pytest.raises(StateError):
            bank.restore("a", calibrated("quantile").state_dict())
        assert bank.export("a") == before

    def test_shape_mismatch_raises_data_error(self) -> None:
        """Sensors and scores of different lengths raise DataError."""
        bank = ThresholdBank(calibrated("fixed"))
        with pytest.raises(DataError):
            bank.step(["a", "b"], np.ones(3))

    def test_empty_batch(self) -> None:
        """An empty batch returns empty arrays and creates no sensor."""
        bank = ThresholdBank(calibrated("fixed"))
        res = bank.step([], np.zeros(0))
        assert res.threshold.size == 0
        assert len(bank) == 0
