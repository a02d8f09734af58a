"""Per-sensor alert state machine: debounce anomalous windows into open/closed alerts.

An alert opens when at least ``open_after`` (k) of a sensor's last ``open_within`` (m)
windows are anomalous; its first window is the earliest anomalous one among those m,
and its id derives from that window's position, so a replay yields the same id. While
open, every anomalous window updates the peak (score and threshold) and the summed
per-channel error used to name the top channels; it closes after ``close_after`` (n)
consecutive normal windows. The windows before a close never count towards the next
alert. Events are rare, so the per-row loop stays in Python, with a fast path for the
common row: a normal window of a sensor with nothing pending (no state is kept for it).

A non-finite score, threshold or channel error (a diverging model: NaN, or an overflow
to infinity) counts as ``+inf``, as in the thresholds: it is the highest peak, and its
channel tops the attribution. Exported state writes ``+inf`` as null (JSON has no
infinity) and restore reads null back as ``+inf``, so such a state survives a restart.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from streamer.errors import ConfigError, DataError, StateError

__all__ = ["STATE_VERSION", "AlertBank", "AlertEvent", "AlertTracker", "alert_id", "open_flags"]

STATE_VERSION = 1
"""Version written by :meth:`AlertTracker.export`; restoring any other raises StateError."""

_KIND = "alert_tracker"


def alert_id(sensor: str, position: str) -> str:
    """Hex blake2b (16 bytes) of ``sensor + NUL + position``: stable across processes."""
    return hashlib.blake2b(f"{sensor}\0{position}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """An alert opening or closing (or, from :meth:`AlertBank.open_alerts`, still open)."""

    state: Literal["open", "closed"]
    id: str
    """``alert_id(sensor, first_position)``."""
    sensor: str
    started: float
    """window_end (epoch seconds) of the alert's first anomalous window."""
    ended: float | None
    """None while open; on close, window_end of the last anomalous window."""
    peak_score: float
    threshold: float
    """Threshold at the peak window."""
    top_channels: tuple[tuple[str, float], ...]
    """Channel names and summed error over the alert's anomalous windows, highest first."""
    first_position: str
    """Opaque position of the first anomalous window."""
    position: str
    """Position of the window that caused this event (the latest one for a snapshot)."""


