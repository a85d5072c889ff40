"""The store: the run contract (RunPlan, RunManifest, RunReader, RunWriter), run layout,
versioned schemas, atomic Parquet, the SQL catalog.

Writers (the harvest, tools) need only the light modules; ``Store`` (DuckDB) and
``format_frame`` (Polars) are imported on first use so a Ray worker that only writes
Parquet does not load DuckDB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arrakis_ray.store.layout import (
    FAMILY_KIND,
    STORE_MARKER,
    RunLayout,
    family_kind,
    hook_family,
    hook_layer,
    init_store,
    list_run_ids,
    open_store,
    resolve_run,
)
from arrakis_ray.store.manifest import (
    ModelShape,
    RunManifest,
    ToolRecord,
    read_manifest,
    write_manifest,
)
from arrakis_ray.store.parquet import check_file_schema, file_schema, read_table, write_table
from arrakis_ray.store.plan import RunPlan
from arrakis_ray.store.reader import RunReader
from arrakis_ray.store.schemas import (
    TableSchema,
    activation_schema,
    activation_schema_name,
    add_schema_dir,
    load_schema,
    tokens_schema,
    vocab_schema,
)
from arrakis_ray.store.writer import RunWriter

if TYPE_CHECKING:
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.store.formatting import format_frame

__all__ = [
    "ModelShape",
    "RunManifest",
    "RunPlan",
    "RunReader",
    "RunWriter",
    "ToolRecord",
    "FAMILY_KIND",
    "STORE_MARKER",
    "RunLayout",
    "Store",
    "TableSchema",
    "activation_schema",
    "activation_schema_name",
    "add_schema_dir",
    "check_file_schema",
    "family_kind",
    "file_schema",
    "format_frame",
    "hook_family",
    "hook_layer",
    "init_store",
    "list_run_ids",
    "load_schema",
    "open_store",
    "read_manifest",
    "read_table",
    "resolve_run",
    "tokens_schema",
    "vocab_schema",
    "write_manifest",
    "write_table",
]


def __getattr__(name: str) -> Any:
    if name == "Store":
        from arrakis_ray.store.catalog import Store

        return Store
    if name == "format_frame":
        from arrakis_ray.store.formatting import format_frame

        return format_frame
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
