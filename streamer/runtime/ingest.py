"""Ingest: a consumed batch into the engine's rings, and what cannot go there to dead letters.

Per batch: drop what is not ours or was processed already (a pause may refetch),
decode, dead-letter what does not decode, is stamped too far ahead, finds no room
under ``stream.max_sensors`` or arrives out of order, and submit the rest for
inference. Only once all that is done does a partition's H move past the batch: a
commit round never covers an offset whose samples were not processed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from streamer.codec import DeadLetter, DecodedSamples, Decoder, to_position
from streamer.config import Config
from streamer.kafka.source import Consumed
from streamer.metrics import Metrics
from streamer.runtime.counters import Counters
from streamer.runtime.partitions import Partition, PartitionTable
from streamer.runtime.publisher import Publisher

if TYPE_CHECKING:  # the engine imports torch
    from streamer.engine import Engine

__all__ = ["Ingest"]


class Ingest:
    """Turns consumed batches into queued inference batches and dead letters."""

    def __init__(
        self,
        cfg: Config,
        decoder: Decoder,
        table: PartitionTable,
        engine: Engine,
        publisher: Publisher,
        metrics: Metrics,
        counters: Counters,
    ) -> None:
        self.stream = cfg.stream
        self.chunk = cfg.inference.chunk
        self.decoder = decoder
        self.table = table
        self.engine = engine
        self.publisher = publisher
        self.metrics = metrics
        self.counters = counters

    def process(self, batch: Consumed) -> None:
        """Process a consumed batch; then move each of its partitions' H past it."""
        part_arr, off_arr = batch.partitions, batch.offsets
        keep = np.ones(len(batch), dtype=bool)
        heads: list[tuple[Partition, int]] = []
        parts = self.table.parts
        for p in np.unique(part_arr).tolist():
            sel = part_arr == p
            part = parts.get(p)
            if part is None or part.restoring:
                # Not ours (any more), or its state is not in place yet: it is paused, and
                # resumed from its commit once it is (a message fetched before the pause
                # is fetched again then).
                keep &= ~sel
                continue
            # Never process an offset twice in one assignment (pause/resume may refetch).
            keep &= ~(sel & (off_arr <= part.consumed))
            heads.append((part, int(off_arr[sel].max())))
        if not keep.all():
            batch = batch.take(np.flatnonzero(keep))
        if len(batch):
            self._process_kept(batch)
        # Only now is the batch fully processed (decoded, dead-lettered, its windows
        # queued): H, what a commit round may cover, moves past it. Raised above, it
        # stays where it was, so no round can commit an offset that was never processed.
        for part, head in heads:
            part.consumed = max(part.consumed, head)

    def _process_kept(self, batch: Consumed) -> None:
        """Decode a batch's new messages, dead-letter the bad ones, queue their windows."""
        self.counters.messages += len(batch)
        self.metrics.messages_consumed.inc(len(batch))
        part_arr = batch.partitions
        positions = to_position(part_arr, batch.offsets)
        samples, dead = self.decoder.decode(batch.values, batch.keys, positions)
        for d in dead:
            self._dead_letter(batch, d)
        if self.table.parked.resume:
            # Replayed samples a restored parked sensor's saved ring holds already.
            held = self.table.parked.held(samples.keys, samples.positions)
            if held.any():
                samples = samples.take(np.flatnonzero(~held))
        samples = self._refuse_future(batch, samples)
        s_parts = part_arr[samples.index]
        refused = self.table.track(samples.keys, s_parts)
        if refused is not None:
            keys, max_sensors = samples.keys, self.stream.max_sensors
            samples = self._refuse(
                batch,
                samples,
                refused,
                "sensor_limit",
                lambda r: (
                    f"new sensor {keys[r]!r} refused: stream.max_sensors "
                    f"({max_sensors}) reached and every sensor is in this batch"
                ),
            )
            s_parts = part_arr[samples.index]
        if len(samples) == 0:
            return
        self.counters.samples += len(samples)
        self.metrics.samples_decoded.inc(len(samples))
        push, pieces = self.engine.submit_pieces(
            samples.keys,
            samples.ts,
            samples.values,
            samples.positions,
            piece=self.chunk,
            keep=self.table.replay_filter(s_parts, samples.positions),
        )
        for r in push.rejected.tolist():
            self._dead_letter(
                batch,
                DeadLetter(
                    int(samples.index[r]),
                    "out_of_order",
                    f"timestamp {float(samples.ts[r])!r} is not after the sensor's previous sample",
                ),
            )
        self.publisher.queue(pieces)
        # The worker may already be done with older batches: publish them without waiting.
        self.publisher.publish_done(block_s=0.0)

    def _dead_letter(self, batch: Consumed, d: DeadLetter) -> None:
        """Dead-letter row ``d.index`` of the batch, unless published before a restart."""
        p, off = int(batch.partitions[d.index]), int(batch.offsets[d.index])
        if off <= self.table.parts[p].restored_h:
            return  # published before the restart
        self.publisher.dead_letter(batch.values[d.index], batch.keys[d.index], p, off, d)

    def _refuse_future(self, batch: Consumed, samples: DecodedSamples) -> DecodedSamples:
        """Dead-letter samples stamped more than stream.max_future_s ahead of the wall clock."""
        if len(samples) == 0:
            return samples
        now = time.time()
        limit = now + self.stream.max_future_s
        if float(samples.ts.max()) <= limit:
            return samples  # the common case: one comparison per batch
        ts, stream = samples.ts, self.stream
        return self._refuse(
            batch,
            samples,
            ts > limit,
            "bad_timestamp",
            lambda r: (
                f"{stream.timestamp_field} {float(ts[r])!r} is {float(ts[r]) - now:.0f} s "
                f"ahead of the clock (stream.max_future_s {stream.max_future_s:g})"
            ),
        )

    def _refuse(
        self,
        batch: Consumed,
        samples: DecodedSamples,
        bad: NDArray[np.bool_],
        kind: str,
        reason: Callable[[int], str],
    ) -> DecodedSamples:
        """Dead-letter the samples ``bad`` marks (``reason(row)`` says why); the others."""
        for r in np.flatnonzero(bad).tolist():
            self._dead_letter(batch, DeadLetter(int(samples.index[r]), kind, reason(r)))
        return samples.take(np.flatnonzero(~bad))
