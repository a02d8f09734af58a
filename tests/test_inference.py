"""The inference worker: micro-batching, failure propagation, shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.config import InferenceConfig
from streamer.errors import InferenceError
from streamer.inference import InferenceWorker
from streamer.model.checkpoint import LoadedModel
from streamer.model.networks import Architecture, ScoringModel
from streamer.model.train import score_windows


def make_model(window: int = 8, channels: int = 2) -> LoadedModel:
    torch.manual_seed(0)
    module = ScoringModel(
        Architecture("dense", window, channels, 8, 4, False),
        torch.zeros(channels),
        torch.ones(channels),
    )
    module.eval()
    return LoadedModel(
        module,
        "dense-test",
        tuple(f"c{i}" for i in range(channels)),
        window,
        1,
        np.ones(10),
        {},
        Path("."),
    )


class Exploding(torch.nn.Module):
    """A network that fails on its second call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= 2:
            raise RuntimeError("boom")
        return x


class Counting(torch.nn.Module):
    """Output depends on Python state (calls so far): a trace cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


class TestTrace:
    """On CPU the model runs as a TorchScript trace, checked against the module."""

    def test_traced_scores_are_bit_identical_to_eager(self) -> None:
        """The trace and the module give the same bits, whatever the batch."""
        rng = np.random.default_rng(5)
        batches = [rng.normal(size=(n, 8, 2)).astype(np.float32) for n in (1, 7, 64, 130)]
        results = {}
        for trace in (True, False):
            worker = InferenceWorker(make_model(), InferenceConfig(trace=trace)).start()
            results[trace] = [worker.submit(b).result(timeout=30) for b in batches]
            assert worker.traced is trace
            worker.close()
        for a, b in zip(results[True], results[False], strict=True):
            assert np.array_equal(a.scores, b.scores)
            assert np.array_equal(a.channel_errors, b.channel_errors)

    def test_untraceable_model_falls_back_to_the_module(self) -> None:
        """A network whose output the trace would freeze is run eagerly instead."""
        model = make_model()
        model.module.network = Counting()
        worker = InferenceWorker(model, InferenceConfig()).start()
        first = worker.submit(np.ones((2, 8, 2), np.float32)).result(timeout=30)
        second = worker.submit(np.ones((2, 8, 2), np.float32)).result(timeout=30)
        assert not worker.traced
        assert not np.array_equal(first.scores, second.scores)  # the module ran, not a trace
        worker.close()


class TestInferenceWorker:
    """Scoring through the worker thread."""

    def test_results_match_direct_scoring_and_batches_merge(self) -> None:
        """Many small submissions give the direct scores and are merged into few forward passes."""
        model = make_model()
        rng = np.random.default_rng(0)
        batches = [
            rng.normal(size=(int(rng.integers(1, 20)), 8, 2)).astype(np.float32) for _ in range(40)
        ]
        worker = InferenceWorker(
            model, InferenceConfig(max_batch=256, max_wait_ms=50, queue_size=64)
        )
        futures = [worker.submit(b) for b in batches]  # queued before the thread starts
        worker.start()
        for b, fut in zip(batches, futures, strict=True):
            res = fut.result(timeout=30)
            expected, errors = score_windows(model.module, b)
            np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(res.channel_errors, errors, rtol=1e-5, atol=1e-7)
            assert res.model_version == "dense-test"
        assert worker.batches < len(batches)
        worker.close()

    def test_waits_only_to_fill_the_last_chunk(self) -> None:
        """Whole chunks are scored without waiting out max_wait_ms; a partly filled last
        chunk waits for the windows that fill it, and they share its pass."""
        rng = np.random.default_rng(12)
        x = rng.normal(size=(8, 8, 2)).astype(np.float32)
        cfg = InferenceConfig(chunk=4, max_batch=64, max_wait_ms=20_000, trace=False)
        passes: list[int] = []  # windows per forward pass
        worker = InferenceWorker(make_model(), cfg, on_batch=lambda n, _s: passes.append(n))
        worker.start()
        try:
            started = time.monotonic()
            worker.submit(x[:4]).result(timeout=10)  # one whole chunk: no wait
            assert time.monotonic() - started < 10
            first = worker.submit(x[:3])  # 3 of 4: waits for more
            time.sleep(0.3)
            assert not first.done()
            second = worker.submit(x[3:8])  # fills the chunk (and one more whole chunk)
            first.result(timeout=10)
            second.result(timeout=10)
            deadline = time.monotonic() + 10  # the pass is counted after its results
            while len(passes) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert passes == [4, 8]  # the whole chunk, then the two submissions as one
        finally:
            worker.close()

    def test_pieces_match_one_submission(self) -> None:
        """A batch split into pieces (one future each) scores as one submission does."""
        rng = np.random.default_rng(11)
        x = rng.normal(size=(150, 8, 2)).astype(np.float32)
        worker = InferenceWorker(make_model(), InferenceConfig(chunk=16, max_batch=64)).start()
        whole = worker.submit(x).result(timeout=30)
        futures = worker.submit_pieces(x, 40)
        assert [len(f.result(timeout=30).scores) for f in futures] == [40, 40, 40, 30]
        parts = [f.result(timeout=30) for f in futures]
        assert np.array_equal(np.concatenate([p.scores for p in parts]), whole.scores)
        assert np.array_equal(
            np.concatenate([p.channel_errors for p in parts]), whole.channel_errors
        )
        worker.close()

    def test_worker_exception_reaches_the_caller(self) -> None:
        """A failing forward pass fails the futures and later submits; nothing hangs."""
        model = make_model()
        model.module.network = Exploding()
        # Eager: tracing would spend the network's one good call.
        worker = InferenceWorker(
            model, InferenceConfig(max_batch=4, max_wait_ms=0, queue_size=2, trace=False)
        ).start()
        x = np.zeros((4, 8, 2), np.float32)
        assert worker.submit(x).result(timeout=10).scores.shape == (4,)
        with pytest.raises(RuntimeError, match="boom"):
            worker.submit(x).result(timeout=10)
        deadline = time.monotonic() + 10
        with pytest.raises(InferenceError, match="boom"):
            while time.monotonic() < deadline:
                worker.submit(x).result(timeout=10)
        worker.close()

    def test_full_queue_blocks_then_times_out(self) -> None:
        """With the worker stalled, submit blocks on a full queue and raises after its timeout."""
        import queue

        worker = InferenceWorker(
            make_model(), InferenceConfig(queue_size=2)
        )  # not started: stalled
        x = np.zeros((1, 8, 2), np.float32)
        worker.submit(x)
        worker.submit(x)
        assert worker.is_full
        started = time.monotonic()
        with pytest.raises(queue.Full):
            worker.submit(x, timeout_s=0.3)
        assert time.monotonic() - started >= 0.3
        assert worker.queued_windows == 2  # the refused batch is not counted

    def test_queue_is_full_at_max_queued_windows(self) -> None:
        """Few large batches fill the queue by windows; it is half empty again below half."""
        worker = InferenceWorker(
            make_model(), InferenceConfig(queue_size=64, max_queued_windows=100)
        )  # not started: stalled
        futures = worker.submit_pieces(np.zeros((60, 8, 2), np.float32), 16)
        assert worker.queued_windows == 60
        assert not worker.is_full
        assert not worker.is_half_empty
        futures += worker.submit_pieces(np.zeros((40, 8, 2), np.float32), 16)
        assert worker.queued_windows == 100
        assert worker.queue_depth == 2  # two batches: far below queue_size
        assert worker.is_full
        worker.start()
        for fut in futures:
            fut.result(timeout=10)
        assert worker.queued_windows == 0
        assert not worker.is_full
        assert worker.is_half_empty
        worker.close()

    def test_queue_of_many_batches_is_full_by_count(self) -> None:
        """Many small batches fill the queue by queue_size before max_queued_windows."""
        worker = InferenceWorker(
            make_model(), InferenceConfig(queue_size=4, max_queued_windows=1000)
        )  # not started: stalled
        x = np.zeros((1, 8, 2), np.float32)
        for _ in range(2):
            worker.submit(x)
        assert not worker.is_full
        assert not worker.is_half_empty  # 2 of 4 batches: not under half
        for _ in range(2):
            worker.submit(x)
        assert worker.is_full
        assert worker.queued_windows == 4

    def test_close_fails_unscored_work_and_rejects_new(self) -> None:
        """Closing scores what was queued, then submit raises."""
        worker = InferenceWorker(make_model(), InferenceConfig()).start()
        fut = worker.submit(np.zeros((3, 8, 2), np.float32))
        worker.close()
        assert fut.result(timeout=5).scores.shape == (3,)
        with pytest.raises(InferenceError, match="closed"):
            worker.submit(np.zeros((1, 8, 2), np.float32))

    def test_wrong_shape_is_rejected(self) -> None:
        """Windows of the wrong shape name the expected shape."""
        worker = InferenceWorker(make_model(), InferenceConfig()).start()
        with pytest.raises(InferenceError, match=r"\(n, 8, 2\)"):
            worker.submit(np.zeros((3, 9, 2), np.float32))
        worker.close()

    def test_swap_model_between_batches(self) -> None:
        """After swap_model results carry the new version; mismatched models are refused."""
        worker = InferenceWorker(make_model(), InferenceConfig()).start()
        x = np.zeros((2, 8, 2), np.float32)
        assert worker.submit(x).result(timeout=5).model_version == "dense-test"
        new = make_model()
        new = LoadedModel(
            new.module, "dense-v2", new.channels, 8, 1, new.calibration, {}, Path(".")
        )
        worker.swap_model(new)
        assert worker.submit(x).result(timeout=5).model_version == "dense-v2"
        with pytest.raises(InferenceError, match="window"):
            worker.swap_model(make_model(window=9))
        worker.close()
        assert threading.active_count() >= 1


class TestDeterminism:
    """Scores do not depend on how windows were batched."""

    def test_scores_are_bit_identical_across_batchings(self) -> None:
        """The same windows submitted in different groupings give bit-identical scores."""
        model = make_model(window=16, channels=3)
        x = np.random.default_rng(4).normal(size=(300, 16, 3)).astype(np.float32)
        worker = InferenceWorker(
            model, InferenceConfig(max_batch=128, chunk=32, max_wait_ms=0)
        ).start()
        whole = worker.submit(x).result(timeout=30).scores
        for sizes in ([1] * 10 + [290], [7, 93, 200], [150, 150]):
            parts, lo = [], 0
            for size in sizes:
                parts.append(worker.submit(x[lo : lo + size]))
                lo += size
            got = np.concatenate([f.result(timeout=30).scores for f in parts])
            assert np.array_equal(got, whole)
        worker.close()
