"""One threshold per sensor, stepped in batches across sensors, exported and restored."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamer.errors import DataError, StaleStateError
from streamer.scoring.thresholds.base import (
    Threshold,
    ThresholdResult,
)

# A sensor with at least this many rows in one batch is stepped on its own.
_ALONE_FROM = 8


class ThresholdBank:
    """One threshold per sensor, each cloned from a calibrated prototype on first sight."""

    def __init__(self, prototype: Threshold) -> None:
        self._prototype = prototype
        self._by_sensor: dict[str, Threshold] = {}
        # The prototype's calibration sample and its SHA-256, while it is the same array.
        self._sample_digest: tuple[NDArray[np.float64], str] | None = None
        # Thresholds that owe a refit from a batch step, oldest first (see ``settle``).
        self._unsettled: OrderedDict[str, Threshold] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_sensor)

    def __contains__(self, sensor: object) -> bool:
        return sensor in self._by_sensor

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_sensor))

    @property
    def prototype(self) -> Threshold:
        """The calibrated threshold new sensors start from."""
        return self._prototype

    def set_prototype(self, prototype: Threshold) -> None:
        """Start sensors seen from now on from ``prototype``; known sensors keep theirs."""
        self._prototype = prototype

    def get(self, sensor: str) -> Threshold | None:
        """The sensor's threshold, or None if it has not been seen (or was dropped)."""
        return self._by_sensor.get(sensor)

    def _of(self, sensor: str) -> Threshold:
        th = self._by_sensor.get(sensor)
        if th is None:
            th = self._by_sensor[sensor] = self._prototype.clone()
        return th

    def step(
        self, sensors: Sequence[str] | NDArray[np.str_], scores: NDArray[np.floating]
    ) -> ThresholdResult:
        """Step a batch whose rows belong to many sensors; each sensor's rows stay in order."""
        x = np.asarray(scores, dtype=np.float64)
        flat = not isinstance(sensors, np.ndarray) or sensors.ndim == 1
        if x.ndim != 1 or not flat or len(sensors) != x.size:
            raise DataError(
                "sensors and scores must be 1-D of one length, "
                f"got {np.shape(sensors)} and {x.shape}"
            )
        size = x.size
        thr = np.empty(size)
        lik = np.empty(size)
        anom = np.zeros(size, dtype=bool)
        if size == 0:
            return ThresholdResult(thr, anom, lik)
        listed = [str(s) for s in sensors]
        if size > 1 and len(set(listed)) == size:
            # One row per sensor (a burst's usual piece): one round, in the given order.
            owners = [self._of(name) for name in listed]
            self._round(np.arange(size), owners, x, thr, anom, lik)
            self._owe(listed, owners)
            return ThresholdResult(thr, anom, lik)
        names, inverse = np.unique(np.asarray(listed), return_inverse=True)
        if names.size == 1:
            return self._of(str(names[0])).step(x)
        owners = [self._of(str(name)) for name in names.tolist()]
        counts = np.bincount(inverse, minlength=names.size)
        order = np.argsort(inverse, kind="stable")  # stable: keeps each sensor's rows in order
        ends = np.cumsum(counts)
        # A sensor with many rows in the batch is stepped alone (its own step vectorises
        # over them); the others, usually nearly all, in rounds across sensors.
        for j in np.flatnonzero(counts >= _ALONE_FROM).tolist():
            idx = order[ends[j] - counts[j] : ends[j]]
            res = owners[j].step(x[idx])
            thr[idx], anom[idx], lik[idx] = res.threshold, res.anomalous, res.likelihood
        if counts.min() < _ALONE_FROM:
            # Round k holds the k-th row of every sensor: one row per sensor, so a sensor's
            # rows are still stepped in order, and each round is one vectorised call.
            rank = np.empty(size, dtype=np.intp)
            rank[order] = np.arange(size) - np.repeat(ends - counts, counts)
            rank[(counts >= _ALONE_FROM)[inverse]] = -1
            for k in range(min(int(counts.max()), _ALONE_FROM - 1)):
                rows = np.flatnonzero(rank == k)
                if rows.size:
                    group = [owners[j] for j in inverse[rows].tolist()]
                    self._round(rows, group, x, thr, anom, lik)
                    self._owe([listed[i] for i in rows.tolist()], group)
        return ThresholdResult(thr, anom, lik)

    def _owe(self, sensors: list[str], stepped: list[Threshold]) -> None:
        """Note which of these just-stepped thresholds owe a refit."""
        unsettled = self._unsettled
        for name, th in zip(sensors, stepped, strict=True):
            if th.unsettled:
                unsettled[name] = th

    @property
    def unsettled(self) -> int:
        """How many sensors' thresholds owe a refit."""
        return len(self._unsettled)

    def settle(self, budget_s: float) -> int:
        """Do owed refits, oldest first, for about ``budget_s``; returns how many remain.

        A batch step across sensors leaves each new peak's tail refit owed (0.05-0.5 ms
        each, a few dozen in a burst of 1,000 windows): the daemon calls this while
        nothing is in flight, so the refits run between bursts instead of delaying one.
        One the daemon does not get to is done by the sensor's next step, with the same
        result.
        """
        owed = self._unsettled
        deadline = time.monotonic() + budget_s
        while owed:
            _, th = owed.popitem(last=False)
            th.settle()
            if time.monotonic() >= deadline:
                break
        return len(owed)

    @staticmethod
    def _round(
        rows: NDArray[np.intp],
        owners: list[Threshold],
        x: NDArray[np.float64],
        thr: NDArray[np.float64],
        anom: NDArray[np.bool_],
        lik: NDArray[np.float64],
    ) -> None:
        """Step ``x[rows[i]]`` on ``owners[i]`` (distinct thresholds), writing the results."""
        kinds = {type(o) for o in owners}
        for kind in kinds:
            if len(kinds) == 1:
                sel, group = rows, owners
            else:
                mask = np.fromiter((type(o) is kind for o in owners), bool, len(owners))
                sel = rows[mask]
                group = [o for o, m in zip(owners, mask.tolist(), strict=True) if m]
            res = kind.step_each(group, x[sel])
            thr[sel], anom[sel], lik[sel] = res.threshold, res.anomalous, res.likelihood

    def drop(self, sensors: Sequence[str]) -> None:
        """Forget these sensors (e.g. on partition revocation); unknown names are ignored."""
        for s in sensors:
            self._by_sensor.pop(s, None)
            self._unsettled.pop(s, None)

    def export(self, sensor: str, of: Threshold | None = None) -> dict[str, Any]:
        """The sensor's state dict (KeyError if it has none).

        ``of``: export this copy (``clone``) of the sensor's threshold instead. A clone
        takes a quarter of the time of an export: a commit round copies every changed
        sensor's threshold at one point of the stream and exports them while it goes on.

        A calibration sample shared with the prototype is written as its SHA-256
        (``ref_sha256``) instead of 256 numbers: most of a state record otherwise, and
        every changed sensor's record is written at every commit round.
        """
        th = self._by_sensor[sensor] if of is None else of
        shared = self._prototype_sample()
        if shared is None or th.reference is not shared[0]:
            return th.state_dict()
        state = th.state_dict(reference=False)
        state["ref_sha256"] = shared[1]
        return state

    def _prototype_sample(self) -> tuple[NDArray[np.float64], str] | None:
        """The prototype's calibration sample and its SHA-256 (None if it keeps none)."""
        ref = self._prototype.reference
        if ref is None:
            return None
        if self._sample_digest is None or self._sample_digest[0] is not ref:
            digest = hashlib.sha256(np.ascontiguousarray(ref, dtype="<f8").tobytes()).hexdigest()
            self._sample_digest = (ref, digest)
        return self._sample_digest

    def restore(self, sensor: str, state: Mapping[str, Any]) -> None:
        """Install a sensor's state; StateError leaves the sensor as it was."""
        th = self._prototype.clone()
        if isinstance(state, Mapping) and "ref_sha256" in state:
            shared = self._prototype_sample()
            if shared is None or state["ref_sha256"] != shared[1]:
                raise StaleStateError(
                    f"state refers to calibration sample {state['ref_sha256']!r}, which is not "
                    "the current model's (the model changed since it was written)"
                )
            state = {k: v for k, v in state.items() if k != "ref_sha256"}
            state["ref"] = shared[0]  # the array itself: nothing to parse
        th.load_state_dict(state)
        _share_reference(th, self._prototype)
        self._by_sensor[sensor] = th
        self._unsettled.pop(sensor, None)


def _share_reference(th: Threshold, prototype: Threshold) -> None:
    """Point a restored threshold at the prototype's equal calibration sample.

    Saves the sample's memory per sensor, and lets a batch across sensors search one
    array instead of one per sensor.
    """
    mine, theirs = th.reference, prototype.reference
    if mine is None or theirs is None or mine is theirs or not np.array_equal(mine, theirs):
        return
    th.share_reference(theirs)
