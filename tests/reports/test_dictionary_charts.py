"""Dictionary-learning and probe charts: encodings checked on the Vega-Lite spec."""

from __future__ import annotations

import polars as pl
import pytest

from arrakis_ray.errors import DataError
from arrakis_ray.reports.dictionary_charts import (
    feature_frequency_histogram,
    probe_accuracy_chart,
    sae_metrics_bars,
)


def _values(spec: dict) -> list[dict]:
    (values,) = spec["datasets"].values()
    return values


def test_sae_metrics_bars_one_chart_per_metric():
    df = pl.DataFrame(
        {
            "run_id": ["r", "r"],
            "hook": ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"],
            "kind": ["topk", "topk"],
            "n_features": [512, 2048],
            "fraction_of_variance_explained": [0.9, 0.8],
            "l0": [8.0, 8.0],
            "dead_features": [10, 200],
        }
    )
    spec = sae_metrics_bars(df, title="sae").to_dict()
    charts = spec["hconcat"]
    assert [c["encoding"]["y"]["field"] for c in charts] == [
        "fraction_of_variance_explained",
        "l0",
        "dead_features",
    ]
    for c in charts:
        assert c["mark"]["type"] == "bar"
        assert (c["encoding"]["x"]["field"], c["encoding"]["x"]["type"]) == ("hook", "nominal")
        assert c["encoding"]["color"]["field"] == "run_id"
    assert spec["title"] == "sae" and len(_values(spec)) == 2


def test_feature_frequency_histogram_bins_log_frequency():
    df = pl.DataFrame({"feature": [0, 1, 2], "frequency": [0.5, 0.01, 0.0]})
    spec = feature_frequency_histogram(df, bins=20).to_dict()
    enc = spec["encoding"]
    assert enc["x"]["field"] == "log_frequency" and enc["x"]["bin"] == {"maxbins": 20}
    assert enc["y"]["aggregate"] == "count"
    (filt,) = [t for t in spec["transform"] if "filter" in t]
    assert filt["filter"] == "datum.frequency > 0"  # dead features have no log
    (calc,) = [t for t in spec["transform"] if "calculate" in t]
    assert calc["as"] == "log_frequency" and "LN10" in calc["calculate"]


def test_probe_accuracy_chart_lines_accuracy_and_dashed_baseline():
    df = pl.DataFrame(
        {
            "hook": [f"blocks.{i}.hook_resid_post" for i in range(3)],
            "layer": [0, 1, 2],
            "accuracy": [0.5, 0.8, 0.95],
            "auroc": [0.5, 0.9, 0.99],
            "baseline_accuracy": [0.6, 0.6, 0.6],
            "n_test": [10, 10, 10],
        }
    )
    spec = probe_accuracy_chart(df).to_dict()
    enc = spec["encoding"]
    assert spec["mark"]["type"] == "line"
    (fold,) = spec["transform"]
    assert fold["fold"] == ["accuracy", "baseline_accuracy"] and fold["as"] == ["series", "value"]
    assert (enc["x"]["field"], enc["x"]["type"]) == ("layer", "ordinal")
    assert enc["y"]["field"] == "value" and enc["y"]["scale"]["domain"] == [0, 1]
    assert enc["strokeDash"]["field"] == "series"
    assert enc["color"]["field"] == "hook"
    with pytest.raises(DataError, match="baseline_accuracy"):
        probe_accuracy_chart(df.drop("baseline_accuracy"))
