"""The report of one run: SQL over the store -> Altair charts -> one offline HTML file.

Charts are built from SQL results only, so what a report shows is what anyone can
query with ``arrakis-ray sql``. The queries are kept here, in plain sight. A section
appears when its tool's results exist in the run; the logit lens is required.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arrakis_ray.errors import ReportError, ToolError
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store.location import is_remote, os_reason

LENS_FOR_SEQUENCE = """
SELECT l.layer, l.pos, t.token_text, l.top1_token, l.top1_prob,
       l.target_token, l.target_prob, l.target_rank
FROM results_logit_lens l
JOIN tokens t ON t.run_id = l.run_id AND t.seq_id = l.seq_id AND t.pos = l.pos
WHERE l.run_id = '{run_id}' AND l.seq_id = {seq_id}
ORDER BY l.layer, l.pos
"""

LENS_BY_LAYER = """
SELECT layer,
       avg(target_prob) AS mean_next_token_prob,
       avg(CASE WHEN target_rank = 1 THEN 1.0 ELSE 0.0 END) AS top1_accuracy
FROM results_logit_lens
WHERE run_id = '{run_id}' AND target_rank IS NOT NULL
GROUP BY layer ORDER BY layer
"""

# the logit attribution of the position that predicts the sequence's second-to-last
# token: in the demo's fact sentences ("... is paris ."), the answer
DLA_FOR_ANSWER = """
SELECT component, layer, head, contribution
FROM results_logit_attribution
WHERE run_id = '{run_id}' AND seq_id = {seq_id}
  AND pos = (SELECT max(pos) - 2 FROM tokens WHERE run_id = '{run_id}' AND seq_id = {seq_id})
"""


@dataclass(frozen=True)
class Section:
    """One optional chart: shown when ``view`` exists in the store."""

    view: str
    title: str
    sql: str
    chart: Callable  # DataFrame -> Altair chart
    needs: tuple[str, ...] = ()
    """Other views the SQL reads (the section is skipped without them)."""


def _sections() -> list[Section]:
    from arrakis_ray.reports import (
        attention_charts,
        dictionary_charts,
        heads_charts,
        residual_charts,
        sparsity_charts,
    )
    from arrakis_ray.reports.live_sections import live_sections

    every = "SELECT * FROM {view} WHERE run_id = '{run_id}'"
    return [
        Section(
            "results_logit_attribution",
            "Direct logit attribution of the answer",
            DLA_FOR_ANSWER,
            residual_charts.logit_attribution_chart,
        ),
        Section(
            "results_residual_layers",
            "Residual stream norm per layer",
            every,
            residual_charts.residual_norm_chart,
        ),
        Section(
            "results_attention_head_scores",
            "Attention head scores",
            every,
            attention_charts.head_scores_grid,
        ),
        Section(
            "results_attention_head_composition",
            "Head composition (minus baseline)",
            every,
            lambda df: heads_charts.composition_heatmap(df, value="score_minus_baseline"),
        ),
        Section(
            "results_read_write_heads",
            "Heads writing to the direction",
            every,
            heads_charts.read_write_heatmap,
        ),
        Section(
            "results_sparsity_neurons",
            "MLP neuron firing frequency",
            every,
            sparsity_charts.firing_frequency_chart,
        ),
        Section(
            "results_sparsity_kurtosis",
            "Residual stream kurtosis per dimension",
            every,
            sparsity_charts.kurtosis_chart,
        ),
        Section(
            "results_sae_metrics", "Sparse autoencoder", every, dictionary_charts.sae_metrics_bars
        ),
        Section(
            "results_probe_layers",
            "Linear probe accuracy per layer",
            every,
            dictionary_charts.probe_accuracy_chart,
        ),
        *live_sections(Section),
    ]


@dataclass(frozen=True)
class RunReport:
    """Paths of a written report."""

    html: Path
    pngs: list[Path]
    seq_id: int


def build_report(
    run: str | Path,
    store: str | Path | None = None,
    *,
    seq_id: int | None = None,
    out_dir: str | Path | None = None,
    png: bool = True,
) -> RunReport:
    """Write ``report.html`` (+ PNGs) for a run that has logit-lens results."""
    import polars as pl

    from arrakis_ray.reports.charts import layer_line_chart, logit_lens_heatmap
    from arrakis_ray.reports.html import write_report
    from arrakis_ray.store.catalog import Store

    layout = store_layout.resolve_run(run, store)
    run_id = layout.run_id
    if out_dir is None:
        # a report is opened in a browser: for a store on an object store it goes in a
        # local directory named after the run
        remote = is_remote(layout.root)
        out_dir = Path(f"report-{run_id}") if remote else layout.root / "report"
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)
    with Store(layout.store_root) as db:
        views = set(db.views())
        if "results_logit_lens" not in views:
            raise ToolError(
                f"run {run_id} has no logit-lens results: run "
                f"'arrakis-ray analyze {layout.root} --tool logit_lens' first"
            )
        if seq_id is None:
            first = db.sql(
                f"SELECT min(seq_id) AS s FROM results_logit_lens WHERE run_id = '{run_id}'"
            )
            seq_id = int(first["s"][0])
        lens = db.sql(LENS_FOR_SEQUENCE.format(run_id=run_id, seq_id=int(seq_id)))
        if lens.is_empty():
            raise ToolError(f"run {run_id} has no sequence {seq_id}")
        by_layer = (
            db.sql(LENS_BY_LAYER.format(run_id=run_id))
            .unpivot(index="layer", variable_name="measure", value_name="value")
            .with_columns(pl.col("value").cast(pl.Float64))
        )
        text = " ".join(lens.filter(pl.col("layer") == lens["layer"].min())["token_text"])
        charts = [
            (
                f"Logit lens, sequence {seq_id}",
                logit_lens_heatmap(
                    lens, title=f"P(actual next token) by layer and position: {text[:80]}"
                ),
            ),
            (
                "What each layer knows, over the whole run",
                layer_line_chart(
                    by_layer,
                    x="layer",
                    y="value",
                    color="measure",
                    title="Mean probability of the actual next token, and top-1 accuracy",
                ),
            ),
        ]
        for section in _sections():
            if not {section.view, *section.needs} <= views:
                continue
            frame = db.sql(section.sql.format(view=section.view, run_id=run_id, seq_id=seq_id))
            if not frame.is_empty():
                charts.append((section.title, section.chart(frame)))
    intro = (
        f"<p>Run <code>{run_id}</code>. Every chart is drawn from a SQL query over the "
        "store (<code>arrakis-ray sql</code>). The logit lens reads the residual stream "
        "after each layer through the final norm and unembedding. Colour: probability of "
        "the token that actually comes next. Text: the layer's top-1 guess.</p>"
    )
    try:
        paths = write_report(
            charts, out_dir, title=f"arrakis-ray report: {run_id}", intro_html=intro, png=png
        )
    except OSError as e:  # what _check_out_dir cannot foresee: /proc, a full disk
        where = Path(e.filename) if e.filename else out_dir
        raise ReportError(f"cannot write the report to {where}: {os_reason(where, e)}") from None
    return RunReport(paths.html, list(paths.pngs), int(seq_id))


def _check_out_dir(out_dir: Path) -> None:
    """ReportError, before any query runs, if the report cannot go to ``out_dir``: it or
    the nearest existing directory above it is a file, or that directory is read-only.
    Nothing is created here: a report that fails later leaves no empty directory."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ReportError(
            f"cannot write the report to {out_dir}: {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write the report to {out_dir}: {existing} is not writable")
