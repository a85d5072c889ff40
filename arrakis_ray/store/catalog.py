"""Read-only SQL over every run of a store: an in-memory DuckDB with one view per table.

Views: ``runs`` (one row per run, from the manifests), ``tokens``, ``vocab``, ``documents``,
``act_<family>`` for every stored hook family and ``results_<tool>`` for every tool
result; each spans all runs and has a ``run_id`` column, and reads exactly the files the
runs' inventories list (``store/inventory.py``). A results view of a tool that a sweep
ran with several settings has a ``variant`` column too (NULL: the run's own call);
``Store(root, variants=False)`` leaves the variants' files out instead, so the results
views hold only the runs' own calls, with no ``variant`` column, as before sweeps (a
tool only a variant ran then has no view, like a tool never run): the reports open it so,
as ``RunReader`` reads only a run's own calls. The
bench's records are the views ``experiments``, ``experiment_calls`` and ``hypotheses``
(``bench/records.py``); the sweeps' and schedules' are ``sweeps``, ``sweep_runs``,
``schedules``, ``schedule_firings`` and their events (``sweeps/records.py``). The set
of runs is read when the Store opens; shards and results that running or uncompacted
runs gain later are seen by later queries.
Table macros answer the common questions (``Store.macros()``, schemas/README.md):
``top_contexts``, ``cosine_topk``, ``token_across_layers``, ``context_window``.

A store on an object store (``s3://...``) is read through pyarrow datasets registered
with DuckDB, since DuckDB's own S3 reader is an extension that cannot be downloaded on a
closed cluster; their file lists are fixed when the Store opens.

Once the views exist the connection is locked down: it reads only under the store root,
cannot load extensions or change settings, and ``Store.sql`` runs only SELECT (and
EXPLAIN of a SELECT), so a query can neither write nor read outside the store. Each
query runs within a memory limit, a timeout and a bound on its result's size
(``store/bounds.py``), and fails past one with a one-line QueryError.
"""

from __future__ import annotations

import glob
import logging
import re
import shutil
import weakref
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from arrakis_ray.errors import QueryError, SchemaError, StoreError
from arrakis_ray.store.bounds import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT_S,
    QueryBounds,
    make_temp_dir,
)
from arrakis_ray.store.inventory import table_of
from arrakis_ray.store.layout import (
    FAMILY_KIND,
    RunLayout,
    hook_family,
    list_run_ids,
    open_store,
)
from arrakis_ray.store.location import first_symlink, is_remote
from arrakis_ray.store.macros import MACROS, helper_macros
from arrakis_ray.store.manifest import family_width
from arrakis_ray.store.parquet import read_schema
from arrakis_ray.store.read_only import check_read_only
from arrakis_ray.store.remote_views import arrow_dataset
from arrakis_ray.store.run_rows import RUNS_COLUMNS, RunContents, read_run, run_stamp
from arrakis_ray.store.schemas import activation_schema_name, load_schema

log = logging.getLogger(__name__)


def _path_lit(path) -> str:
    """A file path as a SQL literal that DuckDB reads as that one file: it takes every
    path given to read_parquet as a glob pattern, so ``br[1]store/...`` would read the
    sibling ``br1store/...`` and ``star*store`` any match; a bracket class is literal."""
    return _lit(glob.escape(str(path)))


