"""Sweep pages of the report site: one page per sweep, and the index's sweeps section.

Read from the views of the sweep records (``arrakis_ray/sweeps/records.py``): ``sweeps``
(one row per sweep, its points counted by status), ``sweep_runs`` (one row per point:
its latest state, its parameters as the STRUCT ``params``), ``schedules`` and
``schedule_firings``. A sweep's page shows what it is (name, id, source, method, the
spec), its points counted by status, a table of its points with each parameter the
sweep sets as its own column (the struct's fields that are not null for this sweep;
the others belong to other sweeps of the store), the seconds of each point, and the
schedules that run it with their recent firings. Every table's SQL is on the page.

A schedule runs a sweep when one of its firings submitted that sweep id, or when it
was added with that sweep id (``schedules.sweep_id``: a schedule that has not fired
yet). File paths are not compared: a schedule added on a laptop names the laptop's
path, the sweep's record the path its job read.
"""

from __future__ import annotations

import html
import json
import logging

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

MAX_POINTS = 1000  # points listed and charted per sweep page (a grid may have 100,000)
MAX_FIRINGS = 20  # recent firings listed per sweep page
# the colour of each point status on the charts (records.RUN_STATUSES)
STATUS_COLOURS = {
    "complete": "#2e7d32",
    "skipped": "#81c784",
    "duplicate": "#8e24aa",
    "running": "#1e88e5",
    "pending": "#9e9e9e",
    "failed": "#d32f2f",
}
POINT_COLUMNS = ("status", "attempt", "seconds", "error", "run_id", "variants")

SWEEP_LIST = """
SELECT sweep_id, name, method, n_points, n_complete, n_skipped, n_duplicate, n_running,
       n_failed, n_pending, created_at, last_event_at
FROM sweeps ORDER BY created_at DESC NULLS LAST, sweep_id
"""

# the sweep a schedule runs: the one its latest firing submitted, else the one it was
# added with
SCHEDULE_LIST = """
SELECT s.name AS schedule, s.cron, s.catch_up, s.sweep AS sweep_file,
       coalesce(arg_max(f.sweep_id, f.fire_time) FILTER (WHERE f.sweep_id IS NOT NULL),
                s.sweep_id) AS sweep_id,
       count(DISTINCT f.fire_time) AS firings, max(f.fire_time) AS last_fire_time,
       arg_max(f.status, f.fire_time) AS last_status
FROM schedules s
LEFT JOIN schedule_firings f ON f.schedule = s.name
GROUP BY s.name, s.cron, s.catch_up, s.sweep, s.sweep_id ORDER BY s.name
"""

SWEEP = """
SELECT sweep_id, name, source, method, n_points, created_at, last_event_at, spec,
       n_complete, n_skipped, n_duplicate, n_running, n_failed, n_pending
FROM sweeps WHERE sweep_id = {sweep_id}
"""

# how many points of the sweep set each parameter: the sweep's own are not all null
PARAM_COUNTS = """
SELECT {counts}
FROM sweep_runs WHERE sweep_id = {sweep_id}
"""

POINTS = """
SELECT point,{params}
       status, attempt, seconds, error, run_id, variants
FROM sweep_runs WHERE sweep_id = {sweep_id}
ORDER BY point
LIMIT {limit}
"""

MINE = """
WITH mine AS (
    SELECT name FROM schedules WHERE sweep_id = {sweep_id}
    UNION SELECT schedule FROM schedule_firings WHERE sweep_id = {sweep_id}
)"""

SCHEDULES = (
    MINE
    + """
SELECT name, cron, catch_up, address, sweep AS sweep_file, created_at
FROM schedules WHERE name IN (SELECT name FROM mine) ORDER BY name
"""
)

FIRINGS = (
    MINE
    + """
SELECT schedule, fire_time, status, submission_id, n_attempts, error, updated_at
FROM schedule_firings
WHERE sweep_id = {sweep_id} OR (sweep_id IS NULL AND schedule IN (SELECT name FROM mine))
ORDER BY fire_time DESC, schedule
LIMIT {limit}
"""
)


def sweep_page_path(sweep_id: str) -> str:
    return f"sweeps/{safe_name(sweep_id)}.html"


def has_sweeps(db) -> bool:
    return {"sweeps", "sweep_runs", "schedules", "schedule_firings"} <= set(db.views())


