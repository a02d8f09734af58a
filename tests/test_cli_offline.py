"""`streamer train`, `score` and `eval` end to end on files the test writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.data import data_hash
from streamer.dev.simulate import CHANNELS, simulate
from streamer.protocols import SKAB_COLUMNS


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def train_cli(cfg: Path, data: Path, out: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    """``streamer train`` on one file, without a progress bar; ``sets``: ``--set`` overrides."""
    flags = [x for item in sets for x in ("--set", item)]
    return run_cli(
        "train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress",
        *flags,
    )  # fmt: skip


def write_csv(
    path: Path,
    values: np.ndarray,
    sep: str = ",",
    extra: dict[str, np.ndarray] | None = None,
    ts_name: str = "timestamp",
) -> None:
    extra = extra or {}
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow([ts_name, *CHANNELS, *extra])
        for i, row in enumerate(values):
            stamp = np.datetime64("2024-01-01T00:00:00") + np.timedelta64(i, "s")
            w.writerow(
                [
                    str(stamp).replace("T", " "),
                    *(f"{v:.6f}" for v in row),
                    *(f"{extra[k][i]:g}" for k in extra),
                ]
            )


class TestTrainAndScore:
    """Training writes a checkpoint that `score` uses on another file."""

    def test_train_then_score(self, tmp_path: Path) -> None:
        """train writes a checkpoint; score writes one row per window with every column."""
        normal = simulate(1, 1200, seed=3).values[0]
        faulty = simulate(1, 600, seed=4, anomalies_per_sensor=2, clean_prefix=100)
        write_csv(tmp_path / "normal.csv", normal, sep=";")
        write_csv(tmp_path / "live.csv", faulty.values[0], sep=";")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            "stream: {window: 16, stride: 4}\n"
            "train: {preset: dense, epochs: 5, hidden: 8, latent: 4}\n"
            "csv: {separator: ';'}\n"
        )
        proc = train_cli(cfg, tmp_path / "normal.csv", tmp_path / "model")
        assert proc.returncode == 0, proc.stderr
        sidecar = json.loads((tmp_path / "model" / "model.json").read_text())
        assert sidecar["channels"] == list(CHANNELS)
        assert len(sidecar["training"]["data_sha256"]) == 64

        proc = run_cli(
            "score",
            "--config",
            str(cfg),
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path / "live.csv"),
            "--out",
            str(tmp_path / "scores.csv"),
        )
        assert proc.returncode == 0, proc.stderr
        with (tmp_path / "scores.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == (600 - 16) // 4 + 1
        assert {f"error_{c}" for c in CHANNELS} <= set(rows[0])
        assert [int(r["position"]) for r in rows] == list(range(15, 600, 4))
        assert all(float(r["threshold"]) > 0 for r in rows)
        # stdout is the result alone; logs (warnings only by default) go to stderr.
        assert proc.stdout == f"wrote {len(rows)} windows to {tmp_path / 'scores.csv'}\n"
        assert "model_traced" not in proc.stderr

    def test_offline_logs_go_to_stderr_at_the_level_asked(self, tmp_path: Path) -> None:
        """--log-level info shows the engine's log lines, on stderr, not in the result."""
        write_csv(tmp_path / "normal.csv", simulate(1, 300, seed=3).values[0])
        cfg = tmp_path / "c.yaml"
        cfg.write_text("stream: {window: 16, stride: 4}\ntrain: {preset: dense, epochs: 2}\n")
        model = tmp_path / "model"
        proc = train_cli(cfg, tmp_path / "normal.csv", model)
        assert proc.returncode == 0, proc.stderr
        proc = run_cli(
            "score",
            "--config",
            str(cfg),
            "--log-level",
            "info",
            "--model",
            str(model),
            "--data",
            str(tmp_path / "normal.csv"),
            "--out",
            str(tmp_path / "s.csv"),
        )
        assert proc.returncode == 0, proc.stderr
        assert '"event": "model_traced"' in proc.stderr
        assert proc.stdout.startswith("wrote ") and proc.stdout.count("\n") == 1, proc.stdout

    def test_bad_data_is_a_runtime_error_naming_the_value(self, tmp_path: Path) -> None:
        """A non-numeric cell stops training with exit 2 and names line, column and value."""
        bad = tmp_path / "bad.csv"
        bad.write_text("timestamp,a\n1,0.5\n2,oops\n")
        cfg = tmp_path / "c.yaml"
        cfg.write_text("stream: {channels: [a], window: 2, stride: 1}\n")
        proc = run_cli(
            "train", "--config", str(cfg), "--data", str(bad), "--out", str(tmp_path / "m")
        )
        assert proc.returncode == 2, proc.stderr
        assert "line 3" in proc.stderr and "'oops'" in proc.stderr


