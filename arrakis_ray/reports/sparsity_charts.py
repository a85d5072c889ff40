"""Charts of the sparsity analyzer: value histograms, firing frequencies, kurtosis.

Inputs are DataFrames from SQL over the ``results_sparsity_*`` views, e.g.
``SELECT layer, bin_lo, bin_hi, count FROM results_sparsity_histograms
WHERE family = 'mlp_post' AND quantity = 'activation'``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import altair as alt

from arrakis_ray.reports.charts import _check_frame

log = logging.getLogger(__name__)


def histogram_chart(df: Any, *, title: str | None = None, log_counts: bool = True) -> alt.Chart:
    """Bars of one histogram per layer (one row of panels per layer).

    ``df``: rows (layer, bin_lo, bin_hi, count) of one family and quantity. The
    underflow / overflow bins (infinite edges) cannot be drawn; they are left out and
    their counts logged. ``log_counts`` puts counts on a symlog axis, so the spike at
    zero of a sparse activation does not flatten the tails.
    """
    _check_frame(df, "histogram_chart", ("layer", "bin_lo", "bin_hi", "count"))
    rows = _records(df, ("layer", "bin_lo", "bin_hi", "count"))
    finite = [r for r in rows if math.isfinite(r["bin_lo"]) and math.isfinite(r["bin_hi"])]
    outside = sum(r["count"] for r in rows) - sum(r["count"] for r in finite)
    if outside:
        log.info("histogram_chart: %d values outside the histogram range are not drawn", outside)
    scale = alt.Scale(type="symlog") if log_counts else alt.Scale()
    chart = (
        alt.Chart(alt.Data(values=finite))
        .mark_bar()
        .encode(
            x=alt.X("bin_lo:Q", bin="binned", title="value"),
            x2="bin_hi:Q",
            y=alt.Y("count:Q", scale=scale, title="count"),
            row=alt.Row("layer:O", title="layer"),
            tooltip=["layer:O", "bin_lo:Q", "bin_hi:Q", "count:Q"],
        )
        .properties(width=360, height=70)
    )
    return chart.properties(title=title) if title else chart


def firing_frequency_chart(df: Any, *, title: str | None = None, maxbins: int = 40) -> alt.Chart:
    """Distribution of neurons' firing frequencies, one row of panels per layer.

    ``df``: rows (layer, freq) from ``results_sparsity_neurons``, one per neuron. Dead
    neurons fall in the first bin; ``results_sparsity_layers.dead_neurons`` counts them.
    """
    _check_frame(df, "firing_frequency_chart", ("layer", "freq"))
    chart = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X(
                "freq:Q", bin=alt.Bin(maxbins=maxbins, extent=[0, 1]), title="firing frequency"
            ),
            y=alt.Y("count():Q", title="neurons"),
            row=alt.Row("layer:O", title="layer"),
            tooltip=[alt.Tooltip("count():Q", title="neurons")],
        )
        .properties(width=360, height=70)
    )
    return chart.properties(title=title) if title else chart


def kurtosis_chart(df: Any, *, title: str | None = None) -> alt.LayerChart:
    """Excess kurtosis per layer: a tick per dimension and the mean over dimensions.

    ``df``: rows (layer, dim, kurtosis) from ``results_sparsity_kurtosis``. The y axis
    is symlog: a privileged basis shows as a few dimensions far above the rest.
    """
    _check_frame(df, "kurtosis_chart", ("layer", "dim", "kurtosis"))
    base = alt.Chart(df).encode(x=alt.X("layer:O", title="layer"))
    y_scale = alt.Scale(type="symlog")
    ticks = base.mark_tick(opacity=0.35).encode(
        y=alt.Y("kurtosis:Q", scale=y_scale, title="excess kurtosis"),
        tooltip=["layer:O", "dim:Q", alt.Tooltip("kurtosis:Q", format=".2f")],
    )
    mean = base.mark_line(point=True, color="black").encode(
        y=alt.Y("mean(kurtosis):Q", scale=y_scale),
        tooltip=[alt.Tooltip("mean(kurtosis):Q", format=".2f", title="mean over dims")],
    )
    chart = alt.layer(ticks, mean).properties(width=alt.Step(40), height=260)
    return chart.properties(title=title) if title else chart


def _records(df: Any, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a polars or pandas frame as dicts of plain Python numbers (JSON-ready)."""
    if type(df).__module__.split(".")[0] == "polars":
        rows = df.select(list(columns)).to_dicts()
    else:
        rows = df[list(columns)].to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows]
