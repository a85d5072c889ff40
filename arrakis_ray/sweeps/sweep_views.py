"""The SQL views of a store's sweep and schedule records (``sweeps/records.py``).

- ``sweep_run_events``: every event of every sweep's points, as recorded;
- ``sweep_runs``: one row per (sweep_id, point), its latest event's state, with the
  point's parameters as the STRUCT ``params`` (fields named by their dotted config path:
  ``params['harvest.batch_size']``) and its tools' variants as the MAP ``variants``
  (tool -> variant: ``r.variant = s.variants['sae_features']`` joins its results);
- ``sweeps``: one row per sweep id, with the count of its points in each state;
- ``schedules``, ``schedule_firing_events``, ``schedule_firings`` (one row per
  (schedule, fire_time): its state, and how many events were recorded). A firing's
  state ranks its events, not their times: one submitted (or "already submitted") is
  submitted, else one that failed is failed, else it is skipped; the latest event of
  that rank is shown. A skip recorded late by a slower scheduler never hides a job.

The type of each ``params`` field is read from that field's values over every sweep
of the store (``param_types``): BOOLEAN, BIGINT, DOUBLE (integers and floats mixed),
VARCHAR, or a list of one of those; a field whose values mix kinds (``k: 32`` in one
sweep, ``k: auto`` in another) is JSON for every sweep, and only that field: the other
fields keep their types, and a JSON number still compares as one once cast
(``params.k::DOUBLE``, NULL-safe with ``TRY_CAST``).

The records are small JSON files, read in Python and handed to DuckDB as one JSON text
per table (``from_json``): inserting them row by row took a millisecond a row, and an
Arrow table built from Python objects imports pandas (``catalog._create_runs``).
"""

from __future__ import annotations

import json
from typing import Any

from arrakis_ray.store.location import StorePath
from arrakis_ray.sweeps import records

_EVENTS = "sweep_run_events"
_FIRING_EVENTS = "schedule_firing_events"

SWEEP_COLUMNS = (
    ("sweep_id", "VARCHAR"),
    ("name", "VARCHAR"),
    ("source", "VARCHAR"),
    ("method", "VARCHAR"),
    ("spec", "VARCHAR"),
    ("n_points", "BIGINT"),
    ("created_at", "TIMESTAMP"),
)
SCHEDULE_COLUMNS = (
    ("name", "VARCHAR"),
    ("sweep", "VARCHAR"),
    ("sweep_text", "VARCHAR"),
    ("cron", "VARCHAR"),
    ("store", "VARCHAR"),
    ("address", "VARCHAR"),
    ("catch_up", "VARCHAR"),
    ("timezone", "VARCHAR"),
    ("created_at", "TIMESTAMP"),
    ("sweep_id", "VARCHAR"),
    ("snapshot", "VARCHAR"),
)
FIRING_EVENT_COLUMNS = (
    ("schedule", "VARCHAR"),
    ("fire_time", "TIMESTAMP"),
    ("status", "VARCHAR"),
    ("submission_id", "VARCHAR"),
    ("sweep_id", "VARCHAR"),
    ("error", "VARCHAR"),
    ("recorded_at", "TIMESTAMP"),
    ("host", "VARCHAR"),
    ("pid", "BIGINT"),
    ("event_file", "VARCHAR"),
)


