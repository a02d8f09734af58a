"""History novelty: how unlike anything in a sensor's recent past its latest samples are.

A window score from a model trained on a short normal stretch calls every new normal
regime anomalous, and keeps calling it so. This score asks instead whether the latest
stretch of samples has been seen before in the sensor's own history:

* **Distance to the nearest earlier window**, at each scale ``p``: a window is
  ``points`` values spaced ``p`` rows apart, each the mean of the ``p`` rows up to it
  (scale 1: the last ``points`` rows; scale 16: their slow shape over 16 times as
  long). Its distance (RMS over points and channels, in units of the model's scaler)
  to the nearest window that ended between ``history`` rows ago and the window's own
  start, so a window is never compared with itself or an overlapping one.
* **In units of its own spread**: the distance's z-score against the running mean and
  standard deviation of the sensor's earlier distances (after its learning rows);
  0 until ``min_count`` distances have been seen. The largest z over the scales,
  divided by ``cap`` and clipped to [0, 1], is the row's novelty.
* **Refractory**: a row reports its novelty only where it exceeds every novelty of the
  previous ``refractory`` rows, 0 elsewhere. An anomaly that persists is reported as
  it grows, not on every row, and a level already reached recently is not news.
* **Range** (``spatial_tolerance``): a value beyond the sensor's running minimum or
  maximum by more than that fraction of its range scores 1 outright.

Rows within a sensor's first ``learning_rows`` fill its history and range but score 0
and do not enter the distance statistics. Cost per row and scale: ``history`` x
``points`` x channels multiply-adds (with the defaults and one channel, 0.1 to 0.4 ms
per row and sensor fed one row at a time on a 2-core machine, about 60 us in pieces of
8 rows): meant for slow series (utilisation, counts, traffic), not for thousands of
sensors at many samples a second. Memory per sensor and scale: the causal means and
window norms of ``history + 2 * points * max(scales) + 256`` rows, 8 bytes a value
(about 147 KB for one channel with the defaults).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from numpy.typing import NDArray

from streamer.errors import ConfigError

__all__ = ["NoveltyBank", "NoveltySettings", "SensorNovelty"]

# Distances below this (in scaler units) are numerical noise of the distance formula
# (|a|^2 + |b|^2 - 2ab cancels to about 1e-12 of |a|^2): a spread floor keeps a flat or
# perfectly periodic series from turning that noise into large z-scores.
_SPREAD_FLOOR = 1e-3
# Queries per distance block: bounds the (queries x candidates) matrix to a few MB.
_BLOCK = 256
# Rows added to a sensor at a time (longer updates are split): bounds its buffers.
_PIECE = 256


@dataclass(frozen=True, slots=True)
class NoveltySettings:
    """The parameters of :class:`SensorNovelty` (the ``novelty`` config section)."""

    points: int = 16
    scales: tuple[int, ...] = (1, 16)
    history: int = 4000
    cap: float = 4.0
    refractory: int = 200
    spatial_tolerance: float | None = 0.05
    min_count: int = 30
    learning_rows: int = 0

    def __post_init__(self) -> None:
        if self.points < 2:
            raise ConfigError(f"novelty.points must be at least 2, got {self.points}")
        if not self.scales or any(p < 1 for p in self.scales):
            raise ConfigError(f"novelty.scales must be integers >= 1, got {list(self.scales)}")
        if self.history < 1:
            raise ConfigError(f"novelty.history must be at least 1, got {self.history}")
        if not self.cap > 0:
            raise ConfigError(f"novelty.cap must be above 0, got {self.cap}")
        if self.refractory < 0 or self.min_count < 2 or self.learning_rows < 0:
            raise ConfigError(
                "novelty.refractory and novelty.learning_rows must be >= 0 and "
                f"novelty.min_count >= 2, got {self.refractory}, {self.learning_rows}, "
                f"{self.min_count}"
            )
        if self.spatial_tolerance is not None and not self.spatial_tolerance >= 0:
            raise ConfigError(
                f"novelty.spatial_tolerance must be >= 0 or null, got {self.spatial_tolerance}"
            )

    @property
    def kept_rows(self) -> int:
        """Rows of causal means each scale of a sensor holds at most: the candidates'
        span, one window's reach, and one piece of new rows."""
        reach = max(p * self.points for p in self.scales)
        return self.history + 2 * reach + _PIECE