def write_exact_csv(path: Path, values: np.ndarray, gaps: Sequence[tuple[int, int]] = ()) -> None:
    """A CSV whose numbers read back bit for bit (repr), with empty cells at ``gaps`` (row, col)."""
    holes = set(gaps)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", *CHANNELS])
        for i, row in enumerate(values.tolist()):
            cells = ["" if (i, j) in holes else repr(v) for j, v in enumerate(row)]
            w.writerow([1_764_201_600 + i, *cells])


class TestGapsInTraining:
    """csv.missing: refuse names the gap; skip trains on the stretches between; fill carries."""

    @pytest.fixture
    def cfg(self, tmp_path: Path) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(
            "stream: {window: 16, stride: 4}\n"
            "train: {preset: dense, epochs: 2, hidden: 8, latent: 4}\n"
        )
        return path

    def test_refused_by_default_naming_line_and_column(self, tmp_path: Path, cfg: Path) -> None:
        data = tmp_path / "d.csv"
        write_exact_csv(data, simulate(1, 200, seed=3).values[0], gaps=[(40, 2)])
        proc = train_cli(cfg, data, tmp_path / "model")
        assert proc.returncode == 2, proc.stderr
        assert f"{data}: line 42, column 'vibration': missing value ''" in proc.stderr
        assert "csv.missing: skip" in proc.stderr

    def trained(
        self, tmp_path: Path, cfg: Path, gaps: list[tuple[int, int]], missing: str
    ) -> tuple[np.ndarray, subprocess.CompletedProcess[str], dict[str, Any]]:
        """Train on 300 simulated rows with ``gaps``: the values, the run, model.json's training."""
        values = simulate(1, 300, seed=3).values[0]
        data = tmp_path / "d.csv"
        write_exact_csv(data, values, gaps)
        proc = train_cli(cfg, data, tmp_path / "model", f"csv.missing={missing}")
        assert proc.returncode == 0, proc.stderr
        sidecar = json.loads((tmp_path / "model" / "model.json").read_text())
        return values, proc, sidecar["training"]

    def test_skip_trains_on_the_stretches_between_gaps(self, tmp_path: Path, cfg: Path) -> None:
        # Rows 100 and 106 have gaps: 5 rows between them, too few for a window of 16.
        values, proc, training = self.trained(tmp_path, cfg, [(100, 0), (106, 4), (106, 1)], "skip")
        assert (
            f"streamer: {tmp_path / 'd.csv'}: skipped 2 rows with gaps; left out 5 rows in "
            "stretches shorter than a window\n"
        ) in proc.stderr
        assert proc.stdout.endswith("; 2 rows with gaps skipped)\n"), proc.stdout
        assert (training["rows_skipped"], training["values_filled"]) == (2, 0)
        # Trained on exactly the two long stretches: no window spans a skipped row.
        assert training["data_sha256"] == data_hash([values[:100], values[107:]], CHANNELS)

    def test_fill_carries_the_last_value_forward(self, tmp_path: Path, cfg: Path) -> None:
        values, _, training = self.trained(tmp_path, cfg, [(0, 1), (50, 3), (51, 3)], "fill")
        filled = values[1:].copy()
        filled[49:51, 3] = values[49, 3]
        assert (training["rows_skipped"], training["values_filled"]) == (1, 2)
        assert training["data_sha256"] == data_hash([filled], CHANNELS)

    def test_no_stretch_long_enough_is_refused(self, tmp_path: Path, cfg: Path) -> None:
        data = tmp_path / "d.csv"
        values = simulate(1, 30, seed=3).values[0]
        write_exact_csv(data, values, gaps=[(10, 0), (20, 0)])
        proc = train_cli(cfg, data, tmp_path / "model", "csv.missing=skip")
        assert proc.returncode == 2, proc.stderr
        assert "no stretch of 16 consecutive rows (stream.window)" in proc.stderr
        assert "(csv.missing skip dropped 2 rows)" in proc.stderr

    def test_out_defaults_to_the_configs_model_path(self, tmp_path: Path) -> None:
        data = tmp_path / "d.csv"
        write_exact_csv(data, simulate(1, 200, seed=3).values[0])
        cfg = tmp_path / "sub" / "c.yaml"
        cfg.parent.mkdir()
        cfg.write_text(
            "stream: {window: 16, stride: 4}\ntrain: {preset: dense, epochs: 1}\nmodel: {path: m}\n"
        )
        proc = run_cli("train", "--config", str(cfg), "--data", str(data), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        # Relative to the config file, where `streamer run --config` looks.
        assert (tmp_path / "sub" / "m" / "model.json").is_file()
        assert proc.stdout.startswith(f"wrote {tmp_path / 'sub' / 'm'} ")


class TestScoreFitsTheModel:
    """score refuses a window the config names that differs from the model's, as run does;
    a stride it names is used and warned about; what it does not name follows the model."""

    @pytest.fixture
    def live(self, tmp_path: Path) -> Path:
        path = tmp_path / "live.csv"
        write_exact_csv(path, simulate(1, 120, seed=4).values[0], gaps=[(60, 2)])
        return path

    def score(
        self,
        model_dir: Path,
        live: Path,
        *extra: str,
        config: str | None = None,
        cwd: Path | None = None,
    ) -> tuple[subprocess.CompletedProcess[str], list[int]]:
        """``streamer score`` of ``live`` (with ``config``'s text as --config): run, positions."""
        out = live.parent / "scores.csv"
        out.unlink(missing_ok=True)
        if config is not None:
            (live.parent / "c.yaml").write_text(config)
            extra = ("--config", str(live.parent / "c.yaml"), *extra)
        proc = run_cli(
            "score", "--model", str(model_dir), "--data", str(live), "--out", str(out), *extra,
            cwd=cwd,
        )  # fmt: skip
        if not out.exists():
            return proc, []
        with out.open() as fh:
            return proc, [int(r["position"]) for r in csv.DictReader(fh)]

    @pytest.mark.parametrize(
        ("stream", "code", "said", "first"),
        [
            # Another window: refused, as run refuses it.
            ("{window: 32, stride: 4}", 2, ["model window 16, stream.window 32"], []),
            # Another stride: used, and the warning says what it changes.
            ("{window: 16, stride: 2}", 0, ["stride_differs_from_model", "alerts.open_after"],
             [15, 17, 19]),
        ],
    )  # fmt: skip
    def test_what_the_config_names_is_checked_against_the_model(
        self, model_dir: Path, live: Path, stream: str, code: int, said: list[str], first: list[int]
    ) -> None:
        config = f"stream: {stream}\ncsv: {{missing: skip}}\n"
        proc, positions = self.score(model_dir, live, config=config)
        assert proc.returncode == code, proc.stderr
        assert all(s in proc.stderr for s in said), proc.stderr
        assert positions[:3] == first

    def test_a_window_set_on_the_command_line_counts_as_named(
        self, tmp_path: Path, model_dir: Path, live: Path
    ) -> None:
        proc, _ = self.score(model_dir, live, "--set", "stream.window=8", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "model window 16, stream.window 8" in proc.stderr

    def test_without_a_config_the_models_window_and_stride_are_used_silently(
        self, tmp_path: Path, model_dir: Path, live: Path
    ) -> None:
        # No ./config.yaml in the working directory: the built-in defaults (window 64).
        proc, positions = self.score(model_dir, live, "--set", "csv.missing=skip", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        # Row 60 is skipped: the first window after it ends 16 rows later, at row 76.
        assert positions == [*range(15, 60, 4), *range(76, 120, 4)]

    def test_a_config_that_does_not_name_the_window_follows_the_model(
        self, tmp_path: Path, model_dir: Path, live: Path
    ) -> None:
        proc, positions = self.score(model_dir, live, config="csv: {missing: fill}\n")
        assert proc.returncode == 0, proc.stderr
        assert positions == list(range(15, 120, 4))

    def test_rows_out_of_time_order_are_refused_naming_the_line(
        self, tmp_path: Path, model_dir: Path
    ) -> None:
        data = tmp_path / "d.csv"
        write_exact_csv(data, simulate(1, 40, seed=4).values[0])
        lines = data.read_text().splitlines()
        lines[10], lines[11] = lines[11], lines[10]
        data.write_text("\n".join(lines) + "\n")
        proc, _ = self.score(model_dir, data, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"{data}: line 12: timestamp" in proc.stderr and "is not after" in proc.stderr


class TestWhatTheUserNamed:
    """Anything named on the command line that is missing or malformed: exit 2, one line."""

    @pytest.fixture
    def cfg(self, tmp_path: Path) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text("stream: {channels: [a, b], window: 2, stride: 1}\n")
        return path

    def test_a_missing_data_file(self, tmp_path: Path, cfg: Path) -> None:
        gone = tmp_path / "gone.csv"
        proc = run_cli(
            "train", "--config", str(cfg), "--data", str(gone), "--out", str(tmp_path / "m")
        )
        assert proc.returncode == 2, proc.stderr
        assert f"{gone}: cannot read" in proc.stderr and "Traceback" not in proc.stderr

    @pytest.mark.parametrize(
        ("row", "said"),
        [("3,0.5,0.6,0.7", "line 3: 4 fields, the header has 3"), ("3,0.5", "2 fields")],
    )
    def test_a_row_with_another_field_count(
        self, tmp_path: Path, cfg: Path, row: str, said: str
    ) -> None:
        data = tmp_path / "d.csv"
        data.write_text(f"timestamp,a,b\n1,0.1,0.2\n{row}\n4,0.3,0.4\n")
        proc = run_cli(
            "train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "m")
        )
        assert proc.returncode == 2, proc.stderr
        assert said in proc.stderr

    def test_a_missing_model_directory(self, tmp_path: Path, cfg: Path) -> None:
        data = tmp_path / "d.csv"
        data.write_text("timestamp,a,b\n1,0.1,0.2\n")
        gone = tmp_path / "no-model"
        proc = run_cli(
            "score", "--config", str(cfg), "--model", str(gone), "--data", str(data),
            "--out", str(tmp_path / "s.csv"),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert f"{gone}: no such directory" in proc.stderr

    def test_training_without_a_terminal_says_each_epoch(self, tmp_path: Path) -> None:
        data = tmp_path / "d.csv"
        write_csv(data, simulate(1, 400, seed=5).values[0])
        cfg = tmp_path / "t.yaml"
        cfg.write_text(
            "stream: {window: 16, stride: 4}\n"
            "train: {preset: dense, epochs: 3, patience: 5, hidden: 8, latent: 4}\n"
        )
        proc = run_cli(
            "train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "m")
        )
        assert proc.returncode == 0, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("training dense: epoch")]
        assert [ln.split()[3] for ln in lines] == ["1/3", "2/3", "3/3"], proc.stderr
        assert all(" left" in ln and " val " in ln for ln in lines)

    @pytest.mark.parametrize(
        "args", [["--sensors", "0"], ["--rate", "-1"], ["--rate", "nan"], ["--rows", "10"]]
    )
    def test_demo_arguments_are_checked_before_anything_starts(self, args: list[str]) -> None:
        proc = run_cli("demo", *args)
        assert proc.returncode == 2, proc.stderr
        assert "error: argument" in proc.stderr and "broker" not in proc.stdout

    def test_a_reader_that_closes_early_gets_no_traceback(self, cfg: Path) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "check-config", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        # Gone before the command writes a byte (it is still importing): `| head -c 0`.
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 141, err
        assert "Traceback" not in err and "BrokenPipeError" not in err


class TestHelp:
    """--help says what a command does, its exit codes and the environment it reads."""

    def test_top_level_help_names_exit_codes_and_environment(self) -> None:
        proc = run_cli("--help")
        assert proc.returncode == 0
        assert "Exit codes: 0 success; 2" in proc.stdout and "STREAMER_LOG_LEVEL" in proc.stdout

    @pytest.mark.parametrize(
        "command",
        [
            "check-config",
            "check-access",
            "run",
            "train",
            "score",
            "produce",
            "eval",
            "demo",
            "broker",
        ],
    )
    def test_every_command_has_a_description(self, command: str) -> None:
        """A description paragraph, then (after the options) an example and the exit codes."""
        proc = run_cli(command, "--help")
        assert proc.returncode == 0
        # usage, a blank line, then the description paragraph
        paragraphs = proc.stdout.split("\n\n")
        assert len(paragraphs) > 2 and paragraphs[1].strip().endswith("."), proc.stdout
        epilog = " ".join(paragraphs[-1].split())
        assert epilog.startswith(f"Example: streamer {command} "), proc.stdout
        assert "Exit codes: 0 " in epilog and " 2 " in epilog and " 1 " in epilog, epilog


def make_skab(root: Path, files: int = 2) -> None:
    folder = root / "valve9"
    folder.mkdir(parents=True)
    names = list(SKAB_COLUMNS)
    rng = np.random.default_rng(0)
    for i in range(files):
        n = 900
        t = np.arange(n)
        base = np.stack([np.sin(t / (5 + k)) + rng.normal(0, 0.05, n) for k in range(8)], axis=1)
        label = np.zeros(n)
        label[600:750] = 1
        base[600:750, 2] += 3.0  # a level shift on Current during the "anomaly"
        with (folder / f"{i}.csv").open("w", newline="") as fh:
            w = csv.writer(fh, delimiter=";")
            w.writerow(["datetime", *names, "anomaly", "changepoint"])
            for r in range(n):
                stamp = str(np.datetime64("2020-03-09T10:00:00") + np.timedelta64(r, "s")).replace(
                    "T", " "
                )
                w.writerow([stamp, *(f"{v:.5f}" for v in base[r]), f"{label[r]:.1f}", "0.0"])


def make_nab(root: Path) -> None:
    (root / "data" / "synthetic").mkdir(parents=True)
    (root / "labels").mkdir()
    windows = {}
    rng = np.random.default_rng(1)
    for i in range(2):
        n = 1200
        stamps = np.datetime64("2015-01-01T00:00:00") + np.arange(n) * np.timedelta64(300, "s")
        values = np.sin(np.arange(n) / 20) + rng.normal(0, 0.05, n)
        values[900:920] += 4
        name = f"synthetic/s{i}.csv"
        with (root / "data" / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value"])
            for s, v in zip(stamps, values, strict=True):
                w.writerow([str(s).replace("T", " "), f"{v:.5f}"])
        start, end = (str(stamps[k]).replace("T", " ") + ".000000" for k in (880, 940))
        windows[name] = [[start, end]]
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


class TestEvalCommands:
    """Benchmark protocols run on any folder with the benchmark's layout."""

    @pytest.mark.slow
    def test_eval_skab_layout(self, tmp_path: Path) -> None:
        """eval skab writes f1/far/mar fractions and one result file per input file."""
        make_skab(tmp_path / "skab")
        proc = run_cli(
            "eval",
            "skab",
            "--data",
            str(tmp_path / "skab"),
            "--json",
            str(tmp_path / "r.json"),
            "--scores-out",
            str(tmp_path / "out"),
        )
        assert proc.returncode == 0, proc.stderr
        # Progress on stderr: the last file always has its line.
        assert "eval skab: 2/2 files" in proc.stderr
        figures = json.loads((tmp_path / "r.json").read_text())
        assert set(figures) == {"f1", "far", "mar", "seconds"}
        assert all(0.0 <= figures[k] <= 1.0 for k in ("f1", "far", "mar"))
        # The injected level shift is large: the detector must find most of it.
        assert figures["mar"] < 0.5
        with (tmp_path / "out" / "valve9" / "0.csv").open() as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["datetime", "anomaly_score", "anomaly"]
        assert len(rows) == 1 + 900 - 400
        assert {r[2] for r in rows[1:]} <= {"0", "1"}

    @pytest.mark.slow
    def test_eval_nab_layout(self, tmp_path: Path) -> None:
        """eval nab reports the three profiles and writes NAB's results layout."""
        make_nab(tmp_path / "nab")
        proc = run_cli(
            "eval",
            "nab",
            "--data",
            str(tmp_path / "nab"),
            "--json",
            str(tmp_path / "r.json"),
            "--scores-out",
            str(tmp_path / "out"),
        )
        assert proc.returncode == 0, proc.stderr
        figures = json.loads((tmp_path / "r.json").read_text())
        assert set(figures) == {"standard", "reward_low_FP", "reward_low_FN", "seconds"}
        assert figures["standard"] > 50  # an obvious spike inside each window
        out = tmp_path / "out" / "synthetic" / "streamer_s0.csv"
        header = out.read_text().splitlines()[0]
        assert header == "timestamp,anomaly_score"