def sweeps_section(db, from_page: str, store: str) -> tuple[str, list[str]]:
    """The index's sweeps section (HTML: the sweeps with their counts, linked to their
    pages, then the schedules) and the queries it ran; "" when there is neither."""
    if not has_sweeps(db):
        return "", []
    q = QueryLog(db)
    parts = []
    listed = q.sql(SWEEP_LIST)
    if not listed.is_empty():
        parts += [
            "<h2>Sweeps</h2>",
            table_html(
                listed,
                links={
                    "sweep_id": lambda r: link(from_page, sweep_page_path(r["sweep_id"])),
                    "name": lambda r: link(from_page, sweep_page_path(r["sweep_id"])),
                },
            ),
            sql_block(SWEEP_LIST, store),
        ]
    schedules = q.sql(SCHEDULE_LIST)
    if not schedules.is_empty():
        parts += [
            f"<h2>Schedules</h2><p>{plural(len(schedules), 'schedule')} on this store:</p>",
            table_html(schedules, links={"sweep_id": lambda r: _sweep_link(from_page, r)}),
            sql_block(SCHEDULE_LIST, store),
        ]
    return "".join(parts), q.queries


def _sweep_link(from_page: str, row: dict) -> str | None:
    sweep_id = row["sweep_id"]
    return None if sweep_id is None else link(from_page, sweep_page_path(sweep_id))


def sweep_pages(db, *, store: str, run_pages: dict[str, str]) -> list[Page]:
    """One page per sweep of the store; ``run_pages``: run id -> its page in the site,
    for the points whose run has one."""
    if not has_sweeps(db):
        return []
    params = db.sql("SELECT params FROM sweep_runs LIMIT 0").schema["params"]
    # a STRUCT once any sweep sets a parameter; JSON text (no fields) before that
    fields = [f.name for f in getattr(params, "fields", ())]
    ids = db.sql("SELECT sweep_id FROM sweeps ORDER BY sweep_id")["sweep_id"].to_list()
    pages = [_sweep_page(db, sweep_id, fields, store, run_pages) for sweep_id in ids]
    log.info("sweep pages: %d", len(pages))
    return pages


def _sweep_page(db, sweep_id: str, fields: list[str], store: str, run_pages) -> Page:
    import polars as pl

    q = QueryLog(db)
    path = sweep_page_path(sweep_id)
    key = sql_text(sweep_id)
    about_sql = SWEEP.format(sweep_id=key)
    about = q.sql(about_sql).row(0, named=True)
    page = Page(path, f"Sweep {about['name']} ({sweep_id})", queries=q.queries)
    counts = {k: about[k] for k in about if k.startswith("n_")}
    facts = {k: about[k] for k in ("sweep_id", "name", "source", "method", "created_at")}
    facts["last_event_at"] = about["last_event_at"]
    page.blocks += [
        nav(path, [("index", "index.html")]),
        table_html(pl.DataFrame([facts])),
        "<h2>Points by status</h2>",
        table_html(pl.DataFrame([counts])),
        sql_block(about_sql, store),
        _spec_block(about["spec"]),
    ]
    own = _own_params(q, key, fields)
    points_sql = POINTS.format(params=_param_columns(own), sweep_id=key, limit=MAX_POINTS)
    points = q.sql(points_sql)
    shown = "" if len(points) < MAX_POINTS else f", the first {MAX_POINTS}"
    unseen = (about["n_points"] or 0) - len(points) if not shown else 0
    if unseen > 0:  # planned by the sweep, never recorded: the sweeps view counts them pending
        shown += f"; {plural(unseen, 'other point')} without an event yet, pending"
    page.blocks += [
        f"<h2>Points ({len(points)}{shown})</h2>",
        "<p>Each point's latest state; a parameter column per dotted config path the "
        "sweep sets. <code>run_id</code> is the harvest the point reads (points that "
        "differ only in tool parameters share it); <code>variants</code> names the tool "
        "records of its settings (<code>results_&lt;output&gt;.variant</code>).</p>",
        table_html(
            points,
            links={"run_id": lambda r: _run_link(path, r["run_id"], run_pages)},
        ),
        sql_block(points_sql, store),
    ]
    page.blocks.append(_seconds_chart(points, own))
    page.blocks += _schedules(q, key, store)
    return page


