"""Read-only SQL over every run of a store: an in-memory DuckDB with one view per table.

Views: ``runs`` (one row per run, from the manifests), ``tokens``, ``vocab``, ``documents``,
``act_<family>`` for every stored hook family and ``results_<tool>`` for every tool
result; each spans all runs and has a ``run_id`` column. The set of runs is read when the
Store opens; shards a running harvest adds later to those runs are seen by later queries.
Table macros answer the common questions (``Store.macros()``, schemas/README.md):
``top_contexts``, ``cosine_topk``, ``token_across_layers``, ``context_window``.

A store on an object store (``s3://...``) is read through pyarrow datasets registered
with DuckDB, since DuckDB's own S3 reader is an extension that cannot be downloaded on a
closed cluster; their file lists are fixed when the Store opens.

Once the views exist the connection is locked down: it reads only under the store root,
cannot load extensions or change settings, and ``Store.sql`` runs only SELECT (and
EXPLAIN of a SELECT), so a query can neither write nor read outside the store.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from arrakis_ray.errors import QueryError, SchemaError, StoreError
from arrakis_ray.store.layout import (
    FAMILY_KIND,
    RunLayout,
    hook_family,
    list_run_ids,
    open_store,
)
from arrakis_ray.store.location import arrow_source, is_remote
from arrakis_ray.store.macros import MACROS, helper_macros
from arrakis_ray.store.manifest import family_width, read_manifest
from arrakis_ray.store.parquet import check_file_schema, read_schema
from arrakis_ray.store.run_rows import RUNS_COLUMNS, manifest_stamp, run_row
from arrakis_ray.store.schemas import activation_schema_name, load_schema

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.parquet"
# Prefix of EXPLAIN [ANALYZE] [(options)] after leading whitespace and comments.
_EXPLAIN = re.compile(
    r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)*EXPLAIN\s*(?:\([^)]*\)\s*)?(?:ANALY[SZ]E\b)?",
    re.IGNORECASE | re.DOTALL,
)


def _lit(text: str | Path) -> str:
    """SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def _duckdb_types(schema: pa.Schema) -> pa.Schema:
    """``schema`` with float16 as float32: DuckDB's Arrow scan has no float16 (its
    Parquet reader returns FLOAT for it too, so the two paths give the same types)."""
    return pa.schema(
        [f.with_type(pa.float32()) if pa.types.is_float16(f.type) else f for f in schema]
    )


