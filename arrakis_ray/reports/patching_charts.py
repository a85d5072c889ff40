"""Charts of activation patching and attribution patching.

Each function takes a Polars or pandas DataFrame from SQL over
``results_activation_patching`` (or ``results_attribution_patching``, same columns) and
returns an Altair chart; the queries the report uses are in ``reports/live_sections.py``.
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.reports.charts import _check_frame

POSITION_COLUMNS = ("family", "layer", "pos", "token", "metric")
HEAD_COLUMNS = ("layer", "head", "metric")
_CELL = 34  # pixels per heatmap cell
# recovery is 0 (as corrupted) to 1 (as clean); negative values push the other way
_SCALE = alt.Scale(scheme="redblue", domain=[-1, 1], domainMid=0)


def position_heatmap(df: Any, *, title: str | None = None) -> alt.FacetChart:
    """Recovery per (layer, position), one panel per dense family (``resid_pre``,
    ``attn_out`` ...): rows are layers, columns the clean prompt's tokens."""
    _check_frame(df, "position_heatmap", POSITION_COLUMNS)
    labelled = alt.Chart(df).transform_calculate(
        position=alt.expr.toString(alt.datum.pos) + " " + alt.datum.token
    )
    cells = labelled.mark_rect().encode(
        x=alt.X("position:O", title="position (clean token)", sort=alt.SortField("pos")),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("metric:Q", title="recovery", scale=_SCALE),
        tooltip=["family:N", "layer:O", "pos:O", "token:N", alt.Tooltip("metric:Q", format=".3f")],
    )
    return cells.properties(width=alt.Step(_CELL), height=alt.Step(_CELL)).facet(
        column=alt.Column("family:N", title=None), title=title or "Activation patching"
    )


def head_heatmap(df: Any, *, title: str | None = None) -> alt.Chart:
    """Recovery per head (``attn_z`` patched at every position): layer x head."""
    _check_frame(df, "head_heatmap", HEAD_COLUMNS)
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color("metric:Q", title="recovery", scale=_SCALE),
            tooltip=["layer:O", "head:O", alt.Tooltip("metric:Q", format=".3f")],
        )
        .properties(
            width=alt.Step(_CELL), height=alt.Step(_CELL), title=title or "Patching per head"
        )
    )


def exact_against_attribution(df: Any, *, title: str | None = None) -> alt.Chart:
    """Scatter of exact patching (x) against its AtP estimate (y), one point per
    component, coloured by family; the diagonal is a perfect estimate."""
    _check_frame(df, "exact_against_attribution", ("family", "exact", "attribution"))
    points = (
        alt.Chart(df)
        .mark_circle(size=28, opacity=0.6)
        .encode(
            x=alt.X("exact:Q", title="activation patching (recovery)"),
            y=alt.Y("attribution:Q", title="attribution patching (estimate)"),
            color=alt.Color("family:N"),
            tooltip=["family:N", "exact:Q", "attribution:Q"],
        )
    )
    diagonal = (
        alt.Chart(alt.Data(values=[{"v": -1.0}, {"v": 1.5}]))
        .mark_line(color="#888", strokeDash=[4, 4])
        .encode(x="v:Q", y="v:Q")
    )
    return (diagonal + points).properties(
        width=320, height=320, title=title or "Exact patching against AtP"
    )
