"""Takeover with the shipped group settings: a crash-restart and a clean stop.

The session timeout is set to 45 s here (librdkafka's default), so that a takeover
within the bound below can only come from the mechanism under test (a release of the
dead member, a restarted static member taking its place, a stopping static member
leaving), never from the session ending. The bounds are generous: they tell those mechanisms
from the 45 s session, not how fast they are (``benchmarks/takeover.py`` measures that).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import NewTopicFactory
from tests.faults.test_faults import (
    DSPOT,
    S,
    W,
    assert_complete,
    logs,
    owned,
    wait_balanced,
    wait_scores,
)
from tests.helpers import Timeout
from tests.integration.helpers import (
    REPO,
    DaemonProcess,
    Sample,
    Topics,
    expected_windows,
    make_topics,
    plant_samples,
    produce,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LONG_SESSION = {"session.timeout.ms": 45000}
# Far below the 45 s session, far above what the mechanisms take on a loaded machine.
BOUND_S = 25.0


def config(tmp: Path, name: str, bootstrap: str, topics: Topics, group: str, model: Path) -> Path:
    """The shipped group settings (instance_id auto), but a 45 s session."""
    return write_config(
        tmp / f"{name}.yaml",
        bootstrap,
        topics,
        group,
        model,
        kafka={"client": dict(LONG_SESSION)},
        threshold=DSPOT,
    )


def wait_owned(daemon: DaemonProcess, partitions: set[int], timeout: Timeout) -> float:
    """Seconds until ``daemon`` owns every one of ``partitions`` (fails after ``timeout``)."""
    started = time.monotonic()
    while not timeout.expired and not partitions <= owned(daemon):
        time.sleep(0.05)
    assert partitions <= owned(daemon), f"{partitions} never taken\n{logs([daemon])}"
    return time.monotonic() - started


@dataclass
class Killed:
    """Two daemons sharing 4 partitions, half the samples produced; one to be killed."""

    bootstrap: str
    topics: Topics
    samples: list[Sample]
    configs: list[Path]
    daemons: list[DaemonProcess]
    lost: set[int] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        bootstrap: str,
        new_topic: NewTopicFactory,
        group: str,
        model: Path,
        tmp: Path,
        seed: int,
    ) -> Killed:
        topics = make_topics(new_topic, 4)
        cfgs = [config(tmp, f"m{i}", bootstrap, topics, group, model) for i in range(2)]
        return cls(
            bootstrap,
            topics,
            plant_samples(12, 300, seed=seed),
            cfgs,
            [DaemonProcess(c).start() for c in cfgs],
        )

    @property
    def victim(self) -> DaemonProcess:
        return self.daemons[0]

    @property
    def other(self) -> DaemonProcess:
        return self.daemons[1]

    def kill(self, timeout: Timeout) -> None:
        """Once balanced and fed the first half: SIGKILL the victim, noting what it owned."""
        wait_balanced(self.daemons, 4, timeout)
        produce(self.bootstrap, self.topics.input, self.samples[: len(self.samples) // 2])
        self.lost = owned(self.victim)
        self.victim.proc.send_signal(signal.SIGKILL)
        self.victim.proc.wait(10)

    def finish(
        self, survivors: list[DaemonProcess], every: list[DaemonProcess], timeout: Timeout
    ) -> None:
        """The second half produced: every window scored, repeats byte-identical."""
        produce(self.bootstrap, self.topics.input, self.samples[len(self.samples) // 2 :])
        expected = set(expected_windows(self.topics.input, self.samples, W, S))
        by_id = wait_scores(self.bootstrap, self.topics.scores, expected, timeout, survivors)
        for d in survivors:
            assert d.stop() == 0, d.tail()
        assert_complete(by_id, expected, every)


class TestTakeover:
    def test_a_killed_daemon_is_released_at_once_as_the_unit_does(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """SIGKILL, then ``streamer release`` (the unit's ExecStopPost) and a restart: the
        other member serves the dead one's partitions long before the session would end,
        the restarted daemon joins under the same id without fencing anyone, and every
        window is scored."""
        timeout = Timeout(240)
        run = Killed.start(kafka_bootstrap, new_topic, group_id, model_dir, tmp_path, 11)
        daemons += run.daemons
        run.kill(timeout)
        cfgs, other, lost = run.configs, run.other, run.lost
        (membership,) = run.victim.seen("group_membership")
        release = subprocess.run(
            [sys.executable, "-m", "streamer", "release", "--config", str(cfgs[0])],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert release.returncode == 0, release.stdout + release.stderr
        released = [
            json.loads(line)
            for line in release.stdout.splitlines()
            if '"predecessor_released"' in line
        ]
        assert len(released) == 1, release.stdout
        assert released[0]["instance_id"] == membership["instance_id"]
        assert set(released[0]["partitions"]) == lost
        took_s = wait_owned(other, lost, timeout)
        assert took_s < BOUND_S, f"took {took_s:.1f} s\n{logs(daemons)}"
        restarted = DaemonProcess(cfgs[0]).start()
        daemons.append(restarted)
        wait_balanced([other, restarted], 4, timeout)
        run.finish([other, restarted], daemons, timeout)

    def test_a_killed_daemon_restarted_takes_its_own_place_back(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """SIGKILL and a restart with no release: the new process joins under the dead
        one's static id and gets its partitions back without waiting for the session."""
        timeout = Timeout(240)
        run = Killed.start(kafka_bootstrap, new_topic, group_id, model_dir, tmp_path, 13)
        daemons += run.daemons
        run.kill(timeout)
        other, lost = run.other, run.lost
        killed_at = time.monotonic()
        restarted = DaemonProcess(run.configs[0]).start()
        daemons.append(restarted)
        while not timeout.expired and not lost <= owned(restarted) | owned(other):
            time.sleep(0.05)
        took_s = time.monotonic() - killed_at
        assert lost <= owned(restarted) | owned(other), logs(daemons)
        assert took_s < BOUND_S, f"took {took_s:.1f} s\n{logs(daemons)}"
        assert not restarted.seen("predecessor_released")
        run.finish([other, restarted], daemons, timeout)

    def test_a_stopped_daemon_leaves_the_group_at_once(
        self,
        kafka_bootstrap: str,
        new_topic: NewTopicFactory,
        group_id: str,
        model_dir: Path,
        tmp_path: Path,
        daemons: list[DaemonProcess],
    ) -> None:
        """SIGTERM of a static member: the other member gets its partitions without waiting
        for the session, and every window is scored exactly once."""
        timeout = Timeout(240)
        topics = make_topics(new_topic, 4)
        samples = plant_samples(12, 300, seed=12)
        daemons += [
            DaemonProcess(
                config(tmp_path, f"m{i}", kafka_bootstrap, topics, group_id, model_dir)
            ).start()
            for i in range(2)
        ]
        wait_balanced(daemons, 4, timeout)
        stopping, other = daemons
        assert stopping.seen("group_membership")[0]["instance_id"] is not None
        half = len(samples) // 2
        produce(kafka_bootstrap, topics.input, samples[:half])
        lost = owned(stopping)
        stopping.proc.send_signal(signal.SIGTERM)
        took_s = wait_owned(other, lost, timeout)
        assert stopping.stop() == 0, stopping.tail()
        assert took_s < BOUND_S, f"took {took_s:.1f} s\n{logs(daemons)}"
        produce(kafka_bootstrap, topics.input, samples[half:])
        expected = set(expected_windows(topics.input, samples, W, S))
        by_id = wait_scores(kafka_bootstrap, topics.scores, expected, timeout, [other])
        assert other.stop() == 0, other.tail()
        assert_complete(by_id, expected, daemons)
        dupes = [k for k, v in by_id.items() if len(v) > 1]
        assert not dupes, f"{len(dupes)} windows published twice\n{logs(daemons)}"
