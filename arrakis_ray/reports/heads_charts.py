"""Charts of per-head tools: attention head composition and read/write heads.

Each function takes a Polars or pandas DataFrame from SQL over the tool's result view
(``results_attention_head_composition``, ``results_read_write_heads``) and returns an
Altair chart; nothing here reads the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt

from arrakis_ray.errors import DataError
from arrakis_ray.reports.charts import _check_frame

COMPOSITION_COLUMNS = ("kind", "layer_a", "head_a", "layer_b", "head_b")
READ_WRITE_SCORES = ("write_weight", "read_q", "read_k", "read_v")
_KIND_TITLES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}
_CELL = 14  # pixels per head pair in the composition heatmap


def composition_heatmap(
    df: Any, *, value: str = "score", kind: str | None = None, title: str | None = None
) -> alt.Chart | alt.FacetChart:
    """Heatmap of composition scores: reading head B (rows) by writing head A (columns).

    Heads are labelled ``L<layer>.H<head>`` and ordered by (layer, head); only pairs
    with ``layer_a < layer_b`` exist, so the filled cells form a block triangle.
    ``value`` is ``score`` or ``score_minus_baseline``. With ``kind`` (q, k or v) one
    heatmap of that kind; without it, one panel per kind present (faceted by column).
    """
    _check_frame(df, "composition_heatmap", (*COMPOSITION_COLUMNS, value))
    if kind is not None:
        if kind not in _KIND_TITLES:
            raise DataError(f"composition_heatmap: kind must be q, k or v, got {kind!r}")
        base = alt.Chart(df).transform_filter(alt.datum.kind == kind)
    else:
        base = alt.Chart(df)
    base = base.transform_calculate(
        head_a_label="'L' + datum.layer_a + '.H' + datum.head_a",
        head_b_label="'L' + datum.layer_b + '.H' + datum.head_b",
        # sort keys: lexical order of labels would put L10 before L2
        order_a="datum.layer_a * 100000 + datum.head_a",
        order_b="datum.layer_b * 100000 + datum.head_b",
    )
    signed = value != "score"
    scale = (
        alt.Scale(scheme="redblue", domainMid=0, reverse=True)
        if signed
        else alt.Scale(scheme="viridis", domainMin=0)
    )
    chart = (
        base.mark_rect()
        .encode(
            x=alt.X(
                "head_a_label:O",
                sort=alt.EncodingSortField(field="order_a", op="min"),
                title="writing head A (earlier layer)",
                axis=alt.Axis(labelAngle=-90),
            ),
            y=alt.Y(
                "head_b_label:O",
                sort=alt.EncodingSortField(field="order_b", op="min"),
                title="reading head B (later layer)",
            ),
            color=alt.Color(f"{value}:Q", scale=scale, title=value),
            tooltip=[
                alt.Tooltip("kind:N"),
                alt.Tooltip("head_a_label:N", title="head A"),
                alt.Tooltip("head_b_label:N", title="head B"),
                alt.Tooltip(f"{value}:Q", format=".4f"),
            ],
        )
        .properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    )
    if kind is None:
        chart = chart.facet(column=alt.Column("kind:N", title=None, sort=["q", "k", "v"]))
    chart_title = title or (_KIND_TITLES[kind] if kind else None)
    if chart_title:
        chart = chart.properties(title=chart_title)
    return chart


def read_write_heatmap(
    df: Any, *, scores: Sequence[str] = READ_WRITE_SCORES, title: str | None = None
) -> alt.Chart | alt.FacetChart:
    """Layer x head heatmaps of read/write scores, one panel per score column.

    ``df`` has one row per (layer, head) from ``results_read_write_heads``; ``scores``
    are its columns to show (e.g. ``("write_weight",)`` or ``("write_act_mean",)``).
    The last layer is on top; weight scores (all in 0..1) share a colour scale from 0,
    other columns (signed activation means) a diverging one centred on 0.
    """
    scores = tuple(scores)
    if not scores:
        raise DataError("read_write_heatmap: scores is empty; name at least one score column")
    _check_frame(df, "read_write_heatmap", ("layer", "head", *scores))
    weight_only = all(s in READ_WRITE_SCORES for s in scores)
    scale = (
        alt.Scale(domainMin=0, scheme="viridis")
        if weight_only
        else alt.Scale(scheme="redblue", domainMid=0, reverse=True)
    )
    base = alt.Chart(df).transform_fold(list(scores), as_=["score_name", "value"])
    chart = (
        base.mark_rect()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", sort="descending", title="layer"),
            color=alt.Color("value:Q", scale=scale, title="score"),
            tooltip=[
                alt.Tooltip("layer:O"),
                alt.Tooltip("head:O"),
                alt.Tooltip("score_name:N", title="score"),
                alt.Tooltip("value:Q", format=".4f"),
            ],
        )
        .properties(width=alt.Step(24), height=alt.Step(24))
    )
    if len(scores) > 1:
        chart = chart.facet(column=alt.Column("score_name:N", title=None, sort=list(scores)))
    if title:
        chart = chart.properties(title=title)
    return chart