def _check(open_after: object, open_within: object, close_after: object, top_k: object) -> None:
    for name, v in (("open_after", open_after), ("close_after", close_after), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(open_within, bool) or not isinstance(open_within, int):
        raise ConfigError(f"open_within must be an integer, got {open_within!r}")
    assert isinstance(open_after, int)  # narrowed above; for mypy
    if open_within < open_after:
        raise ConfigError(f"open_within must be >= open_after ({open_after}), got {open_within!r}")


# An anomalous window still inside the last m: (position, window_end, score, threshold, errors).
_Hit = tuple[str, float, float, float, NDArray[np.float64]]


class _Open:
    """The running summary of an open alert."""

    __slots__ = (
        "first_position",
        "last_end",
        "normal_run",
        "peak_score",
        "peak_threshold",
        "position",
        "started",
        "sums",
    )

    def __init__(self, hits: list[_Hit], position: str) -> None:
        first = hits[0]
        self.first_position, self.started = first[0], first[1]
        self.last_end = hits[-1][1]
        peak = first
        for h in hits[1:]:
            if h[2] > peak[2]:  # strictly: the earliest of equal peaks wins
                peak = h
        self.peak_score, self.peak_threshold = peak[2], peak[3]
        self.sums: NDArray[np.float64] = first[4].copy()
        for h in hits[1:]:
            self.sums += h[4]
        self.normal_run = 0
        self.position = position


class AlertTracker:
    """Alert state of one sensor (see the module docstring for the rules)."""

    __slots__ = ("_channels", "_close", "_hits", "_k", "_m", "_open", "_recent", "_top_k", "sensor")

    def __init__(
        self,
        sensor: str,
        channels: Sequence[str],
        open_after: int = 3,
        open_within: int = 5,
        close_after: int = 10,
        top_k: int = 3,
    ) -> None:
        _check(open_after, open_within, close_after, top_k)
        self.sensor = sensor
        self._channels = tuple(channels)
        self._k, self._m, self._close, self._top_k = open_after, open_within, close_after, top_k
        # The last m windows (None: normal), kept only while one of them is anomalous.
        self._recent: deque[_Hit | None] = deque(maxlen=open_within)
        self._hits = 0  # anomalous entries in _recent
        self._open: _Open | None = None

    @property
    def is_open(self) -> bool:
        """Whether an alert is open."""
        return self._open is not None

    @property
    def idle(self) -> bool:
        """No open alert and no anomalous window pending: the tracker holds no information."""
        return self._open is None and self._hits == 0

    def update(
        self,
        position: str,
        window_end: float,
        score: float,
        threshold: float,
        anomalous: bool,
        channel_errors: NDArray[np.floating],
    ) -> AlertEvent | None:
        """Feed the sensor's next window; returns the event it causes, if any.

        ``channel_errors`` is read only when the window is anomalous.
        """
        alert = self._open
        if anomalous:
            # Only anomalous windows are kept: they alone are checked (and they are rare).
            if not (math.isfinite(score) and math.isfinite(threshold)):
                score, threshold = _or_inf(score), _or_inf(threshold)
            errors = _errors_or_inf(channel_errors)
        if alert is not None:
            alert.position = position
            if anomalous:
                alert.normal_run = 0
                alert.last_end = window_end
                if score > alert.peak_score:
                    alert.peak_score, alert.peak_threshold = score, threshold
                alert.sums += errors
                return None
            alert.normal_run += 1
            if alert.normal_run < self._close:
                return None
            self._open = None
            return self._event(alert, "closed", position)
        recent = self._recent
        if anomalous:
            if len(recent) == self._m and recent[0] is not None:
                self._hits -= 1
            hit = (position, window_end, score, threshold, errors.copy())
            recent.append(hit)
            self._hits += 1
            if self._hits < self._k:
                return None
            alert = _Open([h for h in recent if h is not None], position)
            recent.clear()
            self._hits = 0
            self._open = alert
            return self._event(alert, "open", position)
        if self._hits:
            if len(recent) == self._m and recent[0] is not None:
                self._hits -= 1
            recent.append(None)
            if not self._hits:
                recent.clear()
        return None

    def _event(self, alert: _Open, state: Literal["open", "closed"], position: str) -> AlertEvent:
        sums = alert.sums
        order = np.argsort(-sums, kind="stable")[: self._top_k].tolist()
        return AlertEvent(
            state=state,
            id=alert_id(self.sensor, alert.first_position),
            sensor=self.sensor,
            started=alert.started,
            ended=alert.last_end if state == "closed" else None,
            peak_score=alert.peak_score,
            threshold=alert.peak_threshold,
            top_channels=tuple((self._channels[i], float(sums[i])) for i in order),
            first_position=alert.first_position,
            position=position,
        )

    def snapshot(self) -> AlertEvent | None:
        """The open alert as an ``"open"`` event at its latest window, or None."""
        alert = self._open
        return None if alert is None else self._event(alert, "open", alert.position)

    def export(self) -> dict[str, Any]:
        """JSON-serialisable, versioned state: finite numbers, and null for ``+inf``."""
        alert = self._open
        return {
            "kind": _KIND,
            "version": STATE_VERSION,
            "sensor": self.sensor,
            "channels": list(self._channels),
            "recent": [
                None if h is None else [h[0], h[1], _out(h[2]), _out(h[3]), _outs(h[4])]
                for h in self._recent
            ],
            "open": None
            if alert is None
            else {
                "first_position": alert.first_position,
                "started": alert.started,
                "last_end": alert.last_end,
                "peak_score": _out(alert.peak_score),
                "peak_threshold": _out(alert.peak_threshold),
                "sums": _outs(alert.sums),
                "normal_run": alert.normal_run,
                "position": alert.position,
            },
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the state with an exported one; StateError (state unchanged) if unusable.

        A history longer than the current ``open_within`` keeps its latest windows.
        """
        try:
            recent, alert = self._parse(state)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise StateError(f"corrupt alert state: {type(exc).__name__}: {exc}") from exc
        self._recent = deque(recent[-self._m :], maxlen=self._m)
        self._hits = sum(h is not None for h in self._recent)
        if not self._hits:
            self._recent.clear()
        self._open = alert

    def _parse(self, state: Mapping[str, Any]) -> tuple[list[_Hit | None], _Open | None]:
        if not isinstance(state, Mapping):
            raise StateError(f"alert state must be a mapping, got {type(state).__name__}")
        if state.get("kind") != _KIND or state.get("version") != STATE_VERSION:
            raise StateError(
                f"alert state kind/version {state.get('kind')!r}/{state.get('version')!r} "
                f"is not {_KIND!r}/{STATE_VERSION}"
            )
        if state["sensor"] != self.sensor:
            raise StateError(f"alert state is for sensor {state['sensor']!r}, not {self.sensor!r}")
        if list(state["channels"]) != list(self._channels):
            raise StateError(
                f"alert state channels {state['channels']!r} differ from {list(self._channels)!r}"
            )
        width = len(self._channels)
        recent: list[_Hit | None] = []
        for h in state["recent"]:
            if h is None:
                recent.append(None)
                continue
            pos, end, score, thr, errs = h
            recent.append(
                (_text(pos), _real(end), _level(score), _level(thr), _errors(errs, width))
            )
        o = state["open"]
        if o is None:
            return recent, None
        alert = _Open.__new__(_Open)
        alert.first_position, alert.position = _text(o["first_position"]), _text(o["position"])
        alert.started, alert.last_end = _real(o["started"]), _real(o["last_end"])
        alert.peak_score, alert.peak_threshold = (
            _level(o["peak_score"]),
            _level(o["peak_threshold"]),
        )
        alert.sums = _errors(o["sums"], width)
        run = o["normal_run"]
        if isinstance(run, bool) or not isinstance(run, int) or not 0 <= run < self._close:
            raise StateError(f"alert state normal_run must be in [0, {self._close}), got {run!r}")
        alert.normal_run = run
        return recent, alert


def _text(v: object) -> str:
    if not isinstance(v, str):
        raise StateError(f"alert state: expected a string, got {v!r}")
    return v


def _real(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StateError(f"alert state: expected a finite number, got {v!r}")
    return float(v)


def _level(v: object) -> float:
    """A score, threshold or error: a finite number, or null for ``+inf`` (see ``_out``)."""
    return math.inf if v is None else _real(v)


def _errors(v: object, width: int) -> NDArray[np.float64]:
    if not isinstance(v, list) or len(v) != width:
        raise StateError(f"alert state: expected {width} channel errors, got {v!r}")
    return np.array([_level(e) for e in v], dtype=np.float64)


def _or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _errors_or_inf(errors: NDArray[np.floating]) -> NDArray[np.float64]:
    """Channel errors as float64, each non-finite one as ``+inf``."""
    out = np.asarray(errors, dtype=np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        out = np.where(finite, out, np.inf)
    return out


def _out(x: float) -> float | None:
    """A number for exported state: JSON has no infinity, so ``+inf`` is written as null.

    The only non-finite number a tracker holds is ``+inf`` (``update`` maps the others to
    it), and ``_level`` reads null back as ``+inf``: the state round-trips exactly. States
    written before this, which held ``inf`` (or NaN) that orjson wrote as null, restore too.
    """
    return x if math.isfinite(x) else None


def _outs(values: NDArray[np.float64]) -> list[float | None]:
    out: list[float | None] = values.tolist()
    if not np.isfinite(values).all():
        out = [_out(v) for v in out]  # type: ignore[arg-type]
    return out


class AlertBank:
    """Alert trackers for many sensors; state is kept only for sensors with something pending."""

    def __init__(
        self,
        channels: Sequence[str],
        open_after: int = 3,
        open_within: int = 5,
        close_after: int = 10,
        top_k: int = 3,
    ) -> None:
        _check(open_after, open_within, close_after, top_k)
        self._channels = tuple(channels)
        if not self._channels:
            raise ConfigError("channels must name at least one channel, got []")
        self._params = (open_after, open_within, close_after, top_k)
        self._trackers: dict[str, AlertTracker] = {}
        # What a sensor with nothing pending exports, but for its name: a commit round
        # exports every changed sensor, nearly all of them idle.
        self._idle = self._new("").export()

    def _new(self, sensor: str) -> AlertTracker:
        return AlertTracker(sensor, self._channels, *self._params)

    def update(
        self,
        sensors: Sequence[str],
        positions: Sequence[str],
        window_end: NDArray[np.float64],
        scores: NDArray[np.floating],
        thresholds: NDArray[np.floating],
        anomalous: NDArray[np.bool_],
        channel_errors: NDArray[np.floating],
    ) -> tuple[list[AlertEvent], NDArray[np.bool_]]:
        """Feed a batch of windows (rows of one sensor in order).

        Returns the events in input order and, per row, whether that row's sensor has an
        open alert after the row.
        """
        size = len(sensors)
        flags = np.asarray(anomalous, dtype=bool)
        errors = np.asarray(channel_errors, dtype=np.float64)
        ends, sc, th = (np.asarray(a, dtype=np.float64) for a in (window_end, scores, thresholds))
        shapes = {len(positions), flags.size, ends.size, sc.size, th.size}
        if shapes != {size} or errors.shape != (size, len(self._channels)):
            raise DataError(
                f"alert batch shapes disagree: {size} sensors, {len(positions)} positions, "
                f"window_end {ends.shape}, scores {sc.shape}, thresholds {th.shape}, "
                f"anomalous {flags.shape}, channel_errors {errors.shape} "
                f"(expected ({size}, {len(self._channels)}))"
            )
        is_open = np.zeros(size, dtype=bool)
        events: list[AlertEvent] = []
        trackers = self._trackers
        if not trackers and not flags.any():
            return events, is_open
        flag_list = flags.tolist()
        for i, sensor in enumerate(sensors):
            tr = trackers.get(sensor)
            if tr is None:
                if not flag_list[i]:
                    continue
                tr = trackers[sensor] = self._new(sensor)
            ev = tr.update(
                positions[i], float(ends[i]), float(sc[i]), float(th[i]), flag_list[i], errors[i]
            )
            if ev is not None:
                events.append(ev)
            if tr.is_open:
                is_open[i] = True
            elif tr.idle:
                del trackers[sensor]  # nothing pending: keep no state for it
        return events, is_open

    def open_alerts(self) -> list[AlertEvent]:
        """Snapshots of every open alert (``state="open"``, position: its latest window)."""
        out = []
        for tr in self._trackers.values():
            snap = tr.snapshot()
            if snap is not None:
                out.append(snap)
        return out

    def open_count(self) -> int:
        """Sensors with an open alert."""
        return sum(1 for tr in self._trackers.values() if tr.is_open)

    def is_open(self, sensor: str) -> bool:
        """Whether the sensor has an open alert."""
        tr = self._trackers.get(sensor)
        return tr is not None and tr.is_open

    def export(self, sensor: str) -> dict[str, Any]:
        """The sensor's state (an idle state for a sensor with nothing pending)."""
        tr = self._trackers.get(sensor)
        if tr is not None:
            return tr.export()
        idle = self._idle
        return {
            **idle,
            "sensor": sensor,
            "channels": [*idle["channels"]],
            "recent": [*idle["recent"]],
        }

    def restore(self, sensor: str, state: Mapping[str, Any]) -> None:
        """Install a sensor's exported state; StateError leaves the sensor as it was."""
        tr = self._new(sensor)
        tr.restore(state)
        if tr.idle:
            self._trackers.pop(sensor, None)
        else:
            self._trackers[sensor] = tr

    def drop(self, sensors: Sequence[str]) -> None:
        """Forget these sensors (e.g. on partition revocation); unknown names are ignored."""
        for s in sensors:
            self._trackers.pop(s, None)

    def __len__(self) -> int:
        """Sensors with state (an open alert or a pending anomalous window)."""
        return len(self._trackers)


def open_flags(
    anomalous: Sequence[bool], open_after: int, open_within: int, close_after: int
) -> NDArray[np.bool_]:
    """Whether an :class:`AlertTracker` with these rules has an alert open after each window.

    The tracker's open and close rule alone, for replaying a sensor's anomalous flags
    under many rules (choosing the rule out of fold): no events, no channels, no ids.
    Windows that arrive while an alert is open do not count towards the next one, and
    counting starts afresh after each open and close, as in the tracker.
    """
    out = np.zeros(len(anomalous), dtype=bool)
    recent: deque[bool] = deque(maxlen=open_within)
    hits = normal_run = 0
    is_open = False
    for i, hit in enumerate(anomalous):
        if is_open:
            normal_run = 0 if hit else normal_run + 1
            is_open = normal_run < close_after
        elif hit or hits:
            if len(recent) == open_within and recent[0]:
                hits -= 1
            recent.append(bool(hit))
            hits += bool(hit)
            if hit and hits >= open_after:
                is_open, normal_run, hits = True, 0, 0
                recent.clear()
            elif not hits:
                recent.clear()
        out[i] = is_open
    return out
