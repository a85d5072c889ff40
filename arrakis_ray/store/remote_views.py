"""The views of a store on an object store: pyarrow datasets DuckDB scans, since its own
S3 reader is an extension that cannot be downloaded on a closed cluster."""

from __future__ import annotations

import pyarrow as pa

from arrakis_ray.store.location import arrow_source


def arrow_dataset(files: list, schema: pa.Schema, blocked: bool = False):
    """A pyarrow dataset over the Parquet files of one run of a view; ``blocked``:
    activation files, whose ``layer=L/block=B`` directories become columns."""
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
    return dataset


def _duckdb_types(schema: pa.Schema) -> pa.Schema:
    """``schema`` with float16 as float32: DuckDB's Arrow scan has no float16 (its
    Parquet reader returns FLOAT for it too, so the two paths give the same types)."""
    return pa.schema(
        [f.with_type(pa.float32()) if pa.types.is_float16(f.type) else f for f in schema]
    )
