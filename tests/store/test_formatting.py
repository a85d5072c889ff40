"""format_frame: aligned text for people; CSV, JSON and Parquet that parse back."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest

from arrakis_ray.errors import ConfigError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.formatting import format_frame

from .storedata import RunData

FRAME = pl.DataFrame(
    {
        "run_id": ["a", "b", None],
        "layer": [0, 11, -1],
        "value": [1.5, -0.000123456789, None],
        "token_text": [" the", 'say "hi", then\nleave', "é"],
        "hooks": [["x", "y"], [], None],
    }
)


def test_csv_parses_back() -> None:
    text = format_frame(FRAME, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run_id"] for r in rows] == ["a", "b", ""]
    assert [int(r["layer"]) for r in rows] == [0, 11, -1]
    assert float(rows[1]["value"]) == pytest.approx(-0.000123456789, rel=1e-12)
    assert [r["token_text"] for r in rows] == FRAME["token_text"].to_list()
    assert [json.loads(r["hooks"]) if r["hooks"] else None for r in rows] == [["x", "y"], [], None]


def test_json_records_parse_back() -> None:
    assert json.loads(format_frame(FRAME, "json")) == FRAME.to_dicts()


def test_parquet_bytes_read_back() -> None:
    data = format_frame(FRAME, "parquet")
    assert isinstance(data, bytes)
    assert pl.read_parquet(io.BytesIO(data)).equals(FRAME)


def test_table_is_aligned_and_truncated() -> None:
    text = format_frame(FRAME, "table")
    lines = text.splitlines()
    assert lines[0].split() == ["run_id", "layer", "value", "token_text", "hooks"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + 3  # header, rule, one line per row (the newline is escaped)
    assert 'say "hi", then\\nleave' in lines[3]
    layer_end = lines[1].index("-----", len("------  ")) + len("-----")
    assert [ln[:layer_end].split()[-1] for ln in lines[2:]] == ["0", "11", "-1"]  # right-aligned
    assert "-0.000123457" in lines[3] and "null" in lines[4] and "[x, y]" in lines[2]

    big = pl.DataFrame({"i": list(range(250))})
    lines = format_frame(big, "table", max_rows=100).splitlines()
    assert lines[-1] == "… 150 more rows"
    assert [int(x) for x in lines[2:-1]] == list(range(100))
    assert format_frame(big.head(0), "table").splitlines()[-1] == "(no rows)"


def test_unknown_format() -> None:
    with pytest.raises(ConfigError, match="unknown output format 'xml'.*table, csv, json, parquet"):
        format_frame(FRAME, "xml")


def test_sql_result_round_trips(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    with Store(store) as s:
        df = s.sql("SELECT run_id, seq_id, pos, d0 FROM act_resid_post ORDER BY ALL")
    back = pl.read_parquet(io.BytesIO(format_frame(df, "parquet")))
    assert back.equals(df)
    assert pl.DataFrame(json.loads(format_frame(df, "json"))).shape == df.shape
    assert pl.read_csv(io.StringIO(format_frame(df, "csv")))["d0"].to_list() == pytest.approx(
        df["d0"].to_list()
    )