def _lit(text: str | Path) -> str:
    """SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


class Store:
    """A store opened for SQL: ``Store(root).sql("SELECT ...")`` returns a Polars frame."""

    def __init__(
        self,
        root: str | Path,
        *,
        memory_limit: int | str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_bytes: int | str | None = DEFAULT_MAX_RESULT_BYTES,
        variants: bool = True,
    ) -> None:
        """Open ``root``. Every query runs within ``memory_limit`` (bytes or ``"4GB"``;
        default a quarter of the machine's memory), ``timeout_s`` seconds and a result of
        ``max_result_bytes``; ``None`` lifts the time or result bound (store/bounds.py).

        ``variants``: whether the results views include the results of tool variants (a
        sweep's settings of a tool, ``tools/<tool>.<variant>.json``), told apart by the
        column ``variant`` (NULL: the run's own call). ``False``: only the runs' own calls,
        no ``variant`` column, and no view for a tool that only variants ran (what
        ``RunReader`` reads, and what the reports show)."""
        root = open_store(root)
        # Real path: DuckDB checks file access against it textually.
        self.root = root if is_remote(root) else root.resolve()
        self._run_ids = list_run_ids(self.root)
        self._views: list[str] = []
        self._macros: dict[str, str] = {}
        # from the manifests: a run's hook families, whether its activations are
        # compacted, and each family's widths (the macros build FLOAT[width] from them)
        self._families: dict[str, set[str]] = {}
        self._files: dict[str, dict[str, list]] = {}  # run id -> table -> inventoried files
        self._variants: dict[str, dict[str, str]] = {}  # run id -> result file -> variant
        self._with_variants = variants
        self._watched: dict[str, tuple] = {}  # run id -> run_stamp, for runs still changing
        self._widths: dict[str, dict[str, int | None]] = {}
        self._bounds = QueryBounds.of(memory_limit, timeout_s, max_result_bytes)
        self._tmpdir = make_temp_dir()  # removes those of killed processes
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect(":memory:")
        try:
            if not is_remote(self.root):
                _refuse_links(self.root)
            self._create_runs()
            self._create_file_views()
            self._create_experiment_views()
            self._create_sweep_views()
            self._create_macros()
            self._lock_down()
        except duckdb.Error as e:
            self.close()
            raise StoreError(f"{self.root}: could not build the SQL catalog ({e})") from None
        except BaseException:
            self.close()
            raise

    # -- building -----------------------------------------------------------------

    def _create_runs(self) -> None:
        rows = []
        for run_id in self._run_ids:
            layout = RunLayout(self.root, run_id)
            # before reading: a change in between is seen by the next query (local only)
            stamp = None if is_remote(self.root) else run_stamp(layout)
            contents = read_run(layout)  # StoreError if a listed file is gone or resized
            rows.append(contents.row)
            self._take_files(run_id, contents)
            if contents.manifest is None:
                continue
            manifest = contents.manifest
            if not is_remote(self.root) and not (
                manifest.status == "complete" and manifest.shards_per_part is not None
            ):
                # a harvest may add shards or compact it while we are open
                self._watched[run_id] = stamp
            for family in self._families[run_id]:
                width = family_width(manifest.shape, family)
                self._widths.setdefault(family, {})[run_id] = width
        # inserted as values: any Arrow table built from Python objects, or handed to
        # DuckDB, imports pandas (0.4 s of every `arrakis-ray sql`)
        names = [name for name, _type in RUNS_COLUMNS]
        columns = ", ".join(f"{name} {sql_type}" for name, sql_type in RUNS_COLUMNS)
        self._con.execute(f"CREATE TABLE runs ({columns})")
        if rows:
            marks = ", ".join("?" for _ in names)
            values = [[row.get(name) for name in names] for row in rows]
            self._con.executemany(f"INSERT INTO runs VALUES ({marks})", values)
        self._views.append("runs")

    def _take_files(self, run_id: str, contents: RunContents) -> None:
        """Sort a run's inventoried files into the tables they belong to."""
        tables: dict[str, list] = {}
        variants = contents.variants
        for entry in contents.files:
            if not self._with_variants and entry.path in variants:
                continue  # a sweep's setting of a tool: left out of every view
            tables.setdefault(table_of(entry.path), []).append(entry)
        self._files[run_id] = tables
        self._variants[run_id] = variants if self._with_variants else {}
        if contents.manifest is not None:
            self._families[run_id] = {hook_family(h) for h in contents.manifest.hooks}

    def _checked_files(self, table: str, schema_name: str) -> list[tuple[str, list, str | None]]:
        """(run id, files, variant) of one table over the runs, each file's recorded
        schema checked (its footer is ``verify``'s to read: a stat already matched its
        size); a run's results written by tool variants (a sweep's settings) are a part
        of their own per variant, after the run's own (variant None)."""
        try:
            max_version = load_schema(schema_name).version
        except SchemaError:
            max_version = None  # a tool whose schema file this install lacks
        found, remote = [], is_remote(self.root)
        for run_id in self._run_ids:
            entries = self._files.get(run_id, {}).get(table)
            if not entries:
                continue
            layout = RunLayout(self.root, run_id)
            variants = self._variants.get(run_id, {})
            groups: dict[str | None, list] = {}
            for entry in entries:
                _check_entry(layout, entry, schema_name, max_version)
                groups.setdefault(variants.get(entry.path), []).append(entry)
            for variant in sorted(groups, key=lambda v: (v is not None, v)):
                # remote: pyarrow opens them, as paths with their filesystem; local:
                # strings (building thousands of Paths was a third of an open)
                files = [
                    e.location(layout) if remote else f"{layout.root}/{e.path}"
                    for e in groups[variant]
                ]
                found.append((run_id, files, variant))
        return found

    def _view(self, name: str, parts: list[tuple], blocked: bool = False) -> None:
        """View ``name`` over the runs' files, with run_id added where a table lacks it.

        Runs whose files share one schema are read by one read_parquet; otherwise (runs of
        different widths or dtypes) one read_parquet per run, united by column name: files
        of a run share a schema, so binding reads one footer per run rather than all.
        ``blocked``: activation files under ``layer=L/block=B/``, whose path values become
        the columns layer and block, so that a filter on them skips the other files
        unopened. Parts of a tool variant (a run's results of a sweep's setting) add the
        column ``variant``: NULL for the run's own call, else the variant.
        """
        if not parts:
            return
        schemas = [read_schema(files[0]) for _r, files, _v in parts]
        remote = is_remote(self.root)
        variants = any(variant is not None for _r, _f, variant in parts)
        hive = ", hive_partitioning = true, hive_types = {'layer': SMALLINT, 'block': SMALLINT}"
        options = hive if blocked else ""
        if (
            not remote
            and not variants
            and all(s.equals(schemas[0]) for s in schemas)
            and "run_id" in schemas[0].names
        ):
            files = ", ".join(_path_lit(f) for _r, run_files, _v in parts for f in run_files)
            body = f"SELECT * FROM read_parquet([{files}]{options})"
        else:
            selects = []
            for i, ((run_id, files, variant), schema) in enumerate(
                zip(parts, schemas, strict=True)
            ):
                if remote:
                    source = self._register_dataset(f"{name}_{i}", files, schema, blocked)
                else:
                    listed = ", ".join(_path_lit(f) for f in files)
                    source = f"read_parquet([{listed}]{options})"
                select = "*" if "run_id" in schema.names else f"{_lit(run_id)} AS run_id, *"
                tag = "NULL" if variant is None else _lit(variant)
                select += f", {tag}::VARCHAR AS variant" if variants else ""
                selects.append(f"SELECT {select} FROM {source}")
            body = "\nUNION ALL BY NAME\n".join(selects)
        if blocked:  # the key columns first, as in the files
            body = f"SELECT run_id, layer, block, * EXCLUDE (run_id, layer, block) FROM ({body})"
        self._con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
        if name not in self._views:
            self._views.append(name)

    def _register_dataset(
        self, name: str, files: list, schema: pa.Schema, blocked: bool = False
    ) -> str:
        """Register the Parquet files of one run of an object-store view; its SQL source."""
        source = f"_arrow_{name}"
        self._con.register(source, arrow_dataset(files, schema, blocked))
        return f'"{source}"'

    def _create_file_views(self) -> None:
        self._view("tokens", self._checked_files("tokens", "tokens"))
        self._view("vocab", self._checked_files("vocab", "vocab"))
        self._view("documents", self._checked_files("documents", "documents"))
        self._create_activation_views()
        outputs = {
            table.removeprefix("results/")
            for tables in self._files.values()
            for table in tables
            if table.startswith("results/")
        }
        for output in sorted(outputs):
            parts = self._checked_files(f"results/{output}", f"result.{output}")
            self._view(f"results_{re.sub(r'[^A-Za-z0-9_]', '_', output)}", parts)

    def _create_experiment_views(self) -> None:
        """``experiment_calls``, ``experiments`` and ``hypotheses``: the bench's records
        (``bench/records.py``), present (maybe empty) in every store."""
        from arrakis_ray.bench.records import create_views

        create_views(self._con, self.root, self._register_dataset)
        self._views.extend(["experiment_calls", "experiments", "hypotheses"])

    def _create_sweep_views(self) -> None:
        """``sweeps``, ``sweep_runs``, ``schedules``, ``schedule_firings`` and their
        events: the sweeps' and schedules' records (``sweeps/records.py``), present
        (maybe empty) in every store."""
        from arrakis_ray.sweeps.records import create_views

        self._views.extend(create_views(self._con, self.root))

    def _create_activation_views(self) -> None:
        for family in sorted({f for families in self._families.values() for f in families}):
            schema_name = activation_schema_name(FAMILY_KIND[family])
            parts = self._checked_files(f"activations/{family}", schema_name)
            self._view(f"act_{family}", parts, blocked=True)

    def _follow_runs(self) -> bool:
        """Follow the runs a harvest is still writing: new shards, the switch to parts
        (whose shard files go right after it), new tool results. Their views are rebuilt
        when one changed since the Store opened; True if one did."""
        changed = False
        for run_id, stamp in list(self._watched.items()):
            layout = RunLayout(self.root, run_id)
            now = run_stamp(layout)
            if now == stamp:  # three stats per query, not a manifest parse (~2 ms)
                continue
            try:
                contents = read_run(layout)
            except StoreError:
                continue  # mid-switch: the next query looks again
            if contents.manifest is None:
                continue
            self._watched[run_id] = now
            self._take_files(run_id, contents)
            changed = True
        if changed:
            self._create_file_views()
        return changed

    def _create_macros(self) -> None:
        for statement in helper_macros(self._widths):
            self._con.execute(statement)
        for name, doc, needs, body in MACROS:
            if all(view in self._views for view in needs):
                params = doc[len(name) : doc.index("): ") + 1]
                self._con.execute(f"CREATE MACRO {name}{params} AS TABLE {body}")
                self._macros[name] = doc

    def _lock_down(self) -> None:
        con = self._con
        for statement in self._bounds.settings(self._tmpdir):  # before the lock
            con.execute(statement)
        # an object store's files are read by pyarrow, outside DuckDB: DuckDB itself may
        # then read no directory but its own temp directory
        local = self._tmpdir if is_remote(self.root) else self.root
        # DuckDB matches the allowed directories against the escaped paths it is given
        # (``_path_lit``) as well as the real ones
        allowed = dict.fromkeys([str(local), glob.escape(str(local))])
        con.execute(f"SET allowed_directories = [{', '.join(_lit(a) for a in allowed)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET python_enable_replacements = false")
        # cache Parquet footers across queries: a wide shard's footer is ~64 KB and every
        # query parsed all of them (top-k of one neuron over 256 files: 0.31 -> 0.12 s,
        # benchmarks/BENCHMARKS.md); a file replaced by rename is still read fresh
        con.execute("SET parquet_metadata_cache = true")
        con.execute("SET lock_configuration = true")

    # -- querying -----------------------------------------------------------------

    def _require_open(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise QueryError(f"the store {self.root} is closed")
        return self._con

    def sql(self, query: str) -> pl.DataFrame:
        """Run one read-only query (SELECT, or EXPLAIN of one) and return its result;
        past a bound of the Store, or on a bad query, a one-line QueryError."""
        with self._bounds.guard(self._require_open()):
            check_read_only(self._require_open(), query)
            return self._answer(query)

    def _answer(self, query: str) -> pl.DataFrame:
        """The query's result, rerun if a harvest compacted a run under it: the query
        may have missed (or failed on) shard files deleted after the switch to parts."""
        if self._watched:
            self._follow_runs()
        try:
            result = self._fetch(query)
        except duckdb.IOException:
            if not (self._watched and self._follow_runs()):
                raise
            return self._fetch(query)
        if self._watched and self._follow_runs():
            result = self._fetch(query)
        return result

    def _fetch(self, query: str) -> pl.DataFrame:
        relation = self._require_open().sql(query)
        return self._bounds.fetch(relation) if relation is not None else pl.DataFrame()

    def views(self) -> list[str]:
        """Names of the queryable views (``runs`` included), sorted."""
        return sorted(self._views)

    def macros(self) -> dict[str, str]:
        """The SQL table macros (``SELECT * FROM top_contexts(...)``): name -> call and meaning."""
        return dict(sorted(self._macros.items()))

    def run_ids(self) -> list[str]:
        """Ids of the runs the catalog covers, sorted."""
        return list(self._run_ids)

    def close(self) -> None:
        """Close the DuckDB connection and remove its temp directory."""
        if self._con is not None:
            self._con.close()
            self._con = None
        self._cleanup()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, runs={len(self._run_ids)}, views={len(self._views)})"


def _check_entry(layout: RunLayout, entry, schema_name: str, max_version: int | None) -> None:
    if entry.schema != schema_name:
        raise SchemaError(
            f"{entry.location(layout)}: inventoried as table {entry.schema!r}, "
            f"expected {schema_name!r}"
        )
    if max_version is not None and entry.schema_version > max_version:
        raise SchemaError(
            f"{entry.location(layout)}: table {schema_name!r} was written by a newer "
            f"arrakis-ray (schema v{entry.schema_version}, this reader knows v{max_version})"
        )


def _refuse_links(root: Path) -> None:
    link = first_symlink(root)
    if link is not None:
        raise StoreError(
            f"{link}: a symbolic link inside the store; a query could read through it "
            "outside the store: replace it with the files themselves"
        )
