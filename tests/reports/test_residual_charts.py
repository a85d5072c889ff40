"""Charts of logit attribution and residual norms: encodings checked on the spec."""

from __future__ import annotations

import pandas as pd
import polars as pl
import pytest

from arrakis_ray.errors import DataError
from arrakis_ray.reports.residual_charts import (
    logit_attribution_bars,
    logit_attribution_chart,
    logit_attribution_heatmap,
    residual_movement_chart,
    residual_norm_chart,
)


@pytest.fixture()
def dla() -> pl.DataFrame:
    """Two positions of a 2-layer, 2-head model's attribution rows."""
    rows = []
    for pos in (0, 1):
        rows += [
            {"component": "embed", "layer": None, "head": None, "contribution": 0.5},
            {"component": "ln_final.bias", "layer": None, "head": None, "contribution": -0.1},
        ]
        for layer in (0, 1):
            for head in (0, 1):
                value = (-3.0 if (layer, head) == (1, 0) else 0.5) * (pos + 1)
                rows.append(
                    {
                        "component": f"L{layer}H{head}",
                        "layer": layer,
                        "head": head,
                        "contribution": value,
                    }
                )
            rows.append(
                {"component": f"L{layer}.mlp", "layer": layer, "head": None, "contribution": 1.0}
            )
    return pl.DataFrame(rows)


def _transforms(spec: dict) -> list[dict]:
    return spec.get("transform", [])


def test_heatmap_shows_mean_head_contributions_on_a_symmetric_scale(dla):
    spec = logit_attribution_heatmap(dla).to_dict()
    cells, text = spec["layer"]
    enc = cells["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"]) == ("head", "layer")
    assert enc["color"]["field"] == "contribution"
    # mean of -3 and -6 at L1H0: the domain is symmetric around 0
    assert enc["color"]["scale"]["domain"] == [-4.5, 4.5]
    assert enc["color"]["scale"]["scheme"] == "redblue"
    assert text["encoding"]["text"]["field"] == "contribution"
    filt, agg = _transforms(cells)[:2]
    assert filt == {"filter": "isValid(datum.head)"}
    assert agg["groupby"] == ["layer", "head"] and agg["aggregate"][0]["op"] == "mean"


def test_bars_show_the_other_components_in_forward_order(dla):
    spec = logit_attribution_bars(dla.to_pandas()).to_dict()
    assert spec["mark"]["type"] == "bar"
    assert {"filter": "!isValid(datum.head)"} in _transforms(spec)
    assert spec["encoding"]["x"]["field"] == "component"
    assert spec["encoding"]["x"]["sort"] == {"field": "order", "op": "min"}
    assert spec["encoding"]["y"]["field"] == "contribution"
    (calc,) = [t for t in _transforms(spec) if t.get("as") == "order"]
    assert "ln_final.bias" in calc["calculate"] and ".mlp" in calc["calculate"]
    both = logit_attribution_chart(dla, title="DLA").to_dict()
    assert len(both["hconcat"]) == 2 and both["title"] == "DLA"


def test_residual_line_charts():
    layers = pd.DataFrame(
        {
            "run_id": ["a"] * 3,
            "layer": [-1, 0, 1],
            "norm_mean": [1.0, 2.0, 4.0],
            "norm_std": [0.1, 0.2, 0.4],
            "movement_mean": [None, 1.2, 0.8],
            "cosine_mean": [None, 0.5, 0.7],
        }
    )
    spec = residual_norm_chart(layers).to_dict()
    band, line = spec["layer"]
    assert band["mark"]["type"] == "area" and band["encoding"]["y2"]["field"] == "high"
    assert line["encoding"]["y"]["field"] == "norm_mean"
    assert line["encoding"]["color"]["field"] == "run_id"
    assert "embed" in line["encoding"]["x"]["axis"]["labelExpr"]
    spec = residual_movement_chart(layers).to_dict()
    fold = _transforms(spec)[0]
    assert fold == {"fold": ["movement_mean", "cosine_mean"], "as": ["metric", "value"]}
    assert spec["encoding"]["y"]["field"] == "value"
    assert spec["encoding"]["color"]["field"] == "metric"


def test_missing_columns_are_named(dla):
    with pytest.raises(DataError, match=r"logit_attribution_heatmap.*contribution"):
        logit_attribution_heatmap(dla.drop("contribution"))
    with pytest.raises(DataError, match=r"residual_norm_chart.*norm_std"):
        residual_norm_chart(pd.DataFrame({"layer": [0], "norm_mean": [1.0]}))
