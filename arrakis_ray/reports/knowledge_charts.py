"""Charts of the knowledge graph (tool ``knowledge_graph_extractor``, view
``results_knowledge_graph``).

The function takes a Polars or pandas DataFrame from SQL over the result view and
returns an Altair chart; nothing here reads the store.
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.reports.charts import _check_frame

FIRST_LAYER_COLUMNS = ("relation", "first_layer", "rank")


def first_layer_bars(df: Any, *, title: str | None = None) -> alt.Chart:
    """Where the model's predictions appear: the number of rank-1 objects per first
    layer (the logit lens's first top-1 layer; -1 = the embeddings), stacked by relation.

    Rows of other ranks are left out; a prediction no layer has as top-1 (rare: the
    last layer is the model's own prediction) shows as ``never``.
    """
    _check_frame(df, "first_layer_bars", FIRST_LAYER_COLUMNS)
    chart = (
        alt.Chart(df)
        .transform_filter(alt.datum.rank == 1)
        .transform_calculate(
            layer_label="isValid(datum.first_layer) ? '' + datum.first_layer : 'never'",
            # -1 (embeddings) first, "never" last: labels sorted as text would not be
            layer_order="isValid(datum.first_layer) ? datum.first_layer : 1e9",
        )
        .mark_bar()
        .encode(
            x=alt.X(
                "layer_label:O",
                sort=alt.EncodingSortField(field="layer_order", op="min", order="ascending"),
                title="first layer with the object as top-1 (-1 = embeddings)",
                axis=alt.Axis(labelAngle=0),
            ),
            y=alt.Y("count():Q", title="predictions"),
            color=alt.Color("relation:N", title="relation"),
            tooltip=[
                alt.Tooltip("relation:N"),
                alt.Tooltip("layer_label:O", title="first layer"),
                alt.Tooltip("count():Q", title="predictions"),
            ],
        )
        .properties(width=alt.Step(40))
    )
    return chart.properties(title=title) if title else chart
