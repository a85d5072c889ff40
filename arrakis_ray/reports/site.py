"""The report site of a store: ``arrakis-ray site STORE --out DIR``.

An offline multi-page HTML site, every number drawn from SQL over the store:

- ``index.html``: the runs (model, tokens, when, which tools have results), the
  experiments of the bench, the sweeps, and a link to every page;
- ``runs/<run>/index.html``: the run's report (``run_report``'s charts);
- ``runs/<run>/tools/<tool>.html``: a tool's charts, a preview of each of its result
  tables, and the SQL behind them, to rerun with ``arrakis-ray sql``;
- ``runs/<run>/features/``: feature pages of the run's top neurons (``feature_pages``);
- ``compare.html``: the runs' shared results side by side (``comparison``);
- ``experiments/<name>.html``: what the bench recorded (``experiment_pages``).
- ``sweeps/<sweep_id>.html``: a sweep's points, parameters, timings and schedules
  (``sweep_pages``).

The Vega JavaScript is written once, ``assets/vega-bundle.js``, and every page loads it
by a relative URL: the site can be copied anywhere and opened without a network. Which
tools a run has results of is read from its manifest (the ``runs`` view), so building
the index scans no result table.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arrakis_ray.errors import ConfigError, ReportError, StoreError
from arrakis_ray.reports.comparison import COMPARISON_PATH, comparison_page
from arrakis_ray.reports.experiment_pages import experiment_pages, experiments_table
from arrakis_ray.reports.feature_pages import feature_pages, features_index_path
from arrakis_ray.reports.site_pages import (
    BUNDLE_PATH,
    PREVIEW_ROWS,
    Page,
    QueryLog,
    anchor,
    link,
    nav,
    plural,
    queries_footer,
    safe_name,
    sql_block,
    sql_text,
    table_html,
)
from arrakis_ray.reports.sweep_pages import sweep_pages, sweeps_section
from arrakis_ray.store.location import is_remote, os_reason
from arrakis_ray.store.manifest import split_record_key

log = logging.getLogger(__name__)

RUNS = """
SELECT run_id, name, status, model, arch, n_sequences, n_tokens, created_at, manifest
FROM runs ORDER BY created_at, run_id
"""


@dataclass(frozen=True)
class SiteResult:
    """What :func:`build_site` wrote."""

    index: Path
    pages: list[Path]
    """Every HTML page, the index first."""
    queries: dict[Path, list[str]]
    """Page -> the SQL queries it was built from, in order."""


@dataclass(frozen=True)
class _Run:
    """A run of the site: its ``runs`` row and its tools' result views."""

    row: dict
    tools: dict[str, dict]
    """Tool -> its record in the manifest (params, outputs, rows, seconds)."""

    @property
    def run_id(self) -> str:
        return self.row["run_id"]

    @property
    def page(self) -> str:
        return run_page_path(self.run_id)

    def views(self, tool: str | None = None) -> set[str]:
        """The result views of one tool, or of all."""
        tools = [tool] if tool else list(self.tools)
        return {result_view(o) for t in tools for o in self.tools[t].get("outputs", ())}


def run_page_path(run_id: str) -> str:
    return f"runs/{safe_name(run_id)}/index.html"


def tool_page_path(run_id: str, tool: str) -> str:
    return f"runs/{safe_name(run_id)}/tools/{safe_name(tool)}.html"


def result_view(output: str) -> str:
    """The SQL view of a tool output (as the catalog names it)."""
    return "results_" + re.sub(r"[^A-Za-z0-9_]", "_", output)