def event_columns(params: dict[str, str] | None) -> tuple:
    """The columns of ``sweep_run_events``; ``params``: field -> SQL type of the STRUCT
    (None: no sweep sets a parameter, and the column is JSON)."""
    return (
        ("sweep", "VARCHAR"),
        ("sweep_id", "VARCHAR"),
        ("point", "BIGINT"),
        ("point_key", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("status", "VARCHAR"),
        ("attempt", "BIGINT"),
        ("error", "VARCHAR"),
        ("seconds", "DOUBLE"),
        ("recorded_at", "TIMESTAMP"),
        ("host", "VARCHAR"),
        ("pid", "BIGINT"),
        ("params", params or "JSON"),
        ("variants", "MAP(VARCHAR, VARCHAR)"),
        ("event_file", "VARCHAR"),
    )


# the latest event of a point is its state; a file name breaks a tie of times
SWEEP_RUNS_SQL = f"""
SELECT sweep, sweep_id, point, point_key, run_id, status, attempt, error, seconds,
       CASE WHEN status IN ('running', 'complete', 'failed') THEN last_start END AS started_at,
       CASE WHEN status NOT IN ('pending', 'running') THEN recorded_at END AS finished_at,
       recorded_at AS updated_at, host, pid, n_events, params, variants
FROM (
    SELECT *,
           row_number() OVER (PARTITION BY sweep_id, point
                              ORDER BY recorded_at DESC, event_file DESC) AS rank,
           count(*) OVER (PARTITION BY sweep_id, point) AS n_events,
           max(CASE WHEN status = 'running' THEN recorded_at END)
               OVER (PARTITION BY sweep_id, point) AS last_start
    FROM {_EVENTS}
)
WHERE rank = 1
"""

# a sweep whose record is unreadable still has a row (from its events); points without
# an event yet are pending
SWEEPS_SQL = """
WITH counts AS (
    SELECT sweep_id, arg_max(sweep, updated_at) AS sweep, count(*) AS n_seen,
           count(*) FILTER (WHERE status = 'complete') AS n_complete,
           count(*) FILTER (WHERE status = 'skipped') AS n_skipped,
           count(*) FILTER (WHERE status = 'duplicate') AS n_duplicate,
           count(*) FILTER (WHERE status = 'running') AS n_running,
           count(*) FILTER (WHERE status = 'failed') AS n_failed,
           count(*) FILTER (WHERE status = 'pending') AS n_pending,
           max(updated_at) AS last_event_at
    FROM sweep_runs
    GROUP BY sweep_id
)
SELECT coalesce(r.sweep_id, c.sweep_id) AS sweep_id, coalesce(r.name, c.sweep) AS name,
       r.source, r.method, r.n_points, r.created_at,
       coalesce(c.n_complete, 0) AS n_complete,
       coalesce(c.n_skipped, 0) AS n_skipped,
       coalesce(c.n_duplicate, 0) AS n_duplicate,
       coalesce(c.n_running, 0) AS n_running,
       coalesce(c.n_failed, 0) AS n_failed,
       coalesce(c.n_pending, 0)
           + greatest(coalesce(r.n_points, 0) - coalesce(c.n_seen, 0), 0) AS n_pending,
       c.last_event_at, r.spec
FROM "_sweep_records" r FULL OUTER JOIN counts c ON r.sweep_id = c.sweep_id
"""

# a firing's state ranks its events: a submission beats a failure beats a skip (two
# schedulers: the slower one's late skip must not hide the other's job); then the latest
SCHEDULE_FIRINGS_SQL = f"""
SELECT schedule, fire_time, status, submission_id, sweep_id, error,
       recorded_at AS updated_at, host, pid, n_attempts
FROM (
    SELECT *,
           row_number() OVER (PARTITION BY schedule, fire_time
                              ORDER BY CASE status WHEN 'submitted' THEN 0
                                                   WHEN 'already submitted' THEN 0
                                                   WHEN 'failed' THEN 1 ELSE 2 END,
                                       recorded_at DESC, event_file DESC) AS rank,
           count(*) OVER (PARTITION BY schedule, fire_time) AS n_attempts
    FROM {_FIRING_EVENTS}
)
WHERE rank = 1
"""

VIEWS = ("sweeps", "sweep_runs", _EVENTS, "schedules", "schedule_firings", _FIRING_EVENTS)


def load_views(con, root: StorePath) -> list[str]:
    """Read the store's sweep and schedule records and create their views on ``con``;
    the names of the views (those of ``VIEWS``)."""
    sweeps = [_row(r, SWEEP_COLUMNS) for r in records.read_sweeps(root)]
    _load(con, "_sweep_records", SWEEP_COLUMNS, sweeps)
    events = records.read_run_events(root)
    fields = param_types([e.params for _f, e in events])
    canonical = {name.lower(): name for name in fields}
    rows = []
    for file, event in events:
        row = _row(event, event_columns(fields), sweep=event.sweep_name, event_file=file)
        row["params"] = {canonical[k.lower()]: v for k, v in event.params.items()}
        rows.append(row)
    _load(con, _EVENTS, event_columns(fields), rows)
    schedules = [_row(r, SCHEDULE_COLUMNS) for r in records.read_schedules(root)]
    _load(con, "schedules", SCHEDULE_COLUMNS, schedules)
    firings = [
        _row(e, FIRING_EVENT_COLUMNS, event_file=f) for f, e in records.read_firing_events(root)
    ]
    _load(con, _FIRING_EVENTS, FIRING_EVENT_COLUMNS, firings)
    con.execute(f"CREATE OR REPLACE VIEW sweep_runs AS {SWEEP_RUNS_SQL}")
    con.execute(f"CREATE OR REPLACE VIEW sweeps AS {SWEEPS_SQL}")
    con.execute(f"CREATE OR REPLACE VIEW schedule_firings AS {SCHEDULE_FIRINGS_SQL}")
    return list(VIEWS)


def param_types(all_params: list[dict[str, Any]]) -> dict[str, str]:
    """Dotted parameter name -> the SQL type of its values, over every sweep's events.

    Each field is typed on its own values: BOOLEAN, BIGINT, DOUBLE (integers and floats
    mixed), VARCHAR, or a list of one of those; anything else (objects, mixed kinds such
    as 32 and "auto") is JSON text, for that field only. Names differing only in case
    are one field (DuckDB's names are case-insensitive), spelt as first seen.
    """
    values: dict[str, list] = {}
    spelling: dict[str, str] = {}
    for params in all_params:
        for name, value in params.items():
            key = spelling.setdefault(name.lower(), name)
            values.setdefault(key, []).append(value)
    return {name: _sql_type(found) for name, found in values.items()}


def _sql_type(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "JSON"
    if all(isinstance(v, bool) for v in values):
        return "BOOLEAN"
    if all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63 for v in values):
        return "BIGINT"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "DOUBLE"
    if all(isinstance(v, str) for v in values):
        return "VARCHAR"
    if all(isinstance(v, list) for v in values):
        items = [item for v in values for item in v]
        inner = _sql_type(items) if items else "VARCHAR"
        return "JSON" if inner == "JSON" else f"{inner}[]"
    return "JSON"


def _row(record: Any, columns: tuple, **extra: Any) -> dict[str, Any]:
    """A record's values for ``columns`` (times as DuckDB reads a TIMESTAMP, UTC)."""
    row = {}
    for name, sql_type in columns:
        value = extra[name] if name in extra else getattr(record, _field(name), None)
        if sql_type == "TIMESTAMP" and value is not None:
            value = value.removesuffix("Z").replace("T", " ")
        row[name] = value
    return row


def _field(column: str) -> str:
    return "at" if column == "recorded_at" else column


def _load(con, table: str, columns: tuple, rows: list[dict[str, Any]]) -> None:
    """Create ``table`` with ``columns`` and insert ``rows`` in one statement."""
    con.execute(f'CREATE OR REPLACE TABLE "{table}" ({_sql_columns(columns)})')
    if not rows:
        return
    structure = {name: _structure(sql_type) for name, sql_type in columns}
    # each row a STRUCT; unnest(r) makes its fields the columns, in the table's order
    con.execute(
        f'INSERT INTO "{table}" SELECT unnest(r) FROM (SELECT unnest(from_json(?, ?)) AS r)',
        [json.dumps(rows, allow_nan=False), json.dumps([structure])],
    )


def _sql_columns(columns: tuple) -> str:
    return ", ".join(f"{_ident(name)} {_sql(sql_type)}" for name, sql_type in columns)


def _sql(sql_type: str | dict) -> str:
    if isinstance(sql_type, str):
        return sql_type
    return "STRUCT(" + ", ".join(f"{_ident(n)} {t}" for n, t in sql_type.items()) + ")"


def _structure(sql_type: str | dict) -> Any:
    return sql_type if isinstance(sql_type, str) else dict(sql_type)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
