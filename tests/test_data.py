"""Reading CSV files: field counts, values, and gaps under each csv.missing policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.data import check_increasing, read_csv, read_stretches
from streamer.errors import CsvError

# Line 1 is the header; the blank line 4 counts as a line but not as a data row.
GAPPY = "timestamp,a,b\n1,1.0,\n2,,5\n\n3,3.0,6\n4,NaN,7\n5,5.0,8\n6,6.0,9\n"


@pytest.fixture
def gappy(tmp_path: Path) -> Path:
    path = tmp_path / "gappy.csv"
    path.write_text(GAPPY)
    return path


class TestMissingValues:
    def test_refuse_names_file_line_column_and_the_way_out(self, gappy: Path) -> None:
        with pytest.raises(CsvError) as caught:
            read_csv(gappy, columns=["a", "b"])
        said = str(caught.value)
        assert said.startswith(f"{gappy}: line 2, column 'b': missing value ''")
        assert "3 rows with gaps" in said and "csv.missing: skip" in said

    def test_refuse_is_the_default_and_a_complete_file_passes(self, tmp_path: Path) -> None:
        path = tmp_path / "ok.csv"
        path.write_text("timestamp,a\n1,0.5\n2,0.25\n")
        table = read_csv(path, columns=["a"])
        assert table.values.tolist() == [[0.5], [0.25]]
        assert (table.skipped, table.filled) == (0, 0)
        assert table.lines.tolist() == [2, 3]

    def test_skip_drops_rows_and_cuts_the_stretches_there(self, gappy: Path) -> None:
        table = read_csv(gappy, columns=["a", "b"], missing="skip")
        assert table.values.tolist() == [[3.0, 6.0], [5.0, 8.0], [6.0, 9.0]]
        assert table.rows.tolist() == [2, 4, 5]  # data rows: the blank line is not one
        assert table.lines.tolist() == [5, 7, 8]
        assert table.raw_timestamps == ["3", "5", "6"]
        assert table.skipped == 3
        assert [s.tolist() for s in table.segments()] == [[[3.0, 6.0]], [[5.0, 8.0], [6.0, 9.0]]]

    def test_fill_carries_the_last_value_and_drops_leading_gaps(self, gappy: Path) -> None:
        table = read_csv(gappy, columns=["a", "b"], missing="fill")
        # Row 1 has no b yet (dropped); its a still fills row 2's gap.
        assert table.values.tolist() == [[1.0, 5.0], [3.0, 6.0], [3.0, 7.0], [5.0, 8.0], [6.0, 9.0]]
        assert table.rows.tolist() == [1, 2, 3, 4, 5]
        assert (table.skipped, table.filled) == (1, 2)
        assert len(table.segments()) == 1

    @pytest.mark.parametrize("token", ["", " ", "nan", "NaN", "NA", "n/a", "null", "None"])
    def test_every_spelling_of_a_gap(self, tmp_path: Path, token: str) -> None:
        path = tmp_path / "t.csv"
        path.write_text(f"timestamp,a\n1,1\n2,{token}\n3,3\n")
        assert read_csv(path, columns=["a"], missing="skip").values.tolist() == [[1.0], [3.0]]

    @pytest.mark.parametrize(("token", "said"), [("oops", "not a number"), ("inf", "non-finite")])
    @pytest.mark.parametrize("missing", ["refuse", "skip", "fill"])
    def test_junk_is_refused_whatever_the_policy(
        self, tmp_path: Path, token: str, said: str, missing: str
    ) -> None:
        path = tmp_path / "t.csv"
        path.write_text(f"timestamp,a\n1,1\n2,{token}\n")
        with pytest.raises(CsvError, match=f"line 3, column 'a': {said}"):
            read_csv(path, columns=["a"], missing=missing)  # type: ignore[arg-type]

    def test_a_missing_timestamp_is_never_skipped(self, tmp_path: Path) -> None:
        path = tmp_path / "t.csv"
        path.write_text("timestamp,a\n1,1\n,2\n")
        with pytest.raises(CsvError, match="line 3: bad timestamp ''"):
            read_csv(path, columns=["a"], missing="skip")

    def test_without_a_time_column_a_row_keeps_its_index(self, gappy: Path) -> None:
        table = read_csv(gappy, ",", None, ["a", "b"], missing="skip")
        assert table.timestamps.tolist() == [2.0, 4.0, 5.0]


class TestStretches:
    def test_short_stretches_are_left_out_and_said(self, gappy: Path) -> None:
        got = read_stretches(gappy, ",", "timestamp", ["a", "b"], "skip", min_rows=2)
        assert [s.tolist() for s in got.segments] == [[[5.0, 8.0], [6.0, 9.0]]]
        assert (got.skipped, got.filled, got.short) == (3, 0, 1)
        assert got.note() == (
            f"{gappy}: skipped 3 rows with gaps; left out 1 rows in stretches shorter than a window"
        )

    def test_first_rows_reads_no_further(self, gappy: Path) -> None:
        got = read_stretches(gappy, ",", "timestamp", ["a", "b"], "skip", 1, first_rows=3)
        assert [s.tolist() for s in got.segments] == [[[3.0, 6.0]]]
        assert got.skipped == 2

    def test_a_complete_file_is_one_stretch_with_nothing_to_say(self, tmp_path: Path) -> None:
        path = tmp_path / "ok.csv"
        path.write_text("timestamp,a\n1,1\n2,2\n3,3\n")
        got = read_stretches(path, ",", "timestamp", ["a"], "refuse", min_rows=3)
        assert [s.ravel().tolist() for s in got.segments] == [[1.0, 2.0, 3.0]]
        assert got.note() is None


class TestRows:
    @pytest.mark.parametrize(
        ("body", "said"),
        [
            ("1,0.5,0.6,0.7\n", "line 2: 4 fields, the header has 3"),
            ('1,"0.5\n0.6"\n', "line 3: 2 fields, the header has 3"),  # a field spans lines
        ],
    )
    def test_field_count_names_the_line(self, tmp_path: Path, body: str, said: str) -> None:
        path = tmp_path / "t.csv"
        path.write_text("timestamp,a,b\n" + body)
        with pytest.raises(CsvError, match=said):
            read_csv(path, columns=["a", "b"])

    def test_order_check_names_the_first_row_not_after_the_others(self, tmp_path: Path) -> None:
        path = tmp_path / "t.csv"
        path.write_text("timestamp,a\n1,1\n3,1\n\n2,1\n4,1\n4,1\n")
        table = read_csv(path, columns=["a"])
        with pytest.raises(CsvError, match=r"line 5: timestamp '2' is not after .*\(2 such rows\)"):
            check_increasing(table)

    def test_increasing_timestamps_pass(self, tmp_path: Path) -> None:
        path = tmp_path / "t.csv"
        path.write_text("timestamp,a\n2024-01-01 00:00:00,1\n2024-01-01 00:00:01.5,2\n")
        table = read_csv(path, columns=["a"])
        check_increasing(table)
        assert np.diff(table.timestamps).tolist() == [1.5]
