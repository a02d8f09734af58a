"""History novelty on series the tests generate: what is new scores, what recurs does not."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from streamer.config import NoveltyConfig, parse_config
from streamer.dev.simulate import CHANNELS, simulate
from streamer.errors import ConfigError
from streamer.scoring.alerts import open_flags
from streamer.scoring.novelty import NoveltyBank, NoveltySettings, SensorNovelty

SMALL = NoveltySettings(points=8, scales=(1, 4), history=600, refractory=50, learning_rows=200)


def one_scale(**changes: Any) -> NoveltySettings:
    """Small settings with one scale (rows themselves), as the single-effect tests use."""
    return replace(SMALL, scales=(1,), **changes)


def periodic(n: int, period: int = 40, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)).reshape(-1, 1)


class TestSensorNovelty:
    def test_a_new_shape_scores_and_the_familiar_one_does_not(self) -> None:
        """A burst of a shape never seen scores 1; the recurring cycle rarely passes 0.5."""
        x = periodic(1500)
        x[1200:1210, 0] = np.linspace(0.2, -0.2, 10)  # the cycle flattens: within the range
        scores = SensorNovelty(SMALL, 1).update(x)
        assert scores[1200:1230].max() == 1.0
        familiar = scores[300:1190]
        assert familiar.max() < 1.0
        assert np.count_nonzero(familiar > 0.5) <= 0.02 * familiar.size

    def test_learning_rows_score_zero(self) -> None:
        x = periodic(400)
        x[50:60, 0] = 5.0  # far outside the range, but still learning
        scores = SensorNovelty(SMALL, 1).update(x)
        assert np.all(scores[:200] == 0.0)

    def test_a_persistent_anomaly_is_reported_as_it_grows_not_on_every_row(self) -> None:
        """The refractory: a level reached in the last rows is not reported again."""
        x = periodic(1400)
        x[1000:, 0] = 0.3 * np.sin(2 * np.pi * np.arange(400) / 7)  # a new, lasting rhythm
        settings = one_scale(spatial_tolerance=None)
        scores = SensorNovelty(settings, 1).update(x)
        reported = np.flatnonzero(scores[1000:1100] > 0)
        assert reported.size >= 1
        assert reported.size <= 10  # not the 100 rows the anomaly lasts

    def test_a_value_beyond_the_range_scores_one(self) -> None:
        """Even where the refractory silences the distance (it reached 1 just before)."""
        x = periodic(800)
        x[650:660, 0] = np.linspace(0.2, -0.2, 10)  # a new shape: novelty 1 at about 650
        x[700, 0] = 1.6  # the range is about [-1.1, 1.1]: beyond it by more than 5 %
        on, off = one_scale(refractory=200), one_scale(refractory=200, spatial_tolerance=None)
        with_range = SensorNovelty(on, 1).update(x)
        without = SensorNovelty(off, 1).update(x)
        assert without[650:670].max() == 1.0
        assert with_range[700] == 1.0
        assert without[700] == 0.0

    @pytest.mark.parametrize("chunk", [1, 7, 333])
    def test_scores_do_not_depend_on_how_rows_arrive(self, chunk: int) -> None:
        """One row at a time (the daemon) scores as one block does (the offline tools)."""
        x = periodic(1300, seed=3)
        x[1100:1110, 0] += 0.8
        whole = SensorNovelty(SMALL, 1).update(x)
        state = SensorNovelty(SMALL, 1)
        parts = [state.update(x[i : i + chunk]) for i in range(0, len(x), chunk)]
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-9, atol=1e-9)

    def test_history_is_bounded(self) -> None:
        state = SensorNovelty(SMALL, 2)
        state.update(np.random.default_rng(0).standard_normal((5000, 2)))
        channels = 2
        held = len(SMALL.scales) * SMALL.kept_rows * (channels + 1) * 8  # means and norms
        tail = (max(SMALL.scales) - 1) * channels * 8
        assert state.nbytes <= held + tail + SMALL.refractory * 8

    def test_a_flat_series_does_not_turn_noise_into_alarms(self) -> None:
        """Distances of a constant series are numerical noise; it must not score."""
        x = np.full((1500, 1), 3.0)
        x[::2, 0] += 1e-9
        scores = SensorNovelty(SMALL, 1).update(x)
        assert scores.max() == 0.0


class TestNoveltyBank:
    def test_windows_add_their_last_stride_rows_per_sensor(self) -> None:
        """Window scores equal the per-row scores of the rows each window adds."""
        x = periodic(900, seed=1)
        x[800, 0] = 3.0
        bank = NoveltyBank(SMALL, offset=np.zeros(1), scale=np.ones(1))
        window, stride = 16, 4
        starts = range(0, 900 - window + 1, stride)
        data = np.stack([x[s : s + window] for s in starts]).astype(np.float32)
        got = bank.score_windows(["a"] * len(data), data, stride)
        rows = SensorNovelty(SMALL, 1).update(x[: starts[-1] + window].astype(np.float32))
        want = [rows[:window].max()] + [
            rows[s + window - stride : s + window].max() for s in list(starts)[1:]
        ]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert got.max() == 1.0

    def test_sensors_are_independent_and_drop_forgets(self) -> None:
        bank = NoveltyBank(SMALL, offset=np.zeros(1), scale=np.ones(1))
        x = periodic(400)
        bank.observe("a", x)
        assert len(bank) == 1
        bank.observe("b", x[:10])
        bank.drop(["a"])
        assert len(bank) == 1
        # "a" starts over: learning again, so it scores 0.
        assert bank.observe("a", x[:100]).max() == 0.0


class TestSettings:
    @pytest.mark.parametrize(
        ("kwargs", "named"),
        [
            ({"points": 1}, "novelty.points"),
            ({"scales": ()}, "novelty.scales"),
            ({"scales": (0,)}, "novelty.scales"),
            ({"cap": 0.0}, "novelty.cap"),
            ({"spatial_tolerance": -1.0}, "novelty.spatial_tolerance"),
        ],
    )
    def test_bad_settings_name_the_key(self, kwargs: dict[str, object], named: str) -> None:
        with pytest.raises(ConfigError, match=named):
            NoveltySettings(**kwargs)  # type: ignore[arg-type]

    def test_config_section(self) -> None:
        cfg = parse_config({"novelty": {"enabled": True, "scales": [1, 8]}}, "<test>")
        assert cfg.novelty.enabled and cfg.novelty.scales == [1, 8]
        assert not NoveltyConfig().enabled
        with pytest.raises(ConfigError, match="novelty"):
            parse_config({"novelty": {"scales": []}}, "<test>")


class TestAlertsOnNovelty:
    """The failure modes of a model's worst-channel score, with the novelty instead."""

    def test_an_alert_closes_while_one_channel_drifts_after_the_anomaly(self) -> None:
        """A level shift opens an alert; a channel drifting slowly afterwards (4 sigma
        over 960 rows, as a warming temperature) does not keep it open or reopen it."""
        plant = simulate(1, 3000, seed=21)
        x = plant.values[0].astype(np.float64)
        mu, sd = x[:750].mean(axis=0), x[:750].std(axis=0)
        x[2000:2040, 0] += 3 * sd[0]
        x[2040:, 1] += np.linspace(0.0, 4 * sd[1], 960)
        scores = SensorNovelty(NoveltySettings(learning_rows=750), len(CHANNELS)).update(
            (x - mu) / sd
        )
        is_open = open_flags((scores > 0.99).tolist(), 1, 1, 20)
        assert is_open[2000:2040].any()
        assert not is_open[2100:].any()

    def test_the_score_grows_with_the_distance(self) -> None:
        """Before the refractory, a further-off window never scores lower (cap aside)."""
        x = periodic(1000)
        settings = one_scale(refractory=0, spatial_tolerance=None)
        last = []
        for bump in (0.05, 0.1, 0.2, 0.4, 0.8):
            y = x.copy()
            y[900:904, 0] += bump
            last.append(SensorNovelty(settings, 1).update(y)[903])
        assert last == sorted(last) and last[-1] > last[0]
