"""``arrakis-ray migrate STORE``: convert a layout-1 or layout-2 store to layout 3 in place.

Layout 1 kept one file per (family, shard), or per (family, shard, stage), with every
dimension as a column and every layer in it. Layout 2 keeps one file per (family,
layer, column block) of each shard, and compacts a finished run's shard files into
parts (``store/compact.py``). Layout 3 adds file inventories (``store/inventory.py``):
each empty ``completions/shard-N.done`` marker becomes ``shard-N.json`` listing the
shard's files with their checksums, and the vocabulary, the parts and each tool's
results get theirs. The files as they are now are taken to be right: run
``arrakis-ray verify`` after, and keep the old store until it passes if in doubt.

Every step can be interrupted and rerun: an old file is deleted only after its rows are
written in the new layout, an old marker only after its inventory is written, and the
store's marker says version 3 only once every run is converted (until then, this reader
refuses the store and names this command).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from arrakis_ray.errors import StoreError
from arrakis_ray.store import compact, schemas
from arrakis_ray.store.inventory import (
    PartsInventory,
    ShardInventory,
    describe_file,
    read_parts_inventory,
    write_parts_inventory,
    write_shard_inventory,
    write_vocab_inventory,
)
from arrakis_ray.store.layout import (
    STORE_VERSION,
    RunLayout,
    family_kind,
    list_run_ids,
    store_version,
    write_store_marker,
)
from arrakis_ray.store.location import StorePath, store_path
from arrakis_ray.store.manifest import read_manifest, write_manifest, write_tool_record
from arrakis_ray.store.parquet import check_file_schema, read_files, read_table
from arrakis_ray.store.writer import RunWriter

log = logging.getLogger(__name__)

_OLD_FILE = re.compile(r"^shard-(\d+)(?:\.stage-\d+)?\.parquet$")
_OLD_MARKER = re.compile(r"^shard-(\d+)\.done$")
_SHARD_FILE = re.compile(r"^shard-(\d+)\.parquet$")


@dataclass(frozen=True)
class Migration:
    """What ``migrate_store`` did."""

    store: str
    from_version: int
    runs: int
    files_converted: int
    runs_compacted: int
    shards_inventoried: int = 0


def migrate_store(root: str | Path) -> Migration:
    """Convert the store at ``root`` to this arrakis-ray's layout (a no-op if it is)."""
    path = store_path(root)
    version = store_version(path)
    if version == STORE_VERSION:
        return Migration(str(path), version, 0, 0, 0)
    if version not in (1, 2):
        raise StoreError(f"{path}: cannot migrate layout version {version} (knows 1 and 2)")
    runs = list_run_ids(path)
    converted = compacted = inventoried = 0
    for run_id in runs:
        layout = RunLayout(path, run_id)
        if version == 1:
            converted += _convert_run(layout)
        inventoried += _inventory_run(layout)
        compacted += _compact_run(layout, compact_now=version == 1)
    write_store_marker(path)  # last: the store opens only once every run is converted
    return Migration(str(path), version, len(runs), converted, compacted, inventoried)


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


def _inventory_run(layout: RunLayout) -> int:
    """Turn a run's empty completion markers into inventories of the files there now;
    inventory its vocabulary and its tools' results. Returns the shards inventoried."""
    shard_files: dict[int, list] = {}
    for directory in [layout.tokens_dir, layout.documents_dir, *compact.block_directories(layout)]:
        if directory.is_dir():
            for path in directory.iterdir():
                m = _SHARD_FILE.match(path.name)
                if m:
                    shard_files.setdefault(int(m.group(1)), []).append(path)
    markers = (
        sorted(p for p in layout.completions_dir.iterdir() if _OLD_MARKER.match(p.name))
        if layout.completions_dir.is_dir()
        else []
    )
    for marker in markers:
        shard = int(_OLD_MARKER.match(marker.name).group(1))
        entries = sorted(
            (describe_file(layout, p) for p in shard_files.get(shard, [])), key=lambda e: e.path
        )
        tokens = layout.shard_file(layout.tokens_dir, shard)
        seq = read_files([tokens], columns=["seq_id"]).column("seq_id") if tokens.exists() else []
        inventory = ShardInventory(
            shard=shard,
            files=tuple(entries),
            tokens=len(seq),
            sequences=len(set(seq.to_pylist())) if len(seq) else 0,
            seconds=0.0,
            call=None,  # the calls stay as the manifest recorded them
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_shard_inventory(layout, inventory)
        marker.unlink()  # only once its inventory is written
    if layout.vocab_path.exists():
        write_vocab_inventory(layout, describe_file(layout, layout.vocab_path))
    _inventory_results(layout)
    return len(markers)


def _inventory_results(layout: RunLayout) -> None:
    try:
        manifest = read_manifest(layout)
    except StoreError as e:
        log.warning("run %s: tool results not inventoried (%s)", layout.run_id, e)
        return
    for tool, record in manifest.results.items():
        if record.files:
            continue
        files = [
            describe_file(layout, path)
            for output in record.outputs
            for path in layout.result_files(output)
            if _SHARD_FILE.match(path.name)  # not a stray copy beside them
        ]
        write_tool_record(layout, tool, replace(record, files=tuple(files)))


def _compact_run(layout: RunLayout, compact_now: bool) -> int:
    """Compact a converted run whose shards are all harvested (1 if it was); give a
    compacted run its parts' inventory."""
    try:
        manifest = read_manifest(layout)
    except StoreError as e:
        log.warning("run %s: not compacted (%s)", layout.run_id, e)
        return 0
    n_shards = len(manifest.shard_plan)
    directories = compact.block_directories(layout)
    per_part = manifest.shards_per_part
    if per_part is None:
        if not compact_now or layout.completed_shards() != set(range(n_shards)):
            return 0
        per_part = compact.plan_parts(layout, n_shards)
        if per_part <= 1:
            return 0
    if read_parts_inventory(layout) is None:
        entries = [
            entry
            for d in directories
            for entry in compact.compact_directory(layout, d, n_shards, per_part, adopt=True)
        ]
        write_parts_inventory(layout, PartsInventory(per_part, tuple(entries)))
    compacted = manifest.shards_per_part is None
    if compacted:
        write_manifest(layout, manifest.with_changes(shards_per_part=per_part))
    for directory in directories:
        compact.remove_shard_files(layout, directory, n_shards)
    return int(compacted)