class _Moments:
    """Count, sum and sum of squares of one scale's distances (after the learning rows)."""

    __slots__ = ("n", "s1", "s2")

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def z_scores(
        self, dist: NDArray[np.float64], counted: NDArray[np.bool_], min_count: int
    ) -> NDArray[np.float64]:
        """Each distance's z against the distances counted before it; then count them."""
        d = np.where(counted, dist, 0.0)
        c = counted.astype(np.int64)
        # Statistics *before* each row: prefix sums shifted by one.
        n = self.n + np.cumsum(c) - c
        s1 = self.s1 + np.cumsum(d) - d
        s2 = self.s2 + np.cumsum(d * d) - d * d
        safe_n = np.maximum(n, 1)
        mean = s1 / safe_n
        sd = np.sqrt(np.maximum(s2 / safe_n - mean * mean, 0.0))
        z = (dist - mean) / np.maximum(sd, _SPREAD_FLOOR)
        z = np.where(counted & (n >= min_count), z, 0.0)
        self.n += int(c.sum())
        self.s1 += float(d.sum())
        self.s2 += float((d * d).sum())
        return z


class _Scale:
    """One scale of a sensor's novelty: its causal means by row, and the squared norm of
    the window ending at each row, over the rows later windows can still reach.

    Windows are never stored: a window's dot product with another is a sum over its
    ``points`` rows of the means, so one contiguous block of means serves every
    candidate (memory grows with rows, not rows x points).
    """

    __slots__ = ("hi", "history", "m", "means", "norms", "p", "reach", "row0", "span")

    def __init__(self, p: int, points: int, channels: int, history: int) -> None:
        self.p, self.m, self.history = p, points, history
        self.span = p * points
        self.reach = (points - 1) * p  # rows a window's first point lies before its end
        cap = history + 2 * self.span + _PIECE
        self.means = np.zeros((cap, channels))
        self.norms = np.zeros(cap)
        self.row0 = 0  # the sensor's row number of means[0]
        self.hi = 0  # rows held: means[:hi]

    @property
    def nbytes(self) -> int:
        return int(self.means.nbytes + self.norms.nbytes)

    def _room(self, n: int) -> None:
        """Make room for ``n`` more rows: drop rows no later window reaches, else grow."""
        if self.hi + n <= self.means.shape[0]:
            return
        last = self.row0 + self.hi - 1  # the newest row held
        keep_from = last + 2 - self.span - self.history - self.reach
        drop = min(max(keep_from - self.row0, 0), self.hi)
        if drop:
            held = self.hi - drop
            self.means[:held] = self.means[drop : self.hi]
            self.norms[:held] = self.norms[drop : self.hi]
            self.row0 += drop
            self.hi = held
        if self.hi + n > self.means.shape[0]:
            cap = self.hi + n + self.means.shape[0] // 2
            means, norms = np.zeros((cap, self.means.shape[1])), np.zeros(cap)
            means[: self.hi], norms[: self.hi] = self.means[: self.hi], self.norms[: self.hi]
            self.means, self.norms = means, norms

    def _windows(self, ends: NDArray[np.intp]) -> NDArray[np.float64]:
        """The windows ending at buffer rows ``ends``, one per row (``points * channels``)."""
        idx = ends[:, None] + (np.arange(self.m) * self.p - self.reach)[None, :]
        windows: NDArray[np.float64] = self.means[idx].reshape(ends.size, -1)
        return windows

    def _window_range(self, lo: int, hi: int) -> NDArray[np.float64]:
        """The windows ending at buffer rows ``lo`` to ``hi - 1``, gathered from one
        strided view of the means (no index arrays)."""
        base = self.means[lo - self.reach : hi]
        row, col = base.strides
        view = as_strided(
            base,
            shape=(hi - lo, self.m, base.shape[1]),
            strides=(row, self.p * row, col),
            writeable=False,
        )
        return view.reshape(hi - lo, -1)

    def add(self, means: NDArray[np.float64]) -> NDArray[np.float64]:
        """Append the new rows' causal means; each new row's nearest-window distance.

        NaN where a row has no window yet or no candidate window yet.
        """
        n = means.shape[0]
        self._room(n)
        self.means[self.hi : self.hi + n] = means
        first_new, self.hi = self.hi, self.hi + n
        out = np.full(n, np.nan)
        # A window needs its first point's mean over p rows: rows from span - 1 on.
        first_valid = max(self.span - 1 - self.row0, 0)
        ends = np.arange(max(first_valid, first_new), self.hi)
        if ends.size == 0:
            return out
        queries = self._windows(ends)
        self.norms[ends] = np.einsum("ij,ij->i", queries, queries)
        scale = float(self.m * self.means.shape[1])
        for start in range(0, ends.size, _BLOCK):
            q = ends[start : start + _BLOCK]
            # Candidates end between span + history - 1 and span rows before a query.
            lo = max(first_valid, int(q[0]) - self.span - self.history + 1)
            hi = int(q[-1]) - self.span + 1
            if hi <= lo:
                continue
            dots = queries[start : start + _BLOCK] @ self._window_range(lo, hi).T
            d2 = self.norms[q, None] + self.norms[None, lo:hi] - 2.0 * dots
            if q.size > 1:  # one query's candidates are all in its range already
                gap = q[:, None] - np.arange(lo, hi)[None, :]
                d2 = np.where((gap >= self.span) & (gap < self.span + self.history), d2, np.inf)
            best = d2.min(axis=1)
            has = np.isfinite(best)
            out[q[has] - first_new] = np.sqrt(np.maximum(best[has], 0.0) / scale)
        return out


