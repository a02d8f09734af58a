"""A simulated plant: sensors with daily cycles, correlated channels, noise and injected faults.

Used by ``streamer demo`` and by the test suite (which must make its own data).
Each sensor has five channels driven by two shared latent factors (so channels
are correlated), a daily cycle with a per-sensor phase, a vibration channel with
a characteristic frequency, and Gaussian noise. Faults are injected into copies
of that signal and labelled row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["ANOMALY_KINDS", "CHANNELS", "Injection", "Plant", "simulate"]

CHANNELS = ("temp", "pressure", "vibration", "flow", "current")
ANOMALY_KINDS = ("spike", "level_shift", "drift", "stuck", "correlation_break", "frequency_change")


@dataclass(frozen=True, slots=True)
class Injection:
    """One injected fault: rows ``[start, end)`` of one sensor."""

    sensor: int
    kind: str
    start: int
    end: int
    channel: int


@dataclass(frozen=True, slots=True)
class Plant:
    """Simulated samples of a fleet."""

    values: NDArray[np.float64]  # (sensors, rows, channels)
    labels: NDArray[np.bool_]  # (sensors, rows)
    injections: list[Injection]
    period: int  # rows per simulated day

    @property
    def sensors(self) -> int:
        """Number of sensors."""
        return int(self.values.shape[0])


def _normal(
    rng: np.random.Generator, sensors: int, rows: int, period: int, t0: int
) -> NDArray[np.float64]:
    t = np.arange(t0, t0 + rows, dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=(sensors, 1))
    day = np.sin(2 * np.pi * t[None, :] / period + phase)  # (S, T)
    # A slow random walk shared by pressure, flow and current (the load on the line).
    load = np.cumsum(rng.normal(0, 0.02, size=(sensors, rows)), axis=1)
    load -= np.linspace(0, 1, rows)[None, :] * load[:, -1:]  # keep it bounded
    vib_freq = rng.uniform(0.18, 0.22, size=(sensors, 1))
    out = np.empty((sensors, rows, 5))
    out[..., 0] = 20 + 5 * day + rng.normal(0, 0.3, (sensors, rows))  # temp
    out[..., 1] = 3 + 0.8 * day + 0.5 * load + rng.normal(0, 0.05, (sensors, rows))  # pressure
    out[..., 2] = (
        0.5 + 0.2 * np.sin(2 * np.pi * vib_freq * t[None, :]) + rng.normal(0, 0.03, (sensors, rows))
    )
    out[..., 3] = 50 + 6 * day + 4 * load + rng.normal(0, 0.5, (sensors, rows))  # flow
    out[..., 4] = 10 + 1.5 * day + 0.8 * load + rng.normal(0, 0.1, (sensors, rows))  # current
    return out


def simulate(
    sensors: int,
    rows: int,
    *,
    period: int = 288,
    anomalies_per_sensor: int = 0,
    kinds: tuple[str, ...] = ANOMALY_KINDS,
    min_len: int = 30,
    max_len: int = 120,
    clean_prefix: int = 0,
    seed: int = 0,
) -> Plant:
    """Simulate ``rows`` samples for each of ``sensors`` sensors.

    ``anomalies_per_sensor`` faults of the given kinds are injected per sensor,
    none in the first ``clean_prefix`` rows and never overlapping.
    """
    rng = np.random.default_rng(seed)
    values = _normal(rng, sensors, rows, period, 0)
    labels = np.zeros((sensors, rows), dtype=bool)
    injections: list[Injection] = []
    std = values.std(axis=1)  # (S, C)
    for s in range(sensors):
        placed = 0
        attempts = 0
        while placed < anomalies_per_sensor and attempts < 100:
            attempts += 1
            kind = kinds[int(rng.integers(len(kinds)))]
            length = 3 if kind == "spike" else int(rng.integers(min_len, max_len + 1))
            lo_bound = max(clean_prefix, 0)
            if rows - length - lo_bound <= 0:
                break
            start = int(rng.integers(lo_bound, rows - length))
            end = start + length
            # Keep a margin between faults so each is a separate alert.
            if labels[s, max(0, start - max_len) : min(rows, end + max_len)].any():
                continue
            ch = int(rng.integers(5))
            seg = values[s, start:end]
            sd = std[s, ch]
            if kind == "spike":
                seg[:, ch] += 8 * sd * rng.choice([-1, 1])
            elif kind == "level_shift":
                seg[:, ch] += 3 * sd * rng.choice([-1, 1])
            elif kind == "drift":
                seg[:, ch] += np.linspace(0, 5 * sd, length) * rng.choice([-1, 1])
            elif kind == "stuck":
                ch = 2 if rng.random() < 0.5 else ch  # a stuck vibration sensor is the classic
                seg[:, ch] = seg[0, ch]
            elif kind == "correlation_break":
                ch = 3  # flow stops following the daily cycle and load
                seg[:, ch] = values[s, start, ch] + rng.normal(0, std[s, ch] * 0.5, length)
            elif kind == "frequency_change":
                ch = 2
                t = np.arange(length)
                seg[:, ch] = 0.5 + 0.2 * np.sin(2 * np.pi * 0.05 * t) + rng.normal(0, 0.03, length)
            labels[s, start:end] = True
            injections.append(Injection(s, kind, start, end, ch))
            placed += 1
    return Plant(values, labels, injections, period)
