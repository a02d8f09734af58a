"""SKAB point-wise confusion counts and metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.errors import DataError
from streamer.evaluation.metrics import Confusion, skab_confusion, skab_metrics


class TestSkabConfusion:
    """Point-wise confusion counting."""

    def test_hand_computed_counts(self) -> None:
        """Each of the four cases is counted point by point."""
        y_true = np.array([1, 1, 1, 0, 0, 0, 0, 1])
        y_pred = np.array([1, 0, 1, 1, 0, 0, 1, 0])
        assert skab_confusion(y_true, y_pred) == Confusion(tp=2, fp=2, fn=2, tn=2)

    def test_float_and_bool_inputs(self) -> None:
        """SKAB's float labels (1.0/0.0) and boolean predictions are accepted."""
        y_true = np.array([1.0, 0.0, 1.0, 0.0])
        y_pred = np.array([True, True, False, False])
        assert skab_confusion(y_true, y_pred) == Confusion(tp=1, fp=1, fn=1, tn=1)

    def test_length_mismatch_raises(self) -> None:
        """Labels and predictions of different lengths are rejected."""
        with pytest.raises(DataError, match="3 points"):
            skab_confusion([0, 1, 0], [0, 1])

    def test_non_binary_value_raises(self) -> None:
        """A value other than 0 or 1 is rejected with its position."""
        with pytest.raises(DataError, match=r"y_pred\[1\]"):
            skab_confusion([0, 1, 0], [0, 2, 0])

    def test_nan_raises(self) -> None:
        """NaN labels are rejected rather than counted as normal."""
        with pytest.raises(DataError, match=r"y_true\[2\]"):
            skab_confusion([0.0, 1.0, np.nan], [0, 1, 0])

    def test_two_dimensional_raises(self) -> None:
        """Multi-column input is rejected."""
        with pytest.raises(DataError, match="one-dimensional"):
            skab_confusion(np.zeros((2, 2)), np.zeros((2, 2)))


class TestConfusionPooling:
    """Pooling confusion matrices over files."""

    def test_addition_sums_fields(self) -> None:
        """Adding two confusions adds each count."""
        a = Confusion(tp=1, fp=2, fn=3, tn=4)
        b = Confusion(tp=10, fp=20, fn=30, tn=40)
        assert a + b == Confusion(tp=11, fp=22, fn=33, tn=44)

    def test_builtin_sum_and_pooled(self) -> None:
        """The builtin sum and Confusion.pooled agree and pool like one long file."""
        y_true = [np.array([1, 0, 1]), np.array([0, 0, 1, 1])]
        y_pred = [np.array([1, 1, 0]), np.array([0, 1, 1, 0])]
        parts = [skab_confusion(t, p) for t, p in zip(y_true, y_pred, strict=True)]
        whole = skab_confusion(np.concatenate(y_true), np.concatenate(y_pred))
        assert sum(parts) == whole
        assert Confusion.pooled(parts) == whole
        assert whole.total == 7

    def test_pooled_empty_is_zero(self) -> None:
        """Pooling nothing gives the all-zero confusion."""
        assert Confusion.pooled([]) == Confusion()


class TestSkabMetrics:
    """F1, FAR and MAR from a confusion."""

    def test_formulas(self) -> None:
        """F1, FAR and MAR follow the SKAB leaderboard formulas."""
        m = skab_metrics(Confusion(tp=6, fp=2, fn=4, tn=8))
        assert m["f1"] == pytest.approx(6 / (6 + (2 + 4) / 2))
        assert m["far"] == pytest.approx(2 / 10)
        assert m["mar"] == pytest.approx(4 / 10)

    def test_zero_denominators_give_zero(self) -> None:
        """An empty confusion reports 0.0 for every metric instead of dividing by zero."""
        assert skab_metrics(Confusion()) == {"f1": 0.0, "far": 0.0, "mar": 0.0}

    def test_always_alarm_on_half_anomalous(self) -> None:
        """Alarming everywhere on half-anomalous data gives F1 2/3 with FAR 100 %."""
        conf = skab_confusion(np.r_[np.ones(50), np.zeros(50)], np.ones(100))
        m = skab_metrics(conf)
        assert m["f1"] == pytest.approx(2 / 3)
        assert m["far"] == 1.0
        assert m["mar"] == 0.0