def build_site(
    store: str | Path,
    out_dir: str | Path,
    *,
    runs: Sequence[str] | None = None,
    top_features: int = 8,
) -> SiteResult:
    """Write the store's site under ``out_dir`` (``index.html`` and the pages it links).

    ``runs``: the runs to include (ids or unique prefixes; default every run);
    ``top_features``: feature pages per (family, layer) of a run with neuron dashboard
    results, the neurons with the largest activation (0: none).
    """
    from arrakis_ray.reports.run_report import check_out_dir
    from arrakis_ray.store.catalog import Store

    if isinstance(top_features, bool) or not isinstance(top_features, int) or top_features < 0:
        raise ConfigError(f"top_features must be an integer >= 0, got {top_features!r}")
    out = Path(out_dir).expanduser().absolute()
    check_out_dir(out, what="site")
    # the runs' own calls, as in the run report: a sweep's settings of a tool would be
    # overlaid in every chart (the sweep pages read only the sweeps' own records)
    with Store(store, variants=False) as db:
        check_outside_store_data(out, db.root)
        store_text = str(db.root)
        listed = db.sql(RUNS)
        site_runs = [_run_of(row) for row in listed.iter_rows(named=True)]
        site_runs = _select(site_runs, runs, store_text)
        pages: list[Page] = []
        seq_ids = {}
        for run in site_runs:
            seq_ids[run.run_id] = _first_sequence(db, run)
            trail = [("index", "index.html"), (f"run {run.run_id}", run.page)]
            features = feature_pages(
                db, run.run_id, top=top_features, store=store_text, trail=trail
            )
            tools = [_tool_page(db, run, t, seq_ids[run.run_id], store_text) for t in run.tools]
            pages.append(_run_page(db, run, seq_ids[run.run_id], tools, features, store_text))
            pages += tools + features
        ids = [r.run_id for r in site_runs]
        outputs = {r.run_id: r.views() for r in site_runs}
        compared = comparison_page(db, ids, outputs, store=store_text, seq_ids=seq_ids)
        if compared is not None:
            pages.append(compared)
        run_pages = {r.run_id: r.page for r in site_runs}
        pages += experiment_pages(db, store=store_text, run_pages=run_pages)
        pages += sweep_pages(db, store=store_text, run_pages=run_pages)
        index = _index_page(db, site_runs, pages, compared is not None, store_text)
    return _write(out, [index, *pages])


STORE_DATA_DIRS = (
    "runs",
    "experiments",
    "sweeps",
    "schedules",
)  # what `verify` checks, and pages must not join


def check_outside_store_data(out: Path, store_root) -> None:
    """ReportError if the site would be written into the store's data: ``out`` is the
    store root (its pages would land in ``runs/`` and ``experiments/``) or lies in
    either of those, where ``verify`` reports every page as a stray. Paths are compared
    resolved (symbolic links followed) and, for what names hide (a bind mount, a
    case-blind disk), by identity. A site beside the data (``STORE/site``, the demo's)
    is fine. A store on an object store shares nothing with a local directory."""
    if is_remote(store_root):
        return
    root = Path(store_root).resolve()
    target = out.resolve()
    if _same_dir(target, root):
        raise ReportError(
            f"cannot write the site to {out}: it is the store {root}; write it beside the "
            f"data, e.g. {root / 'site'}"
        )
    for name in STORE_DATA_DIRS:
        data = root / name
        if any(_same_dir(p, data) for p in (target, *target.parents)):
            raise ReportError(
                f"cannot write the site to {out}: it is inside the store's {name}/ "
                f"({data}), where its pages would be strays; write it elsewhere, e.g. "
                f"{root / 'site'}"
            )


def _same_dir(path: Path, other: Path) -> bool:
    """``path`` is ``other`` by resolved name or, both existing, by identity."""
    return path == other or (path.exists() and other.exists() and path.samefile(other))


def _run_of(row: dict) -> _Run:
    try:
        results = json.loads(row["manifest"])["results"] if row["manifest"] else {}
    except (ValueError, KeyError, TypeError):
        results = {}  # the catalog already warned of an unreadable manifest
    # a tool variant's record (``<tool>.<variant>``, a sweep's setting) has no rows in a
    # Store opened with variants=False: the run's pages show its own calls only
    own = {k: v for k, v in results.items() if split_record_key(k)[1] is None}
    return _Run({k: v for k, v in row.items() if k != "manifest"}, dict(sorted(own.items())))


