"""``arrakis-ray migrate STORE``: convert a layout-1 store to layout 2 in place.

Layout 1 kept one file per (family, shard), or per (family, shard, stage), with every
dimension as a column and every layer in it. Layout 2 keeps one file per (family,
layer, column block) of each shard, then compacts a finished run's shard files into
parts (``store/compact.py``). Only activations move; tokens, vocab, documents, results
and manifests stay as they are.

Every step can be interrupted and rerun: an old file is deleted only after its rows are
written in the new layout, and the store's marker says version 2 only once every run is
converted (until then, this reader refuses the store and names this command).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from arrakis_ray.errors import StoreError
from arrakis_ray.store import compact, schemas
from arrakis_ray.store.layout import (
    STORE_VERSION,
    RunLayout,
    family_kind,
    list_run_ids,
    store_version,
    write_store_marker,
)
from arrakis_ray.store.location import StorePath, store_path
from arrakis_ray.store.manifest import read_manifest, write_manifest
from arrakis_ray.store.parquet import check_file_schema, read_table
from arrakis_ray.store.writer import RunWriter

log = logging.getLogger(__name__)

_OLD_FILE = re.compile(r"^shard-(\d+)(?:\.stage-\d+)?\.parquet$")


@dataclass(frozen=True)
class Migration:
    """What ``migrate_store`` did."""

    store: str
    from_version: int
    runs: int
    files_converted: int
    runs_compacted: int


def migrate_store(root: str | Path) -> Migration:
    """Convert the store at ``root`` to this arrakis-ray's layout (a no-op if it is)."""
    path = store_path(root)
    version = store_version(path)
    if version == STORE_VERSION:
        return Migration(str(path), version, 0, 0, 0)
    if version != 1:
        raise StoreError(f"{path}: cannot migrate layout version {version} (knows 1)")
    runs = list_run_ids(path)
    converted = compacted = 0
    for run_id in runs:
        layout = RunLayout(path, run_id)
        converted += _convert_run(layout)
        compacted += _compact_run(layout)
    write_store_marker(path)  # last: the store opens only once every run is converted
    return Migration(str(path), version, len(runs), converted, compacted)


def _old_files(family_dir: StorePath) -> list[tuple[int, StorePath]]:
    found = []
    for path in family_dir.iterdir():
        m = _OLD_FILE.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found, key=lambda item: item[1].name)


def _convert_run(layout: RunLayout) -> int:
    """Rewrite a run's layout-1 activation files as column-block files."""
    if not layout.activations_root.is_dir():
        return 0
    writer = RunWriter.for_layout(layout)
    converted = 0
    for family_dir in sorted(p for p in layout.activations_root.iterdir() if p.is_dir()):
        family = family_dir.name
        name = schemas.activation_schema_name(family_kind(family))
        for shard, path in _old_files(family_dir):
            check_file_schema(path, name, 1)
            table = read_table(path, schema_name=name, max_version=1)
            writer.write_activations(family, shard, table)
            path.unlink()  # only once its rows are written in the new layout
            converted += 1
        log.info("run %s: %s converted", layout.run_id, family)
    return converted


def _compact_run(layout: RunLayout) -> int:
    """Compact a converted run whose shards are all harvested (1 if it was)."""
    try:
        manifest = read_manifest(layout)
    except StoreError as e:
        log.warning("run %s: not compacted (%s)", layout.run_id, e)
        return 0
    n_shards = len(manifest.shard_plan)
    directories = compact.block_directories(layout)
    if manifest.shards_per_part is not None:  # switched: only leftovers to remove
        for directory in directories:
            compact.remove_shard_files(layout, directory, n_shards)
        return 0
    if layout.completed_shards() != set(range(n_shards)):
        return 0
    per_part = compact.plan_parts(layout, n_shards)
    if per_part <= 1:
        return 0
    for directory in directories:
        compact.compact_directory(layout, directory, n_shards, per_part)
    write_manifest(layout, manifest.with_changes(shards_per_part=per_part))
    for directory in directories:
        compact.remove_shard_files(layout, directory, n_shards)
    return 1
