"""What a production install needs: the daemon's imports stay clear of the demo extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamer.protocols import print_table


def test_the_product_runs_without_the_demo_extras_and_the_dev_tools() -> None:
    # As in an install without streamer[demo]: importing rich or matplotlib fails.
    probe = (
        "import sys\n"
        "for name in ('rich', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "import streamer.daemon, streamer.cli, streamer.offline, streamer.protocols\n"
        "import streamer.model.train\n"
        ""
        "bad = sorted(m for m in sys.modules if m.startswith('streamer.dev'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"loaded with the daemon: {out.stdout.strip()}"


def test_results_print_as_plain_columns_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # as in an install without the extra
    monkeypatch.setitem(sys.modules, "rich.console", None)
    print_table("SKAB", ["file", "F1"], [["valve1/0", "0.875"], ["all", "0.8"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["SKAB", "file         F1", "valve1/0  0.875", "all         0.8"]
