"""Chart functions: encodings checked on the Vega-Lite spec, bad input rejected clearly."""

from __future__ import annotations

import duckdb
import pandas as pd
import polars as pl
import pytest

from arrakis_ray.errors import DataError
from arrakis_ray.reports import bar_chart, layer_line_chart, logit_lens_heatmap
from arrakis_ray.reports.charts import LOGIT_LENS_COLUMNS


def _dataset(spec: dict) -> list[dict]:
    (values,) = spec["datasets"].values()
    return values


def test_heatmap_encodings(logit_lens_df, logit_lens_rows):
    spec = logit_lens_heatmap(logit_lens_df, title="lens").to_dict()
    missing, cells, text = spec["layer"]
    assert missing["mark"]["type"] == "rect" and "color" not in missing["encoding"]
    assert cells["mark"]["type"] == "rect" and text["mark"]["type"] == "text"
    enc = cells["encoding"]
    assert (enc["y"]["field"], enc["y"]["type"], enc["y"]["sort"]) == (
        "layer",
        "ordinal",
        "descending",
    )
    # x is the "pos: token_text" label, ordered by the numeric position.
    assert enc["x"]["field"] == "pos_label" and enc["x"]["type"] == "ordinal"
    assert enc["x"]["sort"]["field"] == "pos"
    (calc,) = [t for t in cells["transform"] if t.get("as") == "pos_label"]
    assert "datum.pos" in calc["calculate"] and "datum.token_text" in calc["calculate"]
    assert enc["color"]["field"] == "target_prob"
    assert enc["color"]["scale"]["domain"] == [0, 1]
    assert {t["field"] for t in enc["tooltip"]} == set(LOGIT_LENS_COLUMNS)
    # The in-cell text is the top-1 prediction.
    assert text["encoding"]["text"]["field"] == "top1_label"
    (calc,) = [t for t in text["transform"] if t.get("as") == "top1_label"]
    assert "datum.top1_token" in calc["calculate"]
    assert spec["title"] == "lens"
    assert _dataset(spec) == logit_lens_rows


def test_heatmap_accepts_pandas(logit_lens_rows):
    spec = logit_lens_heatmap(pd.DataFrame(logit_lens_rows)).to_dict()
    assert len(_dataset(spec)) == 15
    assert "title" not in spec


def test_heatmap_missing_column_is_named(logit_lens_df):
    with pytest.raises(DataError, match=r"logit_lens_heatmap.*target_rank"):
        logit_lens_heatmap(logit_lens_df.drop("target_rank"))


def test_relations_and_lazy_frames_are_rejected(logit_lens_df):
    con = duckdb.connect()
    rel = con.sql("SELECT 1 AS layer, 2.0 AS norm")
    with pytest.raises(DataError, match="DuckDB relation"):
        layer_line_chart(rel, x="layer", y="norm")
    with pytest.raises(DataError, match=r"collect\(\)"):
        logit_lens_heatmap(logit_lens_df.lazy())


def test_line_chart_from_sql():
    con = duckdb.connect()
    df = con.sql(
        "SELECT run, layer, avg(norm) AS norm FROM (VALUES ('a', 0, 1.0), ('a', 0, 3.0),"
        " ('a', 1, 4.0), ('b', 0, 5.0)) t(run, layer, norm) GROUP BY ALL ORDER BY ALL"
    ).pl()
    spec = layer_line_chart(df, x="layer:O", y="norm", color="run", title="norms").to_dict()
    assert spec["mark"] == {"type": "line", "point": True}
    enc = spec["encoding"]
    assert (enc["x"]["field"], enc["x"]["type"]) == ("layer", "ordinal")
    assert (enc["y"]["field"], enc["color"]["field"]) == ("norm", "run")
    assert _dataset(spec) == df.to_dicts()
    assert _dataset(spec)[0] == {"run": "a", "layer": 0, "norm": 2.0}  # mean of 1 and 3


def test_line_chart_checks_shorthand_fields():
    df = pl.DataFrame({"layer": [0, 1], "norm": [1.0, 2.0]})
    spec = layer_line_chart(df, x="layer", y="mean(norm):Q").to_dict()
    assert spec["encoding"]["y"]["aggregate"] == "mean"
    with pytest.raises(DataError, match="'run'"):
        layer_line_chart(df, x="layer", y="norm", color="run:N")


def test_bar_chart():
    df = pl.DataFrame({"tool": ["lens", "probe"], "seconds": [1.5, 0.25]})
    spec = bar_chart(df, x="tool", y="seconds").to_dict()
    assert spec["mark"]["type"] == "bar"
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("tool", "seconds")
    assert _dataset(spec) == df.to_dicts()
    with pytest.raises(DataError, match="'secs'"):
        bar_chart(df, x="tool", y="secs")
