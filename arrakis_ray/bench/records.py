"""Experiment records in a store: append-only, one file per call, read as SQL views.

Layout (under the store root, beside ``runs/``)::

    experiments/calls/<name>/<call_id>.parquet        one row: schemas/experiment_call.v1.json
    experiments/hypotheses/<name>/<call_id>.parquet   one row: schemas/hypothesis.v1.json
    experiments/artifacts/<name>/<call_id>/...        result.parquet, chart.vl.json, profile.parquet

Every store opened for SQL reads the footer of every record file (about a millisecond
each): a store of many thousands of calls would want them compacted, which is not done
yet.

Why one file per call: every call is a new name (its UTC start time and random hex), so
two processes logging at once never write the same file, and nothing is ever read,
changed and written back. Each file appears whole (``store/atomic.py``: rename on a
disk, one upload on an object store). A version is not stored on its own: the
``experiments`` view groups the calls by (name, version), so a version logged twice, by
one process or two, is one row.

Views, built by :func:`create_views` on any DuckDB connection (the store's catalog, or
the bench's own small one for ``list_versions``):

- ``experiment_calls``: the call rows;
- ``experiments``: one row per (name, version): its source, arguments and model, first
  and last call, number of calls that succeeded and failed, the last call's status, and
  the last successful call's result and chart;
- ``hypotheses``: the hypothesis rows.

The file lists are read when the views are built: calls logged later are seen by a
connection opened later.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from arrakis_ray.errors import StoreError
from arrakis_ray.store.atomic import atomic_path
from arrakis_ray.store.location import StorePath, is_remote

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = "experiments"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")

# a (name, version)'s last call gives its status; its last successful call its result
# and chart: arg_max_null, since arg_max skips nulls and would take an older call's JSON
# when the last one returned a table
EXPERIMENTS_SQL = """
SELECT name, version,
       arg_min(kind, started_at) AS kind,
       arg_min(source, started_at) AS source,
       arg_min(arguments, started_at) AS arguments,
       arg_min(model_fingerprint, started_at) AS model_fingerprint,
       arg_min(model_arch, started_at) AS model_arch,
       min(started_at) AS first_call,
       max(started_at) AS last_call,
       count(*) AS n_calls,
       count(*) FILTER (WHERE status = 'ok') AS n_ok,
       count(*) FILTER (WHERE status = 'error') AS n_error,
       arg_max(status, started_at) AS last_status,
       arg_max_null(result_json, started_at) FILTER (WHERE status = 'ok') AS last_ok_result_json,
       arg_max_null(chart_file, started_at) FILTER (WHERE status = 'ok') AS last_ok_chart_file
FROM experiment_calls
GROUP BY name, version
"""

_SQL_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us"): "TIMESTAMP",
    pa.list_(pa.string()): "VARCHAR[]",
}


def check_name(name: str) -> str:
    """An experiment name as a directory name: what a Python function name can be."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"experiment name {name!r}: use letters, digits, '_', '.' or '-' (at most 128), "
            "starting with a letter or '_'"
        )
    return name


def call_schema() -> pa.Schema:
    from arrakis_ray.store.schemas import load_schema

    return load_schema("experiment_call", 1).arrow()


def hypothesis_schema() -> pa.Schema:
    from arrakis_ray.store.schemas import load_schema

    return load_schema("hypothesis", 1).arrow()


@dataclass(frozen=True)
class ExperimentFiles:
    """Where one call's files go."""

    root: StorePath
    name: str
    call_id: str

    @property
    def call(self) -> StorePath:
        return self.root / EXPERIMENTS_DIR / "calls" / self.name / f"{self.call_id}.parquet"

    @property
    def hypothesis(self) -> StorePath:
        return self.root / EXPERIMENTS_DIR / "hypotheses" / self.name / f"{self.call_id}.parquet"

    def artifact(self, file_name: str) -> tuple[StorePath, str]:
        """(path, path relative to the store root) of one of the call's artifacts."""
        relative = f"{EXPERIMENTS_DIR}/artifacts/{self.name}/{self.call_id}/{file_name}"
        return self.root / relative, relative


