"""Compaction: a finished run's small shard files merged into large part files.

The harvest writes one file per (shard, layer, column block): the shard is the unit of
work and resume, small enough for an actor to hold in memory. At LLM widths that makes
thousands of files of a few MB, and a query pays one footer per file. Once every shard
is done, each ``layer=L/block=B`` directory's shard files are merged, P consecutive
shards per ``part-NNNNN.parquet`` (P chosen so that a part holds ~PART_BYTES), with row
groups of ~PART_ROW_GROUP_BYTES (schemas/README.md, "Layout", has the measurements).

The switch is ordered so that every row stays on disk: every part is written first, then
their inventory (``completions/parts.json``), then the manifest records
``shards_per_part`` (readers use parts from then on), then the shard files go. A
``RunReader`` or a query that started before the switch may fail to find a shard file
deleted under it (``Store.sql`` notices the switch and answers again). A call
interrupted at any point is finished by the next one: parts already written are kept
when they hold their shards' rows, shard files already removed are not needed. A part
that ``verify --repair`` deleted is written again from its re-harvested shards. The
harvest driver runs it as Ray tasks over groups of directories; ``arrakis-ray migrate``
runs it in its own process.
"""

from __future__ import annotations

import logging

from arrakis_ray.errors import StoreError
from arrakis_ray.store import schemas
from arrakis_ray.store.inventory import FileEntry, describe_file, relative_path
from arrakis_ray.store.layout import RunLayout, family_kind
from arrakis_ray.store.location import StorePath
from arrakis_ray.store.parquet import check_file_schema, num_rows, read_files, write_table

log = logging.getLogger(__name__)

PART_BYTES = 512 << 20
"""Target size of a part file: a one-neuron query over 1M tokens opens two or three."""
PART_ROW_GROUP_BYTES = 32 << 20
"""Row groups of a part (32k rows of 512 float16 columns): a footer costs ~125 bytes per
(row group, column), so larger groups mean smaller footers (a one-neuron query took the
same time with 16k, 32k and 64k rows), while a tool reading one shard decodes the
groups that hold it."""
PAGE_ROWS = 4096
"""Rows per page, with a page index: one token's vector decodes 28 pages of 8 KB at
width 14,336 instead of 28 row groups (1.9 GB read -> 0.12 GB with 1,024-row pages)."""


def block_directories(layout: RunLayout) -> list[StorePath]:
    """Every ``activations/<family>/layer=L/block=B`` directory of a run, sorted."""
    root = layout.activations_root
    if not root.is_dir():
        return []
    return sorted(
        block
        for family in root.iterdir()
        if family.is_dir()
        for layer in family.iterdir()
        if layer.is_dir() and layer.name.startswith("layer=")
        for block in layer.iterdir()
        if block.is_dir() and block.name.startswith("block=")
    )


MIN_SHARDS = 16
"""Runs of fewer shards are not compacted: a query then opens at most 15 files per
(layer, block), a few MB of footers, while compaction re-reads and re-writes every value
(benchmarks/harvest.py --quick: 5.8 s of a 21 s harvest of 10 shards)."""


def plan_parts(layout: RunLayout, n_shards: int) -> int:
    """Shards per part for a run: 1 (nothing to gain) when it has few shards or its
    files are already large.

    Sized by the directory with the largest shard files, so that no part outgrows
    PART_BYTES; the first shards' sizes stand for all (shards hold equal documents).
    """
    if n_shards < max(2, MIN_SHARDS):
        return 1
    largest = 0
    for directory in block_directories(layout):
        sizes = [
            p.stat().st_size
            for p in (layout.shard_file(directory, s) for s in range(min(n_shards, 4)))
            if p.exists()
        ]
        if sizes:
            largest = max(largest, sum(sizes) // len(sizes))
    if largest == 0:
        return 1
    return max(1, min(n_shards, PART_BYTES // largest))


def compact_directory(
    layout: RunLayout,
    directory: StorePath,
    n_shards: int,
    per_part: int,
    inventoried: dict[str, FileEntry] | None = None,
    adopt: bool = False,
) -> list[FileEntry]:
    """Write the parts of one directory (those not yet written); returns every part's
    inventory entry. ``inventoried``: the run's part entries (``completions/parts.json``)
    by path; a part listed there and of its listed size is kept as it is. ``adopt``: a
    part no inventory lists whose shard files are gone is taken as it is (``migrate``,
    inventorying a store compacted before inventories existed)."""
    family = directory.parent.parent.name
    name = schemas.activation_schema_name(family_kind(family))
    known = schemas.load_schema(name).version
    entries = []
    for part in range(-(-n_shards // per_part)):
        target = layout.part_file(directory, part)
        listed = (inventoried or {}).get(relative_path(layout, target))
        if listed is not None and target.exists() and target.stat().st_size == listed.bytes:
            entries.append(listed)
            continue
        shards = range(part * per_part, min(n_shards, (part + 1) * per_part))
        files = [layout.shard_file(directory, s) for s in shards]
        missing = [f.name for f in files if not f.exists()]
        if listed is None and target.exists():
            # a part an interrupted call wrote is kept if it holds exactly these shards'
            # rows (one written with another P, from other shard sizes, would not)
            if (missing and adopt) or (
                not missing and num_rows(target) == sum(num_rows(f) for f in files)
            ):
                entries.append(describe_file(layout, target))
                continue
        if missing:
            raise StoreError(
                f"{directory}: cannot compact part {part}: shard files missing "
                f"({', '.join(missing[:3])}); the run's shards are not all harvested"
            )
        for f in files:
            check_file_schema(f, name, known)
        table = read_files(files)
        n_dims, dtype = schemas.stored_dims(table.schema)
        expected = schemas.activation_schema(family_kind(family), n_dims or 1, dtype)
        done = write_table(
            table,
            target,
            schema_name=name,
            schema_version=known,
            expected=expected,
            row_group_bytes=PART_ROW_GROUP_BYTES,
            page_rows=PAGE_ROWS,
        )
        path = relative_path(layout, target)
        entries.append(FileEntry(path, done.bytes, done.rows, name, known, done.checksum))
    return entries


def remove_shard_files(layout: RunLayout, directory: StorePath, n_shards: int) -> int:
    """Delete a compacted directory's shard files; returns how many were removed."""
    removed = 0
    for shard in range(n_shards):
        path = layout.shard_file(directory, shard)
        if path.exists():
            path.unlink()
            removed += 1
    return removed