class SensorNovelty:
    """One sensor's history novelty, fed its rows in order (see the module docstring)."""

    def __init__(self, settings: NoveltySettings, channels: int) -> None:
        self.settings = settings
        self.channels = channels
        self.rows_seen = 0
        self._scales = [
            _Scale(p, settings.points, channels, settings.history) for p in settings.scales
        ]
        self._tail = np.empty((0, channels))  # the last max(scales) - 1 rows, scaled
        self._moments = [_Moments() for _ in settings.scales]
        self._recent = np.zeros(0)  # the last ``refractory`` novelties
        self._low = np.full(channels, np.inf)
        self._high = np.full(channels, -np.inf)

    @property
    def nbytes(self) -> int:
        """Memory held by the history arrays."""
        held = sum(scale.nbytes for scale in self._scales)
        return int(held + self._tail.nbytes + self._recent.nbytes)

    def update(self, rows: NDArray[np.floating]) -> NDArray[np.float64]:
        """Score ``rows`` (``(n, channels)``, scaled, in time order); returns one score each."""
        x = np.asarray(rows, dtype=np.float64).reshape(-1, self.channels)
        if x.shape[0] > _PIECE:
            return np.concatenate(
                [self._update(x[i : i + _PIECE]) for i in range(0, x.shape[0], _PIECE)]
            )
        return self._update(x)

    def _update(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        n = x.shape[0]
        if n == 0:
            return np.zeros(0)
        s = self.settings
        first = self.rows_seen  # the sensor's row number of x[0]
        learned = np.arange(first, first + n) >= s.learning_rows
        v = np.concatenate([self._tail, x])
        sums = np.cumsum(np.vstack([np.zeros((1, self.channels)), v]), axis=0)
        z = np.zeros(n)
        for scale, moments in zip(self._scales, self._moments, strict=True):
            dist = scale.add(self._means(sums, v.shape[0] - n, scale.p))
            counted = learned & np.isfinite(dist)
            z = np.maximum(z, moments.z_scores(np.nan_to_num(dist), counted, s.min_count))
        novelty = np.minimum(np.maximum(z, 0.0) / s.cap, 1.0)
        out = self._refractory(novelty)
        if s.spatial_tolerance is not None:
            out = np.maximum(out, self._beyond_range(x, s.spatial_tolerance))
        out[~learned] = 0.0
        self._tail = v[max(v.shape[0] - (max(s.scales) - 1), 0) :].copy()
        self.rows_seen += n
        return out

    @staticmethod
    def _means(sums: NDArray[np.float64], base: int, p: int) -> NDArray[np.float64]:
        """Each new row's mean over the ``p`` rows up to it (fewer at a sensor's start,
        where no window uses them); ``sums`` are the prefix sums of tail and new rows."""
        ends = np.arange(base + 1, sums.shape[0])
        starts = np.maximum(ends - p, 0)
        means: NDArray[np.float64] = (sums[ends] - sums[starts]) / (ends - starts)[:, None]
        return means

    def _refractory(self, novelty: NDArray[np.float64]) -> NDArray[np.float64]:
        """Novelty where it exceeds the previous ``refractory`` rows' novelties, else 0."""
        d = self.settings.refractory
        if d == 0:
            return novelty.copy()
        prev = np.concatenate([np.full(d - self._recent.size, -np.inf), self._recent, novelty])
        before = sliding_window_view(prev[:-1], d).max(axis=1)[-novelty.size :]
        self._recent = prev[-d:][np.isfinite(prev[-d:])]
        return np.where((novelty > before) & (novelty > 0.0), novelty, 0.0)

    def _beyond_range(self, x: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
        """1 where a channel leaves the running range by more than ``tolerance`` of it."""
        high = np.maximum.accumulate(np.vstack([self._high, x]), axis=0)
        low = np.minimum.accumulate(np.vstack([self._low, x]), axis=0)
        prev_high, prev_low = high[:-1], low[:-1]  # before each row
        margin = tolerance * (prev_high - prev_low)
        with np.errstate(invalid="ignore"):  # inf - inf before a sensor's first row
            beyond = (x > prev_high + margin) | (x < prev_low - margin)
        self._high, self._low = high[-1], low[-1]
        flagged: NDArray[np.float64] = np.any(beyond & np.isfinite(margin), axis=1).astype(
            np.float64
        )
        return flagged


class NoveltyBank:
    """Per-sensor :class:`SensorNovelty`, scaled with the model's scaler."""

    def __init__(
        self,
        settings: NoveltySettings,
        offset: NDArray[np.floating],
        scale: NDArray[np.floating],
    ) -> None:
        self.settings = settings
        self.offset = np.asarray(offset, dtype=np.float64).reshape(-1)
        self.scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        self._sensors: dict[Hashable, SensorNovelty] = {}

    def __len__(self) -> int:
        return len(self._sensors)

    def _of(self, sensor: Hashable) -> SensorNovelty:
        state = self._sensors.get(sensor)
        if state is None:
            state = self._sensors[sensor] = SensorNovelty(self.settings, self.offset.size)
        return state

    def observe(self, sensor: Hashable, values: NDArray[np.floating]) -> NDArray[np.float64]:
        """Feed one sensor's raw rows ``(n, channels)`` in order; one score per row."""
        x = (np.asarray(values, dtype=np.float64) - self.offset) / self.scale
        return self._of(sensor).update(x)

    def score_windows(
        self, sensors: Sequence[Hashable], data: NDArray[np.floating], stride: int
    ) -> NDArray[np.float64]:
        """One score per window: the highest score of the rows it adds to its sensor.

        ``data[i]`` is sensor ``sensors[i]``'s window (raw values), windows of a sensor in
        time order; a window adds its last ``stride`` rows, or all of them when it is the
        first the sensor shows this bank.
        """
        out = np.zeros(len(sensors))
        order: dict[Hashable, list[int]] = {}
        for i, sensor in enumerate(sensors):
            order.setdefault(sensor, []).append(i)
        width = data.shape[1]
        for sensor, idx in order.items():
            fresh = sensor not in self._sensors
            parts = [
                data[i, (0 if fresh and k == 0 else width - stride) :] for k, i in enumerate(idx)
            ]
            sizes = [len(part) for part in parts]
            scores = self.observe(sensor, np.concatenate(parts))
            bounds = np.cumsum([0, *sizes])
            out[idx] = np.maximum.reduceat(scores, bounds[:-1])
        return out

    def drop(self, sensors: Sequence[Hashable]) -> None:
        """Forget these sensors' histories."""
        for sensor in sensors:
            self._sensors.pop(sensor, None)