def _select(runs: list[_Run], wanted: Sequence[str] | None, store: str) -> list[_Run]:
    """The runs named by id or unique prefix, in store order; all when none named."""
    if wanted is None:
        return runs
    chosen: dict[str, _Run] = {}
    for name in wanted:
        found = [r for r in runs if r.run_id == name] or [
            r for r in runs if r.run_id.startswith(str(name))
        ]
        if len(found) != 1:
            known = ", ".join(r.run_id for r in runs) or "none"
            what = "matches several runs of" if found else "is not a run of"
            raise StoreError(f"run {name!r} {what} the store {store} (runs: {known})")
        chosen[found[0].run_id] = found[0]
    return [r for r in runs if r.run_id in chosen]


def _first_sequence(db, run: _Run) -> int | None:
    from arrakis_ray.reports.run_report import first_sequence

    return first_sequence(db, run.run_id) if "results_logit_lens" in run.views() else None


def _run_page(db, run: _Run, seq_id, tools: list[Page], features: list[Page], store: str):
    """The run's report, with links to its tool and feature pages."""
    import polars as pl

    from arrakis_ray.reports.html import ChartBlock
    from arrakis_ray.reports.run_report import report_charts, report_intro

    q = QueryLog(db)
    title = f"Run {run.run_id}" + (f": {run.row['name']}" if run.row.get("name") else "")
    page = Page(run.page, title, queries=q.queries)
    facts = {k: run.row[k] for k in ("name", "status", "model", "arch", "n_sequences")}
    facts |= {k: run.row[k] for k in ("n_tokens", "created_at")}
    page.blocks += [
        nav(run.page, [("index", "index.html")]),
        table_html(pl.DataFrame([facts])),
        "<h2>Tool results</h2>",
        _tool_list(run, run.page),
    ]
    if features:
        page.blocks.append(
            "<p>" + anchor(run.page, features[0].path, "Feature pages of the top neurons") + "</p>"
        )
    if seq_id is None:
        page.blocks.append(
            "<p>No logit-lens results: <code>arrakis-ray analyze "
            f"{html.escape(run.run_id)} --store {html.escape(store)} --tool logit_lens</code> "
            "adds the report's first charts.</p>"
        )
    page.blocks.append(report_intro(run.run_id))
    for chart in report_charts(q, run.run_id, seq_id):
        page.blocks.append(
            ChartBlock(chart.title, chart.chart, after_html=sql_block(chart.sql, store))
        )
    return page


def _tool_list(run: _Run, from_page: str) -> str:
    if not run.tools:
        return "<p>No tool has run on this run yet.</p>"
    items = []
    for tool, record in run.tools.items():
        views = ", ".join(f"<code>{html.escape(v)}</code>" for v in sorted(run.views(tool)))
        rows, seconds = (html.escape(str(record.get(k))) for k in ("rows", "seconds"))
        items.append(
            f"<li>{anchor(from_page, tool_page_path(run.run_id, tool), tool)}: {views} "
            f'<span class="muted">({rows} rows, {seconds} s)</span></li>'
        )
    return "<ul>" + "".join(items) + "</ul>"


def _tool_page(db, run: _Run, tool: str, seq_id, store: str) -> Page:
    """A tool's charts, a preview of each result table, and the SQL of both."""
    from arrakis_ray.reports.html import ChartBlock
    from arrakis_ray.reports.run_report import report_charts, report_sections

    q = QueryLog(db)
    path = tool_page_path(run.run_id, tool)
    record = run.tools[tool]
    page = Page(path, f"{tool} on run {run.run_id}", queries=q.queries)
    params = json.dumps(record.get("params", {}), sort_keys=True, default=str)
    page.blocks += [
        nav(path, [("index", "index.html"), (f"run {run.run_id}", run.page)]),
        f"<p>Parameters: <code>{html.escape(params)}</code>. Last call finished "
        f"{html.escape(str(record.get('finished_at')))} in "
        f"{html.escape(str(record.get('seconds')))} s.</p>",
    ]
    views = set(db.views())
    sections = report_sections()
    for view in sorted(run.views(tool)):
        page.blocks.append(f"<h2><code>{html.escape(view)}</code></h2>")
        if view not in views:
            page.blocks.append("<p>No rows in the store.</p>")
            continue
        mine = [s for s in sections if s.view == view]
        for chart in report_charts(q, run.run_id, seq_id, sections=mine):
            page.blocks.append(
                ChartBlock(chart.title, chart.chart, after_html=sql_block(chart.sql, store))
            )
        count = q.sql(f"SELECT count(*) AS n FROM {view} WHERE run_id = {sql_text(run.run_id)}")
        preview_sql = (
            f"SELECT * FROM {view}\nWHERE run_id = {sql_text(run.run_id)}\nLIMIT {PREVIEW_ROWS}"
        )
        preview = q.sql(preview_sql)
        page.blocks += [
            f"<p>{plural(int(count['n'][0]), 'row')}; the first {len(preview)}:</p>",
            table_html(preview),
            sql_block(preview_sql, store),
        ]
    return page