def _own_params(q: QueryLog, key: str, fields: list[str]) -> list[tuple[str, str]]:
    """(field, column name) of the parameters this sweep sets, in the struct's order."""
    if not fields:
        return []
    counts = ", ".join(f"count(params.{_ident(f)}) AS {_ident(f)}" for f in fields)
    found = q.sql(PARAM_COUNTS.format(counts=counts, sweep_id=key)).row(0, named=True)
    taken = {"point", *POINT_COLUMNS}  # a parameter named like a column keeps its path
    return [(f, f"params.{f}" if f in taken else f) for f in fields if found[f]]


def _param_columns(own: list[tuple[str, str]]) -> str:
    return "".join(f"\n       params.{_ident(f)} AS {_ident(name)}," for f, name in own)


def _ident(name: str) -> str:
    """A SQL identifier of ``name`` (quoted: parameter paths have dots)."""
    return '"' + name.replace('"', '""') + '"'


def _run_link(from_page: str, run_id, run_pages: dict[str, str]) -> str | None:
    if run_id is None or run_id not in run_pages:
        return None
    return link(from_page, run_pages[run_id])


def _spec_block(spec) -> str:
    """The sweep's parsed spec (JSON text), indented; a note when it is unknown (the
    sweep's record could not be read, only its points' events)."""
    if spec is None:
        return "<p>The sweep's record is missing: its spec is unknown.</p>"
    try:
        text = json.dumps(json.loads(spec), indent=2, sort_keys=True)
    except ValueError:
        text = str(spec)
    return f"<h2>Spec</h2><pre><code>{html.escape(text)}</code></pre>"


def _seconds_chart(points, own: list[tuple[str, str]]):
    """The wall time of each point that ran, coloured by its status (the points
    table's rows with seconds: its query is the chart's)."""
    import altair as alt
    import polars as pl

    from arrakis_ray.reports.html import ChartBlock

    timed = points.filter(pl.col("seconds").is_not_null())
    heading = "Seconds per point"
    if timed.is_empty():
        return f"<h2>{heading}</h2><p>No point has run yet.</p>"
    # the parameters as one text, so that field names with dots stay out of Vega's paths
    settings = [
        pl.format("{}={}", pl.lit(name), _as_text(pl.col(name), timed.schema[name]))
        for _f, name in own
    ]
    frame = timed.select(
        "point",
        "status",
        "attempt",
        "seconds",
        parameters=pl.concat_str(settings, separator=", ") if settings else pl.lit(""),
    )
    chart = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("point:O", title="point", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("seconds:Q", title="wall time of the latest try (s)"),
            color=alt.Color(
                "status:N",
                scale=alt.Scale(domain=list(STATUS_COLOURS), range=list(STATUS_COLOURS.values())),
            ),
            tooltip=[
                "point:O",
                "status:N",
                "attempt:Q",
                alt.Tooltip("seconds:Q", format=".3g"),
                "parameters:N",
            ],
        )
        .properties(width=max(240, min(900, 14 * len(frame))), height=200)
    )
    note = "<p>The points above that have a wall time (the same query).</p>"
    return ChartBlock(heading, chart, after_html=note)


def _as_text(column, dtype):
    """A column as text for a tooltip (lists as JSON-like text)."""
    import polars as pl

    if isinstance(dtype, pl.List | pl.Array):
        return pl.lit("[") + column.cast(pl.List(pl.String)).list.join(", ") + pl.lit("]")
    return column.cast(pl.String)


def _schedules(q: QueryLog, key: str, store: str) -> list[str]:
    """The schedules that run this sweep and their recent firings ([] without any)."""
    schedules_sql = SCHEDULES.format(sweep_id=key)
    schedules = q.sql(schedules_sql)
    firings_sql = FIRINGS.format(sweep_id=key, limit=MAX_FIRINGS)
    firings = q.sql(firings_sql)
    if schedules.is_empty() and firings.is_empty():
        return []
    blocks = ["<h2>Schedules</h2>"]
    if schedules.is_empty():
        blocks.append("<p>The schedules that fired this sweep have been removed.</p>")
    else:
        blocks.append(table_html(schedules))
    blocks += [
        sql_block(schedules_sql, store),
        f"<h3>Recent firings ({len(firings)})</h3>",
        table_html(firings) if not firings.is_empty() else "<p>None yet.</p>",
        sql_block(firings_sql, store),
    ]
    return blocks
