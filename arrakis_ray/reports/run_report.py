"""The report of one run: SQL over the store -> Altair charts -> one offline HTML file.

Charts are built from SQL results only, so what a report shows is what anyone can
query with ``arrakis-ray sql``. The queries are kept here, in plain sight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arrakis_ray.errors import ToolError
from arrakis_ray.store import layout as store_layout

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
    out_dir = Path(out_dir) if out_dir else layout.root / "report"
    with Store(layout.store_root) as db:
        if "results_logit_lens" not in db.views():
            raise ToolError(
                f"run {layout.run_id} has no logit-lens results: run "
                f"'arrakis-ray analyze {layout.root} --tool logit_lens' first"
            )
        if seq_id is None:
            first = db.sql(
                f"SELECT min(seq_id) AS s FROM results_logit_lens WHERE run_id = '{layout.run_id}'"
            )
            seq_id = int(first["s"][0])
        lens = db.sql(LENS_FOR_SEQUENCE.format(run_id=layout.run_id, seq_id=int(seq_id)))
        if lens.is_empty():
            raise ToolError(f"run {layout.run_id} has no sequence {seq_id}")
        by_layer = db.sql(LENS_BY_LAYER.format(run_id=layout.run_id))
    by_layer = by_layer.unpivot(
        index="layer", variable_name="measure", value_name="value"
    ).with_columns(pl.col("value").cast(pl.Float64))
    text = " ".join(lens.filter(pl.col("layer") == lens["layer"].min())["token_text"].to_list())
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
                title="Mean probability of the actual next token, and top-1 accuracy, per layer",
            ),
        ),
    ]
    intro = (
        f"<p>Run <code>{layout.run_id}</code>. Each cell reads the residual stream after "
        "a layer through the final norm and unembedding. Colour: probability of the token "
        "that actually comes next; text: the layer's top-1 guess.</p>"
    )
    paths = write_report(
        charts, out_dir, title=f"arrakis-ray report: {layout.run_id}", intro_html=intro, png=png
    )
    return RunReport(paths.html, list(paths.pngs), int(seq_id))
