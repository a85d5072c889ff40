"""Experiment pages: what the bench recorded (arrakis_ray.bench), one page per experiment.

Read from the store's views ``experiments`` (one row per version), ``experiment_calls``
(one row per call) and, when present, ``hypotheses`` (the statistics of
``test_hypothesis``). A page lists the experiment's versions with their source code, its
calls with their status and results, the hypothesis tests, and embeds the charts the
calls saved (``chart_file``: a Vega-Lite spec, a path relative to the store root). A
result stored as a table (``result_file``: Parquet) and the per-module table of a
``profile_model`` call (``profile_file``: Parquet) are previewed. A version's "last
result" is that of its last successful call (``last_ok_result_json``): a later failure
does not hide what the version last produced.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import PurePosixPath

from arrakis_ray.reports.site_pages import (
    Page,
    QueryLog,
    link,
    nav,
    plural,
    safe_name,
    sql_block,
    sql_text,
    table_html,
)

log = logging.getLogger(__name__)

MAX_CHARTS = 12  # charts embedded per experiment page: the most recent calls' ones
MAX_DETAILS = 20  # calls whose output and traceback are shown
PREVIEW_ROWS = 10  # rows of a stored result table shown
MAX_PREVIEWS = 5  # stored tables previewed per kind (results, profiles): the latest calls'
# a call's stored tables: column -> what the preview's heading calls it
STORED_TABLES = {"result_file": "Result", "profile_file": "Per-module profile"}

EXPERIMENT_LIST = """
SELECT name, count(*) AS versions, sum(n_calls) AS calls, sum(n_ok) AS ok,
       sum(n_error) AS errors, max(last_call) AS last_call,
       arg_max(last_status, last_call) AS last_status
FROM experiments GROUP BY name ORDER BY name
"""

VERSIONS = """
SELECT version, kind, model_arch, model_fingerprint, first_call, last_call, n_calls,
       n_ok, n_error, last_status, arguments, source, last_ok_result_json
FROM experiments WHERE name = {name} ORDER BY first_call, version
"""

CALLS = """
SELECT call_id, version, kind, started_at, wall_s, status, error, result_kind,
       result_json, result_file, profile_file, chart_file, run_id, host, stdout, traceback
FROM experiment_calls WHERE name = {name} ORDER BY started_at, call_id
"""

HYPOTHESES = """
SELECT version, call_id, label_a, label_b, n_a, n_b, mean_a, mean_b, difference,
       welch_t, welch_df, welch_p, permutation_p, n_permutations, ci_low, ci_high,
       ci_level, cohens_d, alpha, alternative, reject, verdict
FROM hypotheses WHERE name = {name} ORDER BY started_at, call_id
"""


def experiment_page_path(name: str) -> str:
    return f"experiments/{safe_name(name)}.html"


def has_experiments(db) -> bool:
    return {"experiments", "experiment_calls"} <= set(db.views())


def experiments_table(db, from_page: str, store: str) -> tuple[str, list[str]]:
    """The index's experiments section (HTML) and the queries it ran; "" without any."""
    if not has_experiments(db):
        return "", []
    q = QueryLog(db)
    listed = q.sql(EXPERIMENT_LIST)
    if listed.is_empty():
        return "", q.queries
    table = table_html(
        listed, links={"name": lambda r: link(from_page, experiment_page_path(r["name"]))}
    )
    return "<h2>Experiments</h2>" + table + sql_block(EXPERIMENT_LIST, store), q.queries


def experiment_pages(db, *, store: str, run_pages: dict[str, str]) -> list[Page]:
    """One page per experiment name; ``run_pages``: run id -> its page, for the calls
    that name a run."""
    if not has_experiments(db):
        return []
    names = db.sql("SELECT DISTINCT name FROM experiments ORDER BY name")["name"].to_list()
    return [_experiment_page(db, name, store, run_pages) for name in names]


