"""Charts of the residual-stream tools: direct logit attribution and residual norms.

Inputs are DataFrames from SQL over the results views, best aggregated there first:

- ``logit_attribution_*``: rows of ``results_logit_attribution`` (component, layer, head,
  contribution), e.g. the mean over positions::

      SELECT component, layer, head, avg(contribution) AS contribution
      FROM results_logit_attribution WHERE run_id = '...' GROUP BY ALL

  Several rows per component (raw per-position rows) are averaged in the chart.
- ``residual_norm_chart`` / ``residual_movement_chart``: ``results_residual_layers``
  (one row per layer; with a ``run_id`` column, one line per run).
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.reports.charts import _check_frame

DLA_COLUMNS = ("component", "layer", "head", "contribution")
_CELL = 30  # heatmap cell size in pixels
_DIVERGING = "redblue"  # red = pushes the logit down, blue = up; white at 0
# layer -1 is the embeddings in results_residual_* (logit-lens numbering)
_LAYER_LABEL = "datum.value == -1 ? 'embed' : datum.label"


def logit_attribution_heatmap(df: Any, *, title: str | None = None) -> alt.LayerChart:
    """Heads' contributions: heads across, layers down, mean contribution as colour.

    Colour is diverging around 0 (symmetric domain), so a head that pushes the logit
    down reads as clearly as one that pushes it up. Non-head rows are ignored.
    """
    _check_frame(df, "logit_attribution_heatmap", DLA_COLUMNS)
    extent = _max_abs(df, heads=True)
    base = (
        alt.Chart(df)
        .transform_filter("isValid(datum.head)")
        .transform_aggregate(contribution="mean(contribution)", groupby=["layer", "head"])
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer", sort="ascending"),
            tooltip=[
                alt.Tooltip("layer:O"),
                alt.Tooltip("head:O"),
                alt.Tooltip("contribution:Q", format=".3f", title="mean contribution"),
            ],
        )
    )
    cells = base.mark_rect().encode(
        color=alt.Color(
            "contribution:Q",
            scale=alt.Scale(scheme=_DIVERGING, domain=[-extent, extent]),
            title="logit contribution",
        )
    )
    text = base.mark_text(fontSize=9).encode(text=alt.Text("contribution:Q", format=".2f"))
    chart = alt.layer(cells, text).properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    return chart.properties(title=title or "direct logit attribution: heads")


def logit_attribution_bars(df: Any, *, title: str | None = None) -> alt.Chart:
    """The other components (embeddings, attention biases, MLPs, final-norm bias) as bars,
    in forward order, mean contribution per component."""
    _check_frame(df, "logit_attribution_bars", DLA_COLUMNS)
    # forward order: embeddings, then per layer its attention bias and mlp, then ln_final
    order = (
        "datum.component == 'embed' ? -3 : datum.component == 'pos_embed' ? -2 : "
        "datum.component == 'ln_final.bias' ? 1e9 : "
        "datum.layer * 2 + (indexof(datum.component, '.mlp') >= 0 ? 1 : 0)"
    )
    chart = (
        alt.Chart(df)
        .transform_filter("!isValid(datum.head)")
        .transform_aggregate(contribution="mean(contribution)", groupby=["component", "layer"])
        .transform_calculate(order=order)
        .mark_bar()
        .encode(
            x=alt.X(
                "component:N",
                sort=alt.EncodingSortField(field="order", op="min"),
                title=None,
                axis=alt.Axis(labelAngle=-40),
            ),
            y=alt.Y("contribution:Q", title="mean logit contribution"),
            color=alt.condition(
                "datum.contribution < 0", alt.value("#c0392b"), alt.value("#2e6fb7")
            ),
            tooltip=[
                alt.Tooltip("component:N"),
                alt.Tooltip("contribution:Q", format=".3f", title="mean contribution"),
            ],
        )
    )
    return chart.properties(title=title or "direct logit attribution: other components")


def logit_attribution_chart(df: Any, *, title: str | None = None) -> alt.HConcatChart:
    """The head heatmap and the bar chart of the other components, side by side."""
    chart = alt.hconcat(logit_attribution_heatmap(df), logit_attribution_bars(df))
    return chart.properties(title=title) if title else chart


def residual_norm_chart(df: Any, *, title: str | None = None) -> alt.LayerChart:
    """Mean residual norm per layer, with a band of +- one standard deviation.

    ``df``: ``results_residual_layers`` rows (layer, norm_mean, norm_std; optional
    run_id: one line per run).
    """
    _check_frame(df, "residual_norm_chart", ("layer", "norm_mean", "norm_std"))
    color = {"color": alt.Color("run_id:N", title="run")} if "run_id" in df.columns else {}
    base = alt.Chart(df).encode(
        x=alt.X("layer:O", title="layer", axis=alt.Axis(labelExpr=_LAYER_LABEL)), **color
    )
    band = (
        base.transform_calculate(
            low="datum.norm_mean - datum.norm_std", high="datum.norm_mean + datum.norm_std"
        )
        .mark_area(opacity=0.2)
        .encode(y=alt.Y("low:Q", title="residual norm"), y2="high:Q")
    )
    line = base.mark_line(point=True).encode(
        y=alt.Y("norm_mean:Q", title="residual norm"),
        tooltip=[
            alt.Tooltip("layer:O"),
            alt.Tooltip("norm_mean:Q", format=".3f"),
            alt.Tooltip("norm_std:Q", format=".3f"),
        ],
    )
    return alt.layer(band, line).properties(title=title or "residual norm per layer")


def residual_movement_chart(df: Any, *, title: str | None = None) -> alt.Chart:
    """Mean relative movement and mean cosine to the previous layer, one line each.

    ``df``: ``results_residual_layers`` rows (layer, movement_mean, cosine_mean;
    optional run_id: dashed lines per run).
    """
    _check_frame(df, "residual_movement_chart", ("layer", "movement_mean", "cosine_mean"))
    extra = (
        {"strokeDash": alt.StrokeDash("run_id:N", title="run")} if "run_id" in df.columns else {}
    )
    chart = (
        alt.Chart(df)
        .transform_fold(["movement_mean", "cosine_mean"], as_=["metric", "value"])
        .transform_filter("isValid(datum.value)")
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelExpr=_LAYER_LABEL)),
            y=alt.Y("value:Q", title="mean over tokens"),
            color=alt.Color(
                "metric:N",
                title=None,
                scale=alt.Scale(
                    domain=["movement_mean", "cosine_mean"], range=["#d95f02", "#1b9e77"]
                ),
                legend=alt.Legend(
                    labelExpr="datum.value == 'movement_mean' ? "
                    "'|r_L - r_(L-1)| / |r_(L-1)|' : 'cos(r_L, r_(L-1))'"
                ),
            ),
            tooltip=[
                alt.Tooltip("layer:O"),
                alt.Tooltip("metric:N"),
                alt.Tooltip("value:Q", format=".3f"),
            ],
            **extra,
        )
    )
    return chart.properties(title=title or "how much each block moves the residual")


def _max_abs(df: Any, heads: bool) -> float:
    """Largest |mean contribution| over the head cells (for a symmetric colour domain)."""
    frame = df.to_pandas() if hasattr(df, "to_pandas") else df  # polars -> pandas
    frame = frame[frame["head"].notna()] if heads else frame
    if not len(frame):
        return 1.0
    means = frame.groupby(["layer", "head"])["contribution"].mean().abs()
    return float(means.max()) or 1.0
