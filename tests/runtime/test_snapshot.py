"""Local state snapshots: written whole or not at all, read back only for their partition."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.runtime.snapshot import read_snapshot, snapshot_path, write_snapshot

RECORDS = [(f"sensor-{i}".encode(), b'{"version": 2, "n": %d}' % i) for i in range(2000)]


def written(tmp_path: Path, records: list[tuple[bytes, bytes]] = RECORDS) -> Path:
    path = snapshot_path(tmp_path / "snaps", "group/a", "sensor-state", 3)
    n = write_snapshot(
        path,
        group="group/a",
        state_topic="sensor-state",
        partition=3,
        h=41,
        state_end=977,
        records=iter(records),
    )
    assert n == len(records)
    return path


def test_a_snapshot_reads_back_as_written(tmp_path: Path) -> None:
    path = written(tmp_path)
    assert path.name == "group_a.sensor-state.3.snapshot"
    assert not list(path.parent.glob("*.tmp"))
    snap = read_snapshot(path, group="group/a", state_topic="sensor-state", partition=3)
    assert snap is not None and (snap.h, snap.state_end) == (41, 977)
    assert snap.values == dict(RECORDS)


def test_an_empty_partition_has_an_empty_snapshot(tmp_path: Path) -> None:
    snap = read_snapshot(
        written(tmp_path, []), group="group/a", state_topic="sensor-state", partition=3
    )
    assert snap is not None and snap.values == {}


@pytest.mark.parametrize(
    ("who", "why"),
    [
        ({"group": "other"}, "it is for group 'group/a', not 'other'"),
        ({"state_topic": "other"}, "it is for state_topic"),
        ({"partition": 4}, "it is for partition 3, not 4"),
    ],
)
def test_a_snapshot_of_another_partition_is_ignored(
    tmp_path: Path, who: dict[str, object], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = written(tmp_path)
    args: dict[str, object] = {"group": "group/a", "state_topic": "sensor-state", "partition": 3}
    assert read_snapshot(path, **{**args, **who}) is None  # type: ignore[arg-type]
    assert why in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda raw: raw[: len(raw) // 2], "cut short"),
        (lambda raw: raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "checksum"),
        (lambda raw: b"", "cut short"),
    ],
)
def test_a_damaged_snapshot_is_ignored(
    tmp_path: Path, damage: object, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = written(tmp_path)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert read_snapshot(path, group="group/a", state_topic="sensor-state", partition=3) is None
    assert why in capsys.readouterr().out


def test_no_file_is_no_snapshot(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path / "none", group="g", state_topic="s", partition=0) is None
