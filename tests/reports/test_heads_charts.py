"""Per-head charts: the Vega-Lite specs carry the intended encodings."""

from __future__ import annotations

import polars as pl
import pytest

from arrakis_ray.errors import DataError
from arrakis_ray.reports.heads_charts import composition_heatmap, read_write_heatmap


@pytest.fixture
def composition_df() -> pl.DataFrame:
    rows = [
        {
            "kind": kind,
            "layer_a": la,
            "head_a": ha,
            "layer_b": lb,
            "head_b": hb,
            "score": 0.1 * (ha + hb),
            "score_minus_baseline": 0.1 * (ha - hb),
        }
        for kind in "qkv"
        for la, lb in [(0, 1), (0, 2), (1, 2)]
        for ha in range(2)
        for hb in range(2)
    ]
    return pl.DataFrame(rows)


@pytest.fixture
def read_write_df() -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "layer": L,
                "head": h,
                "write_weight": 0.1,
                "read_q": 0.2,
                "read_k": 0.3,
                "read_v": 0.4,
                "write_act_mean": -0.5 + h,
            }
            for L in range(3)
            for h in range(2)
        ]
    )


def test_composition_one_kind(composition_df):
    spec = composition_heatmap(composition_df, kind="k").to_dict()
    assert spec["mark"]["type"] == "rect" and spec["title"] == "K-composition"
    enc = spec["encoding"]
    assert enc["x"]["field"] == "head_a_label" and enc["x"]["sort"]["field"] == "order_a"
    assert enc["y"]["field"] == "head_b_label" and enc["y"]["sort"]["field"] == "order_b"
    assert enc["color"]["field"] == "score" and enc["color"]["scale"]["scheme"] == "viridis"
    filters = [t["filter"] for t in spec["transform"] if "filter" in t]
    assert filters and "'k'" in str(filters[0]).replace('"', "'")
    calc = {t["as"]: t["calculate"] for t in spec["transform"] if "calculate" in t}
    assert "datum.layer_a" in calc["head_a_label"] and "datum.head_b" in calc["head_b_label"]


def test_composition_faceted_by_kind_and_signed_value(composition_df):
    spec = composition_heatmap(composition_df, value="score_minus_baseline").to_dict()
    assert spec["facet"]["column"]["field"] == "kind"
    inner = spec["spec"]
    assert inner["encoding"]["color"]["field"] == "score_minus_baseline"
    assert inner["encoding"]["color"]["scale"]["domainMid"] == 0
    with pytest.raises(DataError, match="kind must be"):
        composition_heatmap(composition_df, kind="x")
    with pytest.raises(DataError, match="head_b"):
        composition_heatmap(composition_df.drop("head_b"))


def test_read_write_heatmap(read_write_df):
    spec = read_write_heatmap(read_write_df, title="paris").to_dict()
    assert spec["facet"]["column"]["field"] == "score_name"
    assert spec["title"] == "paris"
    (fold,) = [t for t in spec["spec"]["transform"] if "fold" in t]
    assert fold["fold"] == ["write_weight", "read_q", "read_k", "read_v"]
    enc = spec["spec"]["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"], enc["y"]["sort"]) == (
        "head",
        "layer",
        "descending",
    )
    assert enc["color"]["field"] == "value" and enc["color"]["scale"]["domainMin"] == 0
    one = read_write_heatmap(read_write_df, scores=["write_act_mean"]).to_dict()
    assert "facet" not in one and one["encoding"]["color"]["scale"]["domainMid"] == 0
    with pytest.raises(DataError, match="read_q"):
        read_write_heatmap(read_write_df.drop("read_q"))
