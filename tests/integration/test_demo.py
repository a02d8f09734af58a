"""`streamer demo` end to end: its own broker, the real daemon, a report and a plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.kafka
@pytest.mark.slow
class TestDemo:
    """The demo runs on a machine with nothing configured."""

    def test_demo_reports_and_plots(self, tmp_path: Path) -> None:
        """A small demo exits 0, finds most injected faults and writes the PNG plot.

        Run as the README runs it: ``--out`` relative to the working directory.
        """
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "streamer",
                "demo",
                "--out",
                "demo-out",
                "--sensors",
                "3",
                "--rows",
                "500",
                "--rate",
                "500",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        found = re.search(r"precision\s+([0-9.]+),\s+recall\s+([0-9.]+)", proc.stdout)
        # The result is a line of its own, not glued to the live table.
        assert re.search(r"^result: \d+ windows scored", proc.stdout, re.M), proc.stdout[-2000:]
        assert found, proc.stdout[-2000:]
        precision, recall = float(found.group(1)), float(found.group(2))
        assert recall >= 0.5
        assert precision >= 0.5
        png = tmp_path / "demo-out" / "demo.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