def _experiment_page(db, name: str, store: str, run_pages: dict[str, str]) -> Page:
    from arrakis_ray.reports.html import ChartBlock

    q = QueryLog(db)
    path = experiment_page_path(name)
    page = Page(path, f"Experiment {name}", queries=q.queries)
    page.blocks.append(nav(path, [("index", "index.html")]))
    key = {"name": sql_text(name)}

    versions_sql = VERSIONS.format(**key)
    versions = q.sql(versions_sql)
    page.blocks += [
        f"<h2>Versions ({len(versions)})</h2>",
        "<p>A version is a hash of the function's source, its arguments and the "
        "model's fingerprint: the same code on the same model is the same version.</p>",
        table_html(versions.drop("arguments", "source", "last_ok_result_json")),
        sql_block(versions_sql, store),
    ]
    for v in versions.iter_rows(named=True):
        page.blocks += [
            f"<h3>Version <code>{html.escape(str(v['version']))}</code></h3>",
            f"<p>Arguments: <code>{html.escape(str(v['arguments']))}</code></p>",
            f"<pre><code>{html.escape(str(v['source'] or ''))}</code></pre>",
            _json_details("Last successful result", v["last_ok_result_json"]),
        ]

    calls_sql = CALLS.format(**key)
    calls = q.sql(calls_sql)
    shown = calls.drop("stdout", "traceback")
    page.blocks += [
        f"<h2>Calls ({len(calls)})</h2>",
        table_html(
            shown,
            links={"run_id": lambda r: _run_link(path, r["run_id"], run_pages)},
        ),
        sql_block(calls_sql, store),
    ]
    for call in calls.tail(MAX_DETAILS).iter_rows(named=True):
        for label in ("stdout", "traceback"):
            if call[label]:
                page.blocks.append(
                    f"<details><summary>{label} of call {html.escape(str(call['call_id']))}"
                    f"</summary><pre>{html.escape(str(call[label]))}</pre></details>"
                )
    for column, label in STORED_TABLES.items():
        stored = calls.filter(calls[column].is_not_null()).tail(MAX_PREVIEWS)
        for call in stored.iter_rows(named=True):
            page.blocks.append(_table_preview(db.root, call, column, label))

    if "hypotheses" in db.views():
        tests_sql = HYPOTHESES.format(**key)
        tests = q.sql(tests_sql)
        if not tests.is_empty():
            page.blocks += [
                "<h2>Hypothesis tests</h2>",
                "<p>Welch's t-test, a permutation test (its number of permutations "
                "stated), a bootstrap confidence interval of the difference of means, "
                "Cohen's d, and the verdict at the stated alpha.</p>",
                table_html(tests),
                sql_block(tests_sql, store),
            ]

    charted = calls.filter(calls["chart_file"].is_not_null()).unique(
        "chart_file", keep="last", maintain_order=True
    )
    for call in charted.tail(MAX_CHARTS).iter_rows(named=True):
        spec, problem = _read_spec(db.root, call["chart_file"])
        heading = f"Chart of call {call['call_id']} (version {call['version']})"
        if spec is None:
            page.blocks.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(problem)}</p>")
        else:
            page.blocks.append(ChartBlock(heading, spec))
    return page


def _run_link(from_page: str, run_id, run_pages: dict[str, str]) -> str | None:
    if run_id is None or run_id not in run_pages:
        return None
    return link(from_page, run_pages[run_id])


def _json_details(label: str, text) -> str:
    if text is None:
        return ""
    try:
        pretty = json.dumps(json.loads(text), indent=2)
    except (TypeError, ValueError):
        pretty = str(text)
    return f"<details><summary>{label}</summary><pre>{html.escape(pretty)}</pre></details>"


def _store_file(root, relative: str):
    """The store file at ``relative`` (a path the bench wrote, relative to the root);
    None for a path that would leave the store."""
    parts = PurePosixPath(str(relative)).parts
    if not parts or PurePosixPath(str(relative)).is_absolute() or ".." in parts:
        return None
    return root.joinpath(*parts)


def _read_spec(root, relative: str) -> tuple[dict | None, str]:
    """A saved chart's Vega-Lite spec, or (None, why not): a missing chart leaves a note
    on the page rather than failing the whole site."""
    path = _store_file(root, relative)
    if path is None:
        return None, f"chart file {relative!r} is not a path inside the store"
    try:
        spec = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        log.warning("experiment chart %s: %s", path, e)
        return None, f"chart file {relative} could not be read: {e}"
    if not isinstance(spec, dict):
        return None, f"chart file {relative} is not a Vega-Lite spec (a JSON object)"
    return spec, ""


def _table_preview(root, call: dict, column: str, label: str) -> str:
    """The first rows of a table a call stored (``call[column]``: a Parquet file in the
    store, by its path relative to the root)."""
    import polars as pl
    import pyarrow.parquet as pq

    relative = call[column]
    title = f"<h3>{html.escape(label)} of call {html.escape(str(call['call_id']))}</h3>"
    path = _store_file(root, relative)
    if path is None:
        return title + f"<p>{html.escape(repr(relative))} is not a path inside the store.</p>"
    try:
        with path.open("rb") as fh:
            parquet = pq.ParquetFile(fh)
            rows = parquet.metadata.num_rows
            head = next(parquet.iter_batches(batch_size=PREVIEW_ROWS), None)
            frame = pl.from_arrow(head) if head is not None else pl.DataFrame()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        log.warning("experiment result %s: %s", path, e)
        return (
            title + f"<p>{html.escape(str(relative))} could not be read: {html.escape(str(e))}</p>"
        )
    return (
        title + f"<p><code>{html.escape(str(relative))}</code>: {plural(rows, 'row')}, the first "
        f"{min(rows, PREVIEW_ROWS)} shown.</p>" + table_html(frame)
    )
