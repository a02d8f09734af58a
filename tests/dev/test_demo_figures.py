"""The demo's judgement of its own alerts: which faults were found, which pumps to plot."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.dev.demo import SAMPLE_S, T0, faults_found, plotted_pumps
from streamer.dev.simulate import Injection, Plant


def plant(injections: list[Injection], sensors: int = 6) -> Plant:
    return Plant(
        values=np.zeros((sensors, 1000, 1)),
        labels=np.zeros((sensors, 1000), dtype=bool),
        injections=injections,
        period=100,
    )


def alert(sensor: int, start_row: int, end_row: int | None) -> list[dict[str, Any]]:
    """An alert's records: open, and closed unless ``end_row`` is None."""
    ident = f"pump-{sensor:02d}@{start_row}"
    opened = {"id": ident, "sensor": f"pump-{sensor:02d}", "state": "open"}
    opened["started"] = T0 + start_row * SAMPLE_S
    out = [opened]
    if end_row is not None:
        out.append({**opened, "state": "closed", "ended": T0 + end_row * SAMPLE_S})
    return out


def test_a_fault_counts_as_found_when_an_alert_overlaps_it_or_the_window_after() -> None:
    live = plant(
        [
            Injection(1, "spike", 100, 110, 0),  # overlapped
            Injection(2, "drift", 300, 350, 0),  # alert starts within the window after
            Injection(3, "stuck", 500, 520, 0),  # alert long after: missed
            Injection(4, "noise", 700, 720, 0),  # still open at the end
        ]
    )
    alerts = alert(1, 105, 130) + alert(2, 360, 380) + alert(3, 700, 720) + alert(4, 710, None)
    assert faults_found(live, alerts, window=16) == [True, True, False, True]


def test_the_plot_shows_missed_faults_first() -> None:
    """Four panels of six pumps: the pump with the missed fault is always among them."""
    live = plant(
        [Injection(s, "spike", 100, 110, 0) for s in range(6)],
    )
    found = [True, True, True, True, True, False]  # pump 5 missed
    names = plotted_pumps(live, found, sensors=6)
    assert len(names) == 4 and "pump-05" in names
    assert names == sorted(names)
    # Without a missed fault, pumps with faults come before those without.
    quiet = plant([Injection(4, "spike", 100, 110, 0)])
    assert "pump-04" in plotted_pumps(quiet, [True], sensors=6)