def _index_page(db, runs: list[_Run], pages: list[Page], compared: bool, store: str) -> Page:
    import polars as pl

    q = QueryLog(db)
    q.queries.append(RUNS.strip())  # run by build_site: the runs table comes from it
    page = Page("index.html", "arrakis-ray site", queries=q.queries)
    page.blocks.append(
        f"<p>Store <code>{html.escape(store)}</code>: {plural(len(runs), 'run')}.</p>"
    )
    if runs:
        frame = pl.DataFrame(
            [
                {
                    **{k: r.row[k] for k in ("run_id", "name", "model", "arch", "n_sequences")},
                    "n_tokens": r.row["n_tokens"],
                    "created_at": r.row["created_at"],
                    "status": r.row["status"],
                    "tools": "",
                    "features": "",
                }
                for r in runs
            ]
        )
        by_id = {r.run_id: r for r in runs}
        featured = {p.path for p in pages}
        page.blocks += [
            "<h2>Runs</h2>",
            table_html(
                frame,
                links={"run_id": lambda row: link("index.html", run_page_path(row["run_id"]))},
                render={
                    "tools": lambda row: ", ".join(
                        anchor("index.html", tool_page_path(row["run_id"], t), t)
                        for t in by_id[row["run_id"]].tools
                    ),
                    "features": lambda row: (
                        anchor("index.html", features_index_path(row["run_id"]), "features")
                        if features_index_path(row["run_id"]) in featured
                        else ""
                    ),
                },
            ),
            sql_block(RUNS.replace(", manifest", ""), store),
        ]
    if compared:
        page.blocks.append(
            f"<p>{anchor('index.html', COMPARISON_PATH, 'Compare the runs')}: their shared "
            "results side by side.</p>"
        )
    experiments, queries = experiments_table(db, "index.html", store)
    page.blocks.append(experiments)
    q.queries += queries
    sweeps, queries = sweeps_section(db, "index.html", store)  # "" without sweeps
    page.blocks.append(sweeps)
    q.queries += queries
    listing = "".join(f"<li>{anchor('index.html', p.path, p.title)}</li>" for p in pages)
    page.blocks.append(
        f"<details><summary>Every page of this site ({len(pages) + 1})</summary>"
        f"<ul>{listing}</ul></details>"
    )
    return page


def _write(out: Path, pages: list[Page]) -> SiteResult:
    """Write the bundle and every page; a write the checks could not foresee (a full
    disk) is one ReportError."""
    from arrakis_ray.reports.html import write_bundle, write_page

    written: list[Path] = []
    queries: dict[Path, list[str]] = {}
    try:
        write_bundle(out / BUNDLE_PATH)
        for page in pages:
            path = write_page(
                out / page.path,
                title=page.title,
                blocks=[*page.blocks, queries_footer(page.queries)],
                bundle_src=link(page.path, BUNDLE_PATH),
            )
            written.append(path)
            queries[path] = list(page.queries)
    except OSError as e:
        where = Path(e.filename) if e.filename else out
        raise ReportError(f"cannot write the site to {where}: {os_reason(where, e)}") from None
    log.info("wrote site %s: %d pages", out, len(written))
    return SiteResult(written[0], written, queries)
