"""Charts for dictionary learning (superposition_disentangler) and probes (knowledge_prober).

Each function takes a DataFrame from SQL (``Store.sql(q)``) and returns an Altair chart;
the queries that feed them are given as constants so that reports and notebooks agree.
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.reports.charts import _check_frame

SAE_METRICS = ("fraction_of_variance_explained", "l0", "dead_features")

# One row per feature active at least once: the share of tokens where it fires.
# (Dead features have no rows; their count is results_sae_metrics.dead_features.)
FEATURE_FREQUENCY_SQL = """
SELECT f.run_id, f.hook, f.feature, count(*) / any_value(m.n_tokens) AS frequency
FROM results_sae_features f JOIN results_sae_metrics m USING (run_id, hook)
GROUP BY ALL
"""

PROBE_COLUMNS = ("layer", "accuracy", "baseline_accuracy")


def sae_metrics_bars(
    df: Any, *, metrics: tuple[str, ...] = SAE_METRICS, title: str | None = None
) -> alt.HConcatChart:
    """One bar chart per metric of ``results_sae_metrics``, one bar per hook.

    Several runs in ``df`` are told apart by colour (``run_id``).
    """
    _check_frame(df, "sae_metrics_bars", ("run_id", "hook", "kind", "n_features", *metrics))
    tooltip = ["run_id", "hook", "kind", "n_features", *metrics]
    charts = [
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("hook:N", title="hook"),
            xOffset="run_id:N",
            y=alt.Y(f"{metric}:Q", title=metric.replace("_", " ")),
            color=alt.Color("run_id:N", title="run"),
            tooltip=tooltip,
        )
        .properties(width=160, height=200)
        for metric in metrics
    ]
    chart = alt.hconcat(*charts)
    if title:
        chart = chart.properties(title=title)
    return chart


def feature_frequency_histogram(df: Any, *, bins: int = 40, title: str | None = None) -> alt.Chart:
    """Histogram of log10(feature frequency) (``FEATURE_FREQUENCY_SQL``): how often each
    live SAE feature fires; a mass near 0 (every token) or far left signals a bad dictionary.
    """
    _check_frame(df, "feature_frequency_histogram", ("feature", "frequency"))
    chart = (
        alt.Chart(df)
        .transform_filter("datum.frequency > 0")
        .transform_calculate(log_frequency="log(datum.frequency) / LN10")
        .mark_bar()
        .encode(
            x=alt.X(
                "log_frequency:Q",
                bin=alt.Bin(maxbins=bins),
                title="log10(share of tokens where the feature is active)",
            ),
            y=alt.Y("count():Q", title="features"),
            tooltip=[alt.Tooltip("count():Q", title="features")],
        )
    )
    if title:
        chart = chart.properties(title=title)
    return chart


def probe_accuracy_chart(df: Any, *, title: str | None = None) -> alt.Chart:
    """Held-out probe accuracy per layer (``results_probe_layers``) with the
    majority-class baseline as a dashed line; one colour per hook if several."""
    _check_frame(df, "probe_accuracy_chart", PROBE_COLUMNS)
    color = "hook:N" if "hook" in df.columns else alt.value("#4c78a8")
    tooltip = [c for c in ("hook", "layer", "accuracy", "auroc", "baseline_accuracy", "n_test")]
    tooltip = [c for c in tooltip if c in df.columns]
    chart = (
        alt.Chart(df)
        .transform_fold(["accuracy", "baseline_accuracy"], as_=["series", "value"])
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer"),
            y=alt.Y("value:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1])),
            color=color,
            strokeDash=alt.StrokeDash(
                "series:N",
                title=None,
                scale=alt.Scale(domain=["accuracy", "baseline_accuracy"], range=[[1, 0], [4, 4]]),
            ),
            tooltip=tooltip,
        )
    )
    if title:
        chart = chart.properties(title=title)
    return chart
