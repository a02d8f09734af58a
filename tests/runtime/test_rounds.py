"""The commit round as a state machine, over fakes: what only the broker tests reached before.

Each test drives ``CommitRounds`` with a real partition table and state writer over
the torch-free stores, a fake producer (acknowledges, withholds or fails on command)
and a fake committer (accepts or refuses as during a rebalance).
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamer.errors import KafkaError
from streamer.kafka.source import CommitResult
from streamer.runtime.partitions import Partition
from streamer.runtime.rounds import BUSY_WAIT_S, Checkpoint, CommitSent, Round
from tests.runtime.conftest import STATE_TOPIC, Rig


def meta_h(commit: tuple[int, str]) -> int:
    return int(orjson.loads(commit[1])["h"])


class TestIntervalRound:
    def test_waits_for_the_barrier_then_for_delivery_then_commits(self, rig: Rig) -> None:
        rig.assign(0)
        h = rig.consume(0, ["s1", "s2"], first_offset=10)
        rig.rounds.start([0], "interval", waiting=1)
        r = rig.rounds.round
        assert r is not None and r.commits is None  # one batch before H still unpublished
        assert rig.rounds.advance() is None and not rig.producer.records
        rig.rounds.batch_published()
        assert r.commits is not None and len(r.unsent) == 2  # copied at H, not yet produced
        rig.producer.acked = False
        assert rig.rounds.advance() is None  # produced, not acknowledged: no commit
        assert sorted(rig.producer.state_keys()) == ["s1", "s2"] and not rig.committer.sent
        rig.producer.acked = True
        assert rig.rounds.advance() is not None and rig.rounds.round is None
        (sent,) = rig.committer.sent
        # The commit starts at the oldest anchor: the first sample of s1.
        assert sent[0][0] == 10 and meta_h(sent[0]) == h
        assert rig.table.parts[0].committed_h == -1  # booked only on the answer
        rig.rounds.answered(CommitResult({0: 10}, {}))
        assert rig.table.parts[0].committed_h == h and rig.rounds.commits == 1

    def test_state_waits_for_an_idle_pass_for_at_most_the_busy_wait(self, rig: Rig) -> None:
        """With scores in flight a round produces no state (it would delay them), until it
        is BUSY_WAIT_S old; an idle pass produces at once."""
        rig.assign(0)
        rig.consume(0, ["s1", "s2"], first_offset=0)
        rig.rounds.start([0], "interval", waiting=0)
        r = rig.rounds.round
        assert r is not None and len(r.unsent) == 2
        assert rig.rounds.advance(busy=True) is None and not rig.producer.records
        r.started -= BUSY_WAIT_S  # as if the daemon had been busy for that long
        assert rig.rounds.advance(busy=True) is not None
        assert sorted(rig.producer.state_keys()) == ["s1", "s2"]
        rig.consume(0, ["s3"], first_offset=2)
        rig.rounds.start([0], "interval", waiting=0)
        assert rig.rounds.advance(busy=False) is not None  # idle: at once
        assert sorted(rig.producer.state_keys()) == ["s1", "s2", "s3"]

    def test_sensor_arriving_after_h_is_written_by_the_next_round(self, rig: Rig) -> None:
        rig.assign(0)
        rig.consume(0, ["s1"], first_offset=0)
        rig.rounds.start([0], "interval", waiting=1)
        rig.consume(0, ["late"], first_offset=1)  # after H, before the barrier
        rig.rounds.batch_published()
        assert [s[0] for s in rig.rounds.round.unsent] == ["s1"]  # type: ignore[union-attr]
        assert "late" in rig.table.parts[0].dirty

    def test_nothing_consumed_since_the_commit_starts_no_round(self, rig: Rig) -> None:
        rig.assign(0)
        rig.table.parts[0].consumed = rig.table.parts[0].committed_h = 5
        rig.rounds.start([0], "interval", waiting=0)
        assert rig.rounds.round is None and not rig.committer.sent


class TestDeferredCommit:
    def test_deferred_partition_keeps_its_h_and_the_next_round_commits_it(self, rig: Rig) -> None:
        rig.assign(0, 1)
        h0 = rig.consume(0, ["a"], first_offset=0)
        h1 = rig.consume(1, ["b"], first_offset=0)
        rig.rounds.start([0, 1], "interval", waiting=0)
        while rig.rounds.round is not None:
            rig.rounds.advance()
        rig.rounds.answered(CommitResult({0: 0}, {1: "REBALANCE_IN_PROGRESS"}))
        assert rig.table.parts[0].committed_h == h0 and rig.table.parts[1].committed_h == -1
        # Partition 1 still has its consumed H above its commit: the next round covers it.
        rig.rounds.start([0, 1], "interval", waiting=0)
        assert [c.partition for c in rig.rounds.round.checkpoints] == [1]  # type: ignore[union-attr]
        while rig.rounds.round is not None:
            rig.rounds.advance()
        rig.rounds.answered(CommitResult({1: 0}, {}))
        assert rig.table.parts[1].committed_h == h1

    def test_a_refused_send_commits_nothing_and_the_revoke_does(self, rig: Rig) -> None:
        rig.assign(0)
        h = rig.consume(0, ["a"], first_offset=0)
        rig.committer.refuse = True  # a rebalance is under way
        rig.rounds.start([0], "interval", waiting=0)
        while rig.rounds.round is not None:
            rig.rounds.advance()
        assert not rig.rounds.sent and rig.table.parts[0].committed_h == -1
        rig.committer.refuse = False
        rig.rounds.run([0], "revoke", drain=lambda: None)
        (done,) = rig.committer.sync
        assert meta_h(done[0]) == h and rig.table.parts[0].committed_h == h

    def test_answers_book_only_what_was_committed(self, rig: Rig) -> None:
        rig.assign(0, 1)
        rig.rounds.answered(CommitResult({0: 5}, {}))  # nothing sent: ignored
        assert rig.rounds.commits == 0 and rig.table.parts[0].committed_h == -1
        for h in (40, 80):
            rig.rounds.sent.append(CommitSent({0: h, 1: h}, "interval", 0, 0.0, 0.0, 0.0, {}))
        rig.rounds.answered(CommitResult({0: 11}, {1: "REBALANCE_IN_PROGRESS"}))
        assert rig.table.parts[0].committed_h == 40 and rig.table.parts[1].committed_h == -1
        assert rig.rounds.commits == 1 and len(rig.rounds.sent) == 1
        # An answer never moves H back (a revocation commit may have moved it on).
        rig.table.parts[0].committed_h = 100
        rig.rounds.answered(CommitResult({0: 12, 1: 12}, {}))
        assert rig.table.parts[0].committed_h == 100 and rig.table.parts[1].committed_h == 80
        assert rig.rounds.commits == 2 and not rig.rounds.sent


class TestRevocationMidRound:
    def test_unsent_state_goes_to_the_revocation_round(self, rig: Rig) -> None:
        rig.assign(0)
        h = rig.consume(0, ["a", "b", "c"], first_offset=0)
        rig.rounds.start([0], "interval", waiting=0)
        r = rig.rounds.round
        assert r is not None and len(r.unsent) == 3
        # The rebalance comes before the loop produced anything of the round.
        rig.rounds.abandon()
        assert rig.rounds.round is None and not rig.producer.records
        assert rig.table.parts[0].dirty == {"a", "b", "c"}
        rig.rounds.run([0], "revoke", drain=lambda: None)
        assert sorted(rig.producer.state_keys()) == ["a", "b", "c"]
        (done,) = rig.committer.sync
        assert meta_h(done[0]) == h and not rig.committer.sent

    def test_abandon_before_the_copy_hands_evictions_back(self, rig: Rig) -> None:
        part = Partition(partition=0, consumed=100)
        part.sensors |= {"live-a", "live-b"}
        rig.table.parts[0] = part
        nothing = np.zeros(2, dtype=np.int64)
        snapshot = Checkpoint(0, 100, ["live-a", "live-b"], nothing, nothing, {"evicted-x"})
        rig.rounds.round = Round(0.0, 1, [snapshot], "interval")
        rig.rounds.abandon()
        assert rig.rounds.round is None
        assert part.evicted == {"evicted-x"} and part.dirty == set()

        part.evicted.clear()
        empty = np.zeros(0, dtype=np.int64)
        copied = Round(0.0, 0, [Checkpoint(0, 100, [], empty, empty, set())], "interval")
        copied.commits = {0: (0, '{"v": 1, "h": 100}')}
        copied.unsent.extend(
            [
                ("live-b", 0, 100, None, None, {}),
                ("evicted-y", 0, 100, None, None, {}),
                ("elsewhere", 7, 100, None, None, {}),  # partition no longer owned
            ]
        )
        rig.rounds.round = copied
        rig.rounds.abandon()
        assert part.dirty == {"live-b"} and part.evicted == {"evicted-y"}

    def test_a_round_cannot_start_over_another_or_block_over_one(self, rig: Rig) -> None:
        rig.assign(0)
        rig.consume(0, ["a"], first_offset=0)
        rig.rounds.start([0], "interval", waiting=1)
        with pytest.raises(AssertionError):
            rig.rounds.start([0], "interval", waiting=0)
        with pytest.raises(AssertionError):
            rig.rounds.run([0], "revoke", drain=lambda: None)


class TestCrashBetweenStateAndCommit:
    def test_state_written_but_not_delivered_is_never_committed(self, rig: Rig) -> None:
        rig.assign(0)
        rig.consume(0, ["a"], first_offset=0)
        rig.rounds.start([0], "interval", waiting=0)
        rig.producer.acked = False
        for _ in range(5):
            assert rig.rounds.advance() is None
        assert rig.producer.state_keys() == ["a"] and not rig.committer.sent
        # The process dies here: the group still holds no commit, so the next owner
        # replays from the start and re-writes the same state.
        assert rig.table.parts[0].committed_h == -1

    def test_blocking_round_whose_flush_fails_commits_nothing(self, rig: Rig) -> None:
        rig.assign(0)
        rig.consume(0, ["a", "b"], first_offset=0)
        drained: list[bool] = []
        rig.producer.fail_flush = True
        with pytest.raises(KafkaError, match="not delivered"):
            rig.rounds.run([0], "shutdown", drain=lambda: drained.append(True))
        assert drained == [True]  # the scored batches went out first
        assert not rig.committer.sync and not rig.committer.sent
        assert rig.table.parts[0].committed_h == -1

    def test_state_records_carry_h_and_the_ring_anchor(self, rig: Rig) -> None:
        rig.assign(3)
        rig.consume(3, ["x"], first_offset=7, ts=1.0)
        h = rig.consume(3, ["x"], first_offset=8, ts=2.0)
        rig.score("x")
        rig.rounds.run([3], "shutdown", drain=lambda: None)
        ((topic, value, key, partition),) = rig.producer.records
        assert (topic, key, partition) == (STATE_TOPIC, "x", 3)
        rec = orjson.loads(value or b"")
        # The next window starts at the first sample held: offset 7, the sensor's 1st.
        assert rec["upto"] == h and rec["ring"] == {"anchor_offset": 7, "anchor_count": 1}
        assert rec["threshold"] is not None
        assert rig.committer.sync[0][3][0] == 7  # the commit starts at the anchor