class Store:
    """A store opened for SQL: ``Store(root).sql("SELECT ...")`` returns a Polars frame."""

    def __init__(self, root: str | Path) -> None:
        root = open_store(root)
        # Real path: DuckDB checks file access against it textually.
        self.root = root if is_remote(root) else root.resolve()
        self._run_ids = list_run_ids(self.root)
        self._views: list[str] = []
        self._macros: dict[str, str] = {}
        # from the manifests: a run's hook families, whether its activations are
        # compacted, and each family's widths (the macros build FLOAT[width] from them)
        self._families: dict[str, set[str]] = {}
        self._compacted: set[str] = set()
        self._uncompacted: dict[str, tuple] = {}  # run id -> its manifest's file stamp
        self._widths: dict[str, dict[str, int | None]] = {}
        self._tmpdir = tempfile.mkdtemp(prefix="arrakis-duckdb-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect(":memory:")
        try:
            self._create_runs()
            self._create_file_views()
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
            row, manifest = run_row(RunLayout(self.root, run_id))
            rows.append(row)
            if manifest is None:
                continue
            families = {hook_family(h) for h in manifest.hooks}
            self._families[run_id] = families
            if manifest.shards_per_part is not None:
                self._compacted.add(run_id)
            elif not is_remote(self.root):
                # a harvest may compact it while we are open
                self._uncompacted[run_id] = manifest_stamp(
                    RunLayout(self.root, run_id).manifest_path
                )
            for family in families:
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

    def _checked_files(self, pattern: str, schema_name: str) -> list[tuple[str, str, list]]:
        """(run id, per-run glob, files) of one table; the first file's schema checked.

        ``{files}`` in the pattern stands for the run's activation file names: its
        ``part-*`` files once it is compacted, else its ``shard-*`` files.
        """
        try:
            max_version = load_schema(schema_name).version
        except SchemaError:
            max_version = None  # a tool whose schema file this install lacks
        found = []
        for run_id in self._run_ids:
            run_dir = self.root / "runs" / run_id
            names = "part-*.parquet" if run_id in self._compacted else SHARD_GLOB
            run_pattern = pattern.replace("{files}", names)
            files = sorted(run_dir.glob(run_pattern))
            if not files:
                continue
            if max_version is None:
                log.warning("no schema file for %r: not checking %s", schema_name, files[0])
            else:
                check_file_schema(files[0], schema_name, max_version)
            found.append((run_id, str(run_dir / run_pattern), files))
        return found

    def _view(self, name: str, parts: list[tuple[str, str, list]], blocked: bool = False) -> None:
        """View ``name`` over the runs' files, with run_id added where a table lacks it.

        Runs whose files share one schema are read by one read_parquet; otherwise (runs of
        different widths or dtypes) one read_parquet per run, united by column name: shards
        of a run share a schema, so binding reads one footer per run rather than all.
        ``blocked``: activation files under ``layer=L/block=B/``, whose path values become
        the columns layer and block, so that a filter on them skips the other files
        unopened.
        """
        if not parts:
            return
        schemas = [read_schema(files[0]) for _r, _p, files in parts]
        remote = is_remote(self.root)
        hive = ", hive_partitioning = true, hive_types = {'layer': SMALLINT, 'block': SMALLINT}"
        options = hive if blocked else ""
        if (
            not remote
            and all(s.equals(schemas[0]) for s in schemas)
            and "run_id" in schemas[0].names
        ):
            files = ", ".join(_lit(pattern) for _r, pattern, _f in parts)
            body = f"SELECT * FROM read_parquet([{files}]{options})"
        else:
            selects = []
            for i, ((run_id, pattern, files), schema) in enumerate(
                zip(parts, schemas, strict=True)
            ):
                if remote:
                    source = self._register_dataset(f"{name}_{i}", files, schema, blocked)
                else:
                    source = f"read_parquet({_lit(pattern)}{options})"
                select = "*" if "run_id" in schema.names else f"{_lit(run_id)} AS run_id, *"
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
        import pyarrow.dataset as pads  # only here: it imports pandas (~0.5 s)

        paths, filesystem = zip(*(arrow_source(f) for f in files), strict=True)
        schema = _duckdb_types(schema)
        options = {}
        if blocked:  # layer=L/block=B from the paths: pyarrow skips files by them
            keys = pa.schema([("layer", pa.int16()), ("block", pa.int16())])
            options["partitioning"] = pads.HivePartitioning(keys)
            options["partition_base_dir"] = arrow_source(files[0].parent.parent.parent)[0]
            schema = schema.append(pa.field("block", pa.int16()))
        dataset = pads.dataset(
            list(paths), schema=schema, format="parquet", filesystem=filesystem[0], **options
        )
        source = f"_arrow_{name}"
        self._con.register(source, dataset)
        return f'"{source}"'

    def _create_file_views(self) -> None:
        self._view("tokens", self._checked_files(f"tokens/{SHARD_GLOB}", "tokens"))
        self._view("vocab", self._checked_files("vocab.parquet", "vocab"))
        self._view("documents", self._checked_files(f"documents/{SHARD_GLOB}", "documents"))
        tools: set[str] = set()
        for run_id in self._run_ids:
            run = RunLayout(self.root, run_id)
            tools |= {p.parent.name for p in run.results_root.glob(f"*/{SHARD_GLOB}")}
        self._create_activation_views()
        for tool in sorted(tools):
            parts = self._checked_files(f"results/{tool}/{SHARD_GLOB}", f"result.{tool}")
            self._view(f"results_{re.sub(r'[^A-Za-z0-9_]', '_', tool)}", parts)

    def _create_activation_views(self) -> None:
        for family in sorted({f for families in self._families.values() for f in families}):
            schema_name = activation_schema_name(FAMILY_KIND[family])
            pattern = f"activations/{family}/layer=*/block=*/{{files}}"
            parts = self._checked_files(pattern, schema_name)
            self._view(f"act_{family}", parts, blocked=True)

    def _follow_compaction(self) -> bool:
        """Point the views at the parts of a run that a harvest compacted since the Store
        opened (its shard files go right after the switch); True if one switched."""
        switched = set()
        for run_id, stamp in list(self._uncompacted.items()):
            layout = RunLayout(self.root, run_id)
            now = manifest_stamp(layout.manifest_path)
            if now == stamp:  # a stat per query, not a manifest parse (~2 ms)
                continue
            self._uncompacted[run_id] = now
            try:
                manifest = read_manifest(layout)
            except StoreError:
                continue
            if manifest.shards_per_part is not None:
                switched.add(run_id)
        if switched:
            for run_id in switched:
                del self._uncompacted[run_id]
            self._compacted |= switched
            self._create_activation_views()
        return bool(switched)

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
        con.execute(f"SET temp_directory = {_lit(self._tmpdir)}")
        # an object store's files are read by pyarrow, outside DuckDB: DuckDB itself may
        # then read no directory but its own temp directory
        local = self._tmpdir if is_remote(self.root) else self.root
        con.execute(f"SET allowed_directories = [{_lit(local)}]")
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

    def _check_read_only(self, query: str) -> None:
        con = self._require_open()
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(str(e)) from None
        if len(statements) != 1:
            raise QueryError(
                f"one statement per query, got {len(statements)}" if statements else "empty query"
            )
        st = statements[0]
        if st.type == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: only a SELECT may follow.
            m = _EXPLAIN.match(st.query)
            try:
                inner = con.extract_statements(st.query[m.end() :]) if m else []
            except duckdb.Error:
                inner = []
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                return
            raise QueryError("the query surface is read-only: EXPLAIN only of a SELECT")
        if st.type == duckdb.StatementType.SELECT:
            return
        kind = str(st.type).rsplit(".", 1)[-1]
        raise QueryError(f"the query surface is read-only: {kind} statements are not allowed")

    def _require_open(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise QueryError(f"the store {self.root} is closed")
        return self._con

    def sql(self, query: str) -> pl.DataFrame:
        """Run one read-only query (SELECT, or EXPLAIN of one) and return its result."""
        self._check_read_only(query)
        try:
            return self._answer(query)
        except duckdb.Error as e:
            raise QueryError(str(e)) from None

    def _answer(self, query: str) -> pl.DataFrame:
        """The query's result, rerun if a harvest compacted a run under it: the query
        may have missed (or failed on) shard files deleted after the switch to parts."""
        if self._uncompacted:
            self._follow_compaction()
        try:
            result = self._fetch(query)
        except duckdb.IOException:
            if not (self._uncompacted and self._follow_compaction()):
                raise
            return self._fetch(query)
        if self._uncompacted and self._follow_compaction():
            result = self._fetch(query)
        return result

    def _fetch(self, query: str) -> pl.DataFrame:
        relation = self._require_open().sql(query)
        return relation.pl() if relation is not None else pl.DataFrame()

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