def write_row(path: StorePath, row: dict[str, Any], schema: pa.Schema) -> None:
    """Write one row as a new Parquet file, atomically. Missing nullable fields are null."""
    import pyarrow.parquet as pq

    missing = [f.name for f in schema if not f.nullable and row.get(f.name) is None]
    if missing:
        raise ValueError(f"experiment record without {', '.join(missing)}")
    table = pa.table({f.name: pa.array([row.get(f.name)], f.type) for f in schema}, schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_table(path: StorePath, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_bytes(path: StorePath, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_table(root: StorePath, relative: str) -> pa.Table:
    """An artifact table, by its path relative to the store root."""
    import pyarrow.parquet as pq

    from arrakis_ray.store.location import arrow_source

    path, filesystem = arrow_source(root / relative)
    try:
        return pq.read_table(path, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as e:
        raise StoreError(f"{root / relative}: cannot read this experiment result ({e})") from None


def record_files(root: StorePath, kind: str, schema: pa.Schema) -> tuple[list, set[str]]:
    """The record files of ``kind`` (calls or hypotheses) with ``schema``, and the columns
    they hold: complete files only, since a file being written has a hidden temp name.
    A file that cannot be read or holds another table is left out with a warning: one
    damaged record must not take the store's other views (its runs) down with it."""
    import pyarrow.parquet as pq

    from arrakis_ray.store.location import arrow_source

    base = root / EXPERIMENTS_DIR / kind
    if not base.is_dir():
        return [], set()
    found, columns = [], set()
    for path in sorted(base.glob("*/*.parquet"), key=str):
        if path.name.startswith("."):
            continue
        try:
            where, filesystem = arrow_source(path)
            file_schema = pq.read_schema(where, filesystem=filesystem)
            readable = _fits(file_schema, schema)
        except (OSError, pa.ArrowInvalid):
            readable = False
        if readable:
            found.append(path)
            columns.update(file_schema.names)
        else:
            log.warning("%s: not a readable %s record; left out of the views", path, kind)
    return found, columns


def _fits(found: pa.Schema, schema: pa.Schema) -> bool:
    """A record file fits when its columns are the schema's, with their types, and only
    nullable ones missing (a column added later: null in older records)."""
    for field in schema:
        index = found.get_field_index(field.name)
        if index < 0:
            if not field.nullable:
                return False
        elif not found.field(index).type.equals(field.type):
            return False
    return set(found.names) <= set(schema.names)


def create_views(con, root: StorePath, register: Callable[[str, list, pa.Schema], str]) -> None:
    """Create ``experiment_calls``, ``experiments`` and ``hypotheses`` on ``con``.

    ``register(name, files, schema)`` returns the SQL source of files on an object store
    (a registered pyarrow dataset); local files are read by ``read_parquet``. Without
    records the views exist, empty, with their columns.
    """
    for view, kind, schema in (
        ("experiment_calls", "calls", call_schema()),
        ("hypotheses", "hypotheses", hypothesis_schema()),
    ):
        files, present = record_files(root, kind, schema)
        if not files:
            body = _empty_select(schema)
        elif is_remote(root):  # the dataset fills a column a file lacks with nulls
            columns = ", ".join(f'"{f.name}"' for f in schema)
            body = f"SELECT {columns} FROM {register(view, files, schema)}"
        else:  # a column no file has (records older than it) is a typed null
            columns = ", ".join(
                f'"{f.name}"'
                if f.name in present
                else f'CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"'
                for f in schema
            )
            listed = ", ".join(_literal(str(f)) for f in files)
            # union_by_name: a record older than a nullable column reads it as null
            body = f"SELECT {columns} FROM read_parquet([{listed}], union_by_name = true)"
        con.execute(f'CREATE OR REPLACE VIEW "{view}" AS {body}')
    con.execute(f"CREATE OR REPLACE VIEW experiments AS {EXPERIMENTS_SQL}")


def _empty_select(schema: pa.Schema) -> str:
    casts = ", ".join(f'CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"' for f in schema)
    return f"SELECT {casts} WHERE false"


def _literal(text: str) -> str:
    import glob

    # read_parquet takes each path as a glob pattern: escape, as the catalog does
    return "'" + glob.escape(text).replace("'", "''") + "'"


def rows(con, query: str, params: list | None = None) -> list[dict[str, Any]]:
    """The rows of a query as dicts (few rows: the bench's own lookups)."""
    cursor = con.execute(query, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
