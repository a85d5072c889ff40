"""The report of one run: SQL over the store -> Altair charts -> one offline HTML file.

Charts are built from SQL results only, so what a report shows is what anyone can
query with ``arrakis-ray sql``. The queries are kept here, in plain sight. A section
appears when its tool's results exist in the run; the logit lens is required.
The site (``reports/site.py``) draws its run and tool pages from the same sections
(``report_sections``, ``report_charts``), so both show the same charts from the same SQL.
"""

from __future__ import annotations

import html
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
class ReportChart:
    """One chart of a run's report, with the SQL that produced its data."""

    section: Section
    title: str
    sql: str
    """The query as run: the section's SQL for this run (and sequence)."""
    chart: object  # an Altair chart

    @property
    def view(self) -> str:
        return self.section.view


def _lens_heatmap(df):
    from arrakis_ray.reports.charts import logit_lens_heatmap

    first = df.filter(df["layer"] == df["layer"].min())
    text = " ".join(first["token_text"])
    return logit_lens_heatmap(df, title=f"P(actual next token) by layer and position: {text[:80]}")


def _lens_by_layer(df):
    import polars as pl

    from arrakis_ray.reports.charts import layer_line_chart

    long = df.unpivot(index="layer", variable_name="measure", value_name="value").with_columns(
        pl.col("value").cast(pl.Float64)
    )
    return layer_line_chart(
        long,
        x="layer",
        y="value",
        color="measure",
        title="Mean probability of the actual next token, and top-1 accuracy",
    )


LENS_SECTIONS = (
    Section(
        "results_logit_lens", "Logit lens, sequence {seq_id}", LENS_FOR_SEQUENCE, _lens_heatmap
    ),
    Section(
        "results_logit_lens",
        "What each layer knows, over the whole run",
        LENS_BY_LAYER,
        _lens_by_layer,
    ),
)


def report_sections() -> list[Section]:
    """Every section a report may hold, in page order: the logit lens first."""
    return [*LENS_SECTIONS, *_sections()]


def first_sequence(db, run_id: str) -> int | None:
    """The run's first sequence with logit-lens results (the heatmap's default)."""
    if "results_logit_lens" not in db.views():
        return None
    first = db.sql(f"SELECT min(seq_id) AS s FROM results_logit_lens WHERE run_id = '{run_id}'")
    value = first["s"][0]
    return None if value is None else int(value)


def report_charts(
    db, run_id: str, seq_id: int | None, sections: list[Section] | None = None
) -> list[ReportChart]:
    """The charts of ``sections`` (default: all) whose views the store has and whose
    query returns rows for the run, each with its SQL (``db``: an open Store)."""
    views = set(db.views())
    charts = []
    for section in report_sections() if sections is None else sections:
        if not {section.view, *section.needs} <= views:
            continue
        if seq_id is None and "{seq_id}" in section.sql:
            continue  # a per-sequence chart of a run without logit-lens results
        sql = section.sql.format(view=section.view, run_id=run_id, seq_id=seq_id)
        frame = db.sql(sql)
        if not frame.is_empty():
            title = section.title.format(seq_id=seq_id)
            charts.append(ReportChart(section, title, sql.strip(), section.chart(frame)))
    return charts


def report_intro(run_id: str) -> str:
    """The report's opening paragraph (HTML): what the charts are and how to read them."""
    return (
        f"<p>Run <code>{html.escape(run_id)}</code>. Every chart is drawn from a SQL query "
        "over the store (<code>arrakis-ray sql</code>). The logit lens reads the residual "
        "stream after each layer through the final norm and unembedding. Colour: "
        "probability of the token that actually comes next. Text: the layer's top-1 guess.</p>"
    )


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
    check_out_dir(out_dir)
    # only the runs' own calls: a sweep's other settings of a tool would be drawn
    # overlaid in every chart (and multiply the rows of joins on run_id)
    with Store(layout.store_root, variants=False) as db:
        if seq_id is None:
            seq_id = first_sequence(db, run_id)
        if seq_id is None:
            raise ToolError(
                f"run {run_id} has no logit-lens results: run "
                f"'arrakis-ray analyze {layout.root} --tool logit_lens' first"
            )
        charts = report_charts(db, run_id, int(seq_id))
    if not charts or charts[0].section is not LENS_SECTIONS[0]:
        raise ToolError(f"run {run_id} has no sequence {seq_id}")
    try:
        paths = write_report(
            [(c.title, c.chart) for c in charts],
            out_dir,
            title=f"arrakis-ray report: {run_id}",
            intro_html=report_intro(run_id),
            png=png,
        )
    except OSError as e:  # what check_out_dir cannot foresee: /proc, a full disk
        where = Path(e.filename) if e.filename else out_dir
        raise ReportError(f"cannot write the report to {where}: {os_reason(where, e)}") from None
    return RunReport(paths.html, list(paths.pngs), int(seq_id))


def check_out_dir(out_dir: Path, what: str = "report") -> None:
    """ReportError, before any query runs, if the report cannot go to ``out_dir``: it or
    the nearest existing directory above it is a file, or that directory is read-only.
    Nothing is created here: a report that fails later leaves no empty directory."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ReportError(
            f"cannot write the {what} to {out_dir}: {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write the {what} to {out_dir}: {existing} is not writable")
