"""Atomic, schema-checked Parquet writing and version-checked reading.

Every file carries its schema's name and version in the Parquet key-value metadata
(``arrakis.schema``, ``arrakis.schema_version``). Files appear under their final name only
when complete: they are written to a hidden temp name in the same directory, fsynced and
renamed, so readers never see half a file (and read only the files an inventory lists:
``store/inventory.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from arrakis_ray.errors import SchemaError, StoreError
from arrakis_ray.store.atomic import atomic_path
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.location import StorePath, arrow_source
from arrakis_ray.store.schemas import schema_mismatch

log = logging.getLogger(__name__)

META_SCHEMA = b"arrakis.schema"
META_VERSION = b"arrakis.schema_version"

# Snappy: on float16 activations it is ~10% faster to write and ~40% faster to read than
# zstd, which saves only ~8-10% of the bytes (activations are near-incompressible);
# see schemas/README.md for the measurement.
COMPRESSION = "snappy"
# ~64 MiB of uncompressed data per row group: large enough for sequential reads, small
# enough that DuckDB can scan the row groups of one shard in parallel.
ROW_GROUP_BYTES = 64 << 20
MIN_ROW_GROUP_ROWS = 1024
MAX_ROW_GROUP_ROWS = 1 << 20


@dataclass(frozen=True)
class WrittenFile:
    """What ``write_table`` wrote: what a file inventory records (``store/inventory.py``)."""

    bytes: int
    rows: int
    checksum: str


def _row_group_rows(schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES) -> int:
    # bytes per row from the fixed widths (a string counts 16 bytes): table.nbytes walks
    # every chunk of a 1,000-column table, 10-70 ms per file (benchmarks/BENCHMARKS.md)
    bytes_per_row = sum(
        (f.type.bit_width + 7) // 8 if pa.types.is_primitive(f.type) else 16 for f in schema
    )
    return max(MIN_ROW_GROUP_ROWS, min(MAX_ROW_GROUP_ROWS, row_group_bytes // bytes_per_row))


def write_table(
    table: pa.Table,
    path: StorePath,
    *,
    schema_name: str,
    schema_version: int,
    expected: pa.Schema,
    row_group_bytes: int = ROW_GROUP_BYTES,
    page_rows: int | None = None,
) -> WrittenFile:
    """Write ``table`` to ``path`` atomically after checking it against ``expected``.

    Column names, types and order must equal ``expected`` (nullability flags are taken
    from ``expected``; a non-nullable column holding nulls is refused). ``page_rows``:
    pages of at most that many rows, with a page index, so that a reader looking up a
    few rows decodes their pages, not their whole row group. Every page carries a CRC
    (checked wherever pyarrow reads). Returns the file's size, rows and checksum.
    """
    problem = schema_mismatch(table.schema, expected)
    if problem:
        raise SchemaError(
            f"table {schema_name!r} (schema v{schema_version}) for {path} does not match "
            f"its schema: {problem}"
        )
    for field in expected:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(
                f"table {schema_name!r} for {path}: column {field.name!r} holds "
                f"{table.column(field.name).null_count} nulls but is not nullable"
            )
    metadata = {META_SCHEMA: schema_name.encode(), META_VERSION: str(schema_version).encode()}
    out = pa.Table.from_arrays(table.columns, schema=expected.with_metadata(metadata))

    # Dictionary encoding and statistics only on key/text columns: on float columns
    # dictionaries are useless and statistics halve the write speed of float16
    # (activations are not sorted, so min/max rarely prunes a row group).
    keys = [f.name for f in expected if not pa.types.is_floating(f.type)]
    with atomic_path(path) as tmp:
        pq.write_table(
            out,
            str(tmp),
            compression=COMPRESSION,
            use_dictionary=keys,
            write_statistics=keys,
            row_group_size=_row_group_rows(expected, row_group_bytes),
            write_page_checksum=True,
            **({"write_page_index": True, "max_rows_per_page": page_rows} if page_rows else {}),
        )
        # the local copy, before it is renamed or uploaded: no request to an object store
        size = tmp.stat().st_size
        checksum = checksum_file(tmp)
    log.debug("wrote %s: %d rows, %d bytes", path, out.num_rows, size)
    return WrittenFile(size, out.num_rows, checksum)


def file_schema(path: StorePath) -> tuple[str | None, int | None]:
    """The (schema name, version) recorded in a Parquet file, None where absent."""
    source, filesystem = arrow_source(path)
    try:
        meta = pq.read_metadata(source, filesystem=filesystem).metadata or {}
    except FileNotFoundError:
        raise StoreError(f"{path}: file is missing") from None
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: corrupt or truncated Parquet file ({e})") from None
    name = meta.get(META_SCHEMA)
    raw_version = meta.get(META_VERSION)
    try:
        version = int(raw_version) if raw_version is not None else None
    except ValueError:
        raise SchemaError(f"{path}: invalid schema version {raw_version!r}") from None
    return (name.decode() if name is not None else None), version


def check_file_schema(path: StorePath, schema_name: str, max_version: int) -> int:
    """Check a file holds ``schema_name`` at a version this reader knows; returns it."""
    name, version = file_schema(path)
    if name is None or version is None:
        raise SchemaError(
            f"{path}: no arrakis.schema metadata (not written by arrakis-ray); "
            f"expected table {schema_name!r}"
        )
    if name != schema_name:
        raise SchemaError(f"{path}: holds table {name!r}, expected {schema_name!r}")
    if version > max_version:
        raise SchemaError(
            f"{path}: table {schema_name!r} was written by a newer arrakis-ray "
            f"(schema v{version}, this reader knows v{max_version})"
        )
    return version


def read_table(
    path: StorePath,
    *,
    schema_name: str,
    max_version: int,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read a stored table after checking its schema name and version."""
    check_file_schema(path, schema_name, max_version)
    source, filesystem = arrow_source(path)
    try:
        return pq.read_table(
            source,
            columns=columns,
            filesystem=filesystem,
            partitioning=None,
            page_checksum_verification=True,
        )
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: could not read ({e})") from None


def num_rows(path: StorePath) -> int:
    """Row count of a Parquet file, from its footer."""
    source, filesystem = arrow_source(path)
    try:
        return pq.read_metadata(source, filesystem=filesystem).num_rows
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: corrupt or truncated Parquet file ({e})") from None


def read_files(
    paths: list[StorePath], *, columns: list[str] | None = None, filters=None
) -> pa.Table:
    """Read several stored Parquet files (of one table, one filesystem) as one table."""
    if not paths:
        raise StoreError("no files to read")
    sources = [arrow_source(p) for p in paths]
    try:
        # partitioning=None: the layer=L/block=B directories are not columns to add
        return pq.read_table(
            [s for s, _fs in sources],
            columns=columns,
            filters=filters,
            filesystem=sources[0][1],
            partitioning=None,
            page_checksum_verification=True,
        )
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{paths[0].parent}: could not read ({e})") from None


def read_schema(path: StorePath) -> pa.Schema:
    """The Arrow schema of a Parquet file (without its key-value metadata)."""
    source, filesystem = arrow_source(path)
    try:
        return pq.read_schema(source, filesystem=filesystem).remove_metadata()
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{path}: corrupt or truncated Parquet file ({e})") from None
