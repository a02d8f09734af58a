"""scripts/torch-build: which torch build scripts/setup installs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def choice(tmp_path: Path, gpu_listing: str | None, setting: str | None) -> tuple[int, str]:
    """Run the script with a fake nvidia-smi (None: none on PATH) and STREAMER_TORCH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu_listing is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nprintf '%s' '{gpu_listing}'\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    if setting is not None:
        env["STREAMER_TORCH"] = setting
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "torch-build")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return run.returncode, run.stdout.strip() or run.stderr.strip()


@pytest.mark.parametrize(
    ("gpu_listing", "setting", "expected"),
    [
        (None, None, "cpu"),
        ("GPU 0: NVIDIA H100 (UUID: GPU-1)\n", None, "cuda"),
        ("", None, "cpu"),  # nvidia-smi present, no GPU listed (driver without a card)
        ("GPU 0: NVIDIA H100 (UUID: GPU-1)\n", "cpu", "cpu"),
        (None, "cuda", "cuda"),
        (None, "auto", "cpu"),
    ],
)
def test_the_build_follows_the_gpu_and_the_override(
    tmp_path: Path, gpu_listing: str | None, setting: str | None, expected: str
) -> None:
    assert choice(tmp_path, gpu_listing, setting) == (0, expected)


def test_another_setting_is_refused_naming_it(tmp_path: Path) -> None:
    code, said = choice(tmp_path, None, "rocm")
    assert code == 2 and "got 'rocm'" in said
