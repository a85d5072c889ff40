"""Charts of the attention tools: layer x head heatmaps of each head score.

Input is ``results_attention_head_scores`` as a DataFrame (one row per layer, head),
e.g. ``store.sql("SELECT * FROM results_attention_head_scores WHERE run_id = '...'")``.
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.errors import DataError
from arrakis_ray.reports.charts import _check_frame

# Score columns, in the order a grid shows them; all but entropy are weights in 0..1.
SCORES = (
    "prev_token_score",
    "induction_score",
    "duplicate_token_score",
    "bos_attention",
    "entropy",
)
_TITLES = {
    "prev_token_score": "previous token",
    "induction_score": "induction",
    "duplicate_token_score": "duplicate token",
    "bos_attention": "attention to BOS",
    "entropy": "entropy (nats)",
}
_CELL = 34  # heatmap cell size in pixels: room for a two-decimal value


def head_score_heatmap(df: Any, score: str, *, title: str | None = None) -> alt.LayerChart:
    """Heatmap of one head score: heads across, layers down (layer 0 on top).

    Each cell shows the value with two decimals; weights (every score but entropy)
    share the colour domain 0..1 so heatmaps of different runs compare by eye.
    """
    if score not in SCORES:
        raise DataError(f"head_score_heatmap: unknown score {score!r}; use one of {SCORES}")
    _check_frame(df, "head_score_heatmap", ("layer", "head", score))
    scale = (
        alt.Scale(scheme="viridis")
        if score == "entropy"
        else alt.Scale(domain=[0, 1], scheme="viridis")
    )
    base = alt.Chart(df).encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        tooltip=[
            alt.Tooltip("layer:O"),
            alt.Tooltip("head:O"),
            alt.Tooltip(f"{score}:Q", format=".3f"),
        ],
    )
    cells = base.mark_rect().encode(
        color=alt.Color(f"{score}:Q", scale=scale, title=_TITLES[score])
    )
    text = base.mark_text(fontSize=10).encode(
        text=alt.Text(f"{score}:Q", format=".2f"),
        # viridis is dark at the low end: white text there
        color=alt.condition(
            f"datum.{score} < {_midpoint(df, score)}",
            alt.value("white"),
            alt.value("black"),
        ),
    )
    chart = alt.layer(cells, text).properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    return chart.properties(title=title or _TITLES[score])


def head_scores_grid(df: Any, scores: tuple[str, ...] = SCORES) -> alt.HConcatChart:
    """One heatmap per score, side by side (colour scales independent)."""
    charts = [head_score_heatmap(df, score) for score in scores]
    return alt.hconcat(*charts).resolve_scale(color="independent")


def _midpoint(df: Any, score: str) -> float:
    """Middle of the colour domain: 0.5 for weights, mid-range of the values for entropy."""
    if score != "entropy":
        return 0.5
    values = [float(v) for v in df[score] if v is not None and v == v]
    return (min(values) + max(values)) / 2 if values else 0.5
