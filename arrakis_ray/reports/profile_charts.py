"""Charts of the model profile (tool ``profile_model``, view ``results_profile_model``).

The function takes a Polars or pandas DataFrame from SQL over the result view (one
run's rows: ``SELECT * FROM results_profile_model WHERE run_id = ...``) and returns an
Altair chart; nothing here reads the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt

from arrakis_ray.errors import DataError
from arrakis_ray.reports.charts import _check_frame

PROFILE_MEASURES = ("seconds_per_forward", "flops_per_token")
_MEASURE_TITLES = {
    "seconds_per_forward": "seconds per forward",
    "flops_per_token": "FLOPs per token",
    "params": "parameters",
    "activation_bytes_per_token": "activation bytes per token",
}
# forward order of a module: 2 slots per layer (attn, mlp; ln_final and unembed share
# layer n_layers, embed is alone at layer -1)
_ORDER = "datum.layer * 2 + (datum.kind == 'mlp' || datum.kind == 'unembed' ? 1 : 0)"


def profile_bars(
    df: Any, *, measures: Sequence[str] = PROFILE_MEASURES, title: str | None = None
) -> alt.FacetChart:
    """Horizontal bars per module, in forward order (top to bottom), one panel per
    measure (each with its own scale), coloured by module kind.

    ``measures``: columns of ``results_profile_model`` to show (default time and
    FLOPs; also ``params``, ``activation_bytes_per_token``).
    """
    measures = tuple(measures)
    unknown = [m for m in measures if m not in _MEASURE_TITLES]
    if not measures or unknown:
        raise DataError(
            f"profile_bars: measures must be some of {', '.join(_MEASURE_TITLES)}, "
            f"got {list(measures)}"
        )
    _check_frame(df, "profile_bars", ("module", "kind", "layer", *measures))
    chart = (
        alt.Chart(df)
        .transform_fold(list(measures), as_=["measure", "value"])
        .transform_calculate(order=_ORDER)
        .mark_bar()
        .encode(
            y=alt.Y(
                "module:N",
                sort=alt.EncodingSortField(field="order", op="min", order="ascending"),
                title=None,
            ),
            x=alt.X("value:Q", title=None),
            color=alt.Color("kind:N", title="kind"),
            tooltip=[
                alt.Tooltip("module:N"),
                alt.Tooltip("kind:N"),
                alt.Tooltip("measure:N"),
                alt.Tooltip("value:Q", format=".4~g"),
            ],
        )
        .properties(width=220, height=alt.Step(16))
        .facet(
            column=alt.Column(
                "measure:N",
                sort=list(measures),
                title=None,
                header=alt.Header(labelExpr=_label_expr(measures)),
            )
        )
        .resolve_scale(x="independent")
    )
    return chart.properties(title=title) if title else chart


def _label_expr(measures: Sequence[str]) -> str:
    """A Vega expression naming each measure's panel in words."""
    expr = "datum.value"
    for measure in reversed(measures):
        expr = f"datum.value == '{measure}' ? '{_MEASURE_TITLES[measure]}' : {expr}"
    return expr
