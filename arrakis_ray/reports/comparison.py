"""The comparison page: the same results of several runs, side by side, from SQL.

Two kinds of section, each shown for the runs that have the result (two at least):

- an overlay from one cross-run query (``WHERE run_id IN (...)``), a colour per run:
  what each layer knows (logit lens), neuron firing densities, residual norms, L0 and
  probe accuracy per layer. These answer "did the change between runs move this?";
- every other chart of the run report, drawn once per run and placed in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from arrakis_ray.reports.html import ChartBlock, ChartRow
from arrakis_ray.reports.site_pages import (
    Page,
    QueryLog,
    density_bin_sql,
    nav,
    sql_block,
    sql_text,
)

log = logging.getLogger(__name__)

COMPARISON_PATH = "compare.html"

LENS_BY_LAYER = """
SELECT run_id, layer,
       avg(target_prob) AS mean_next_token_prob,
       avg(CASE WHEN target_rank = 1 THEN 1.0 ELSE 0.0 END) AS top1_accuracy
FROM results_logit_lens
WHERE run_id IN ({runs}) AND target_rank IS NOT NULL
GROUP BY run_id, layer ORDER BY run_id, layer
"""

# the share of each layer's neurons per density bin (the feature pages' bins): runs of
# any width compare
DENSITY_BY_LAYER = f"""
SELECT run_id, family, layer, {density_bin_sql("freq")} AS log10_freq,
       count(*) / sum(count(*)) OVER (PARTITION BY run_id, family, layer) AS share
FROM {{view}}
WHERE run_id IN ({{runs}})
GROUP BY run_id, family, layer, log10_freq ORDER BY run_id, family, layer, log10_freq
"""

RESIDUAL_NORMS = """
SELECT run_id, layer, norm_mean FROM results_residual_layers
WHERE run_id IN ({runs}) ORDER BY run_id, layer
"""

L0_BY_LAYER = """
SELECT run_id, family, layer, l0_mean, dead_neurons / n_neurons AS dead_share
FROM results_sparsity_layers
WHERE run_id IN ({runs}) ORDER BY run_id, family, layer
"""

PROBES_BY_LAYER = """
SELECT run_id, hook, layer, accuracy, baseline_accuracy FROM results_probe_layers
WHERE run_id IN ({runs}) ORDER BY run_id, layer
"""


@dataclass(frozen=True)
class Overlay:
    """A chart of several runs at once, from one query over them."""

    view: str
    title: str
    sql: str
    """Formatted with ``view`` and ``runs`` (a SQL list of run ids)."""
    chart: Callable  # DataFrame -> Altair chart


def _lines(y: str, *, facet: str | None = None, title: str = ""):
    """DataFrame -> a line per run of ``y`` against layer (one panel per ``facet``)."""

    def draw(df):
        import altair as alt

        chart = (
            alt.Chart(df)
            .mark_line(point=True)
            .encode(
                x=alt.X("layer:O", title="layer"),
                y=alt.Y(f"{y}:Q", title=title or y),
                color=alt.Color("run_id:N", title="run"),
                tooltip=["run_id:N", "layer:O", alt.Tooltip(f"{y}:Q", format=".4g")],
            )
            .properties(width=260, height=180)
        )
        return chart.facet(column=f"{facet}:N") if facet else chart

    return draw


def _lens(df):
    import altair as alt

    long = df.unpivot(index=["run_id", "layer"], variable_name="measure", value_name="value")
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer"),
            y=alt.Y("value:Q", title="value", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("run_id:N", title="run"),
            tooltip=["run_id:N", "layer:O", "measure:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=300, height=200)
        .facet(column=alt.Column("measure:N", title=None))
    )


def _density(df):
    import altair as alt

    return (
        alt.Chart(df)
        .mark_line(point=True, interpolate="step-after")
        .encode(
            x=alt.X("log10_freq:Q", title="log10 firing frequency"),
            y=alt.Y("share:Q", title="share of the layer's neurons"),
            color=alt.Color("run_id:N", title="run"),
            tooltip=["run_id:N", "family:N", "layer:O", "log10_freq:Q", "share:Q"],
        )
        .properties(width=220, height=160)
        .facet(column=alt.Column("layer:O", title="layer"), row=alt.Row("family:N", title=None))
    )


OVERLAYS = (
    Overlay("results_logit_lens", "What each layer knows, per run", LENS_BY_LAYER, _lens),
    Overlay(
        "results_neuron_stats",
        "Neuron firing density per layer (neuron dashboard)",
        DENSITY_BY_LAYER,
        _density,
    ),
    Overlay(
        "results_sparsity_neurons",
        "Neuron firing density per layer (sparsity analyzer)",
        DENSITY_BY_LAYER,
        _density,
    ),
    Overlay(
        "results_residual_layers",
        "Mean residual norm per layer",
        RESIDUAL_NORMS,
        _lines("norm_mean", title="mean L2 norm"),
    ),
    Overlay(
        "results_sparsity_layers",
        "Mean L0 (active neurons per token) per layer",
        L0_BY_LAYER,
        _lines("l0_mean", facet="family", title="mean L0"),
    ),
    Overlay(
        "results_probe_layers",
        "Linear probe accuracy per layer",
        PROBES_BY_LAYER,
        _lines("accuracy", title="held-out accuracy"),
    ),
)


def comparison_page(
    db,
    run_ids: list[str],
    outputs: dict[str, set[str]],
    *,
    store: str,
    seq_ids: dict[str, int | None],
) -> Page | None:
    """The comparison page of ``run_ids`` (None unless two of them share a result).

    ``outputs``: run id -> the result views its tool records list (from the manifests,
    so no view is scanned to find out); ``seq_ids``: each run's sequence for the charts
    of one sequence.
    """
    from arrakis_ray.reports.run_report import report_charts, report_sections

    q = QueryLog(db)
    views = set(db.views())
    shared = {view for view in views if sum(view in outputs.get(r, set()) for r in run_ids) >= 2}
    if not shared:
        return None
    page = Page(COMPARISON_PATH, f"Comparison of {len(run_ids)} runs", queries=q.queries)
    page.blocks += [
        nav(COMPARISON_PATH, [("index", "index.html")]),
        "<p>Results that at least two of the runs have. First the overlays: one SQL query "
        "over the runs, a colour per run. Then the charts of the run reports, one per run, "
        "side by side.</p>",
    ]
    overlaid = set()
    for overlay in OVERLAYS:
        if overlay.view not in shared:
            continue
        runs = [r for r in run_ids if overlay.view in outputs.get(r, set())]
        sql = overlay.sql.format(view=overlay.view, runs=", ".join(sql_text(r) for r in runs))
        frame = q.sql(sql)
        if frame.is_empty():
            continue
        overlaid.add(overlay.view)
        page.blocks.append(
            ChartBlock(overlay.title, overlay.chart(frame), after_html=sql_block(sql, store))
        )
    for section in report_sections():
        if section.view not in shared or section.view in overlaid:
            continue
        charts = []
        for run in run_ids:
            if section.view not in outputs.get(run, set()):
                continue
            drawn = report_charts(q, run, seq_ids.get(run), sections=[section])
            charts += [
                ChartBlock(f"run {run}", c.chart, after_html=sql_block(c.sql, store)) for c in drawn
            ]
        if len(charts) >= 2:
            title = section.title.replace(", sequence {seq_id}", ", first sequence")
            page.blocks.append(ChartRow(title, tuple(charts)))
    if len(page.blocks) == 2:  # nothing drawable: the shared views had no rows
        return None
    log.info("comparison page over %d runs: %d sections", len(run_ids), len(page.blocks) - 2)
    return page
