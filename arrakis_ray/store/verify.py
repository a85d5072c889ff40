"""What is wrong with a run's files, measured against its inventories (an fsck).

``run_damage`` checks every inventoried file: present, of its recorded size, and (with
checksums) of its recorded bytes, schema, version and rows; every finished shard's
inventory must parse, and a complete run must have one per planned shard. Damage names
the shards a re-harvest must redo (``harvest/repair.py`` does it). Files nobody
inventoried are *strays* (a copy, a foreign file: queries ignore them) and temp files
of a killed writer are *orphans*; neither is damage, both are reported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from arrakis_ray.errors import StoreError
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.inventory import (
    FileEntry,
    ShardInventory,
    harvest_files,
    parts_inventory_path,
    read_parts_inventory,
    read_shard_inventory,
    read_vocab_inventory,
    relative_path,
    size_problems,
    vocab_inventory_path,
)
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import RunManifest
from arrakis_ray.store.parquet import file_schema, num_rows

log = logging.getLogger(__name__)

# atomic.py's temp names: ".<name>.tmp-<pid>-<hex>"
_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")
# what only the harvest writes: its orphans may go while it holds the run's lease
_HARVEST_DIRS = ("activations", "tokens", "documents", "completions")
_PART = re.compile(r"part-(\d+)\.parquet$")


@dataclass(frozen=True)
class Damage:
    """One damaged file (or inventory) and the shards that must be harvested again."""

    path: str
    problem: str
    shards: tuple[int, ...]


def run_damage(layout: RunLayout, manifest: RunManifest, check_checksums: bool) -> list[Damage]:
    """Every problem with a run's inventoried files; empty if it is whole.

    Without ``check_checksums`` only sizes are checked (a stat per file: cheap enough to
    run on every harvest rerun); with it every file is read back.
    """
    damage: list[Damage] = []
    inventories: dict[int, ShardInventory] = {}
    for shard in sorted(layout.completed_shards()):
        try:
            inventories[shard] = read_shard_inventory(layout, shard)
        except StoreError as exc:
            damage.append(Damage(str(layout.completion_marker(shard)), str(exc), (shard,)))
    if manifest.status == "complete":
        missing = sorted({s.shard for s in manifest.shard_plan} - layout.completed_shards())
        for shard in missing:
            where = str(layout.completion_marker(shard))
            damage.append(Damage(where, "inventory is missing from a complete run", (shard,)))
    parts = _read_or_note(read_parts_inventory, parts_inventory_path, layout, damage)
    vocab = _read_or_note(read_vocab_inventory, vocab_inventory_path, layout, damage)
    if manifest.shards_per_part is not None and parts is None:
        damage.append(Damage(str(layout.completions_dir), "parts.json is missing", ()))
    for entry in harvest_files(layout, inventories, parts, vocab):
        problem = _file_problem(layout, entry, check_checksums)
        if problem:
            shards = _shards_of(entry, inventories, manifest)
            damage.append(Damage(str(entry.location(layout)), problem, shards))
    for shard, inventory in inventories.items():
        for entry in inventory.files:
            if entry.schema == "activation.dense" and entry.rows != inventory.tokens:
                problem = f"{entry.rows} rows, but the shard has {inventory.tokens} tokens"
                damage.append(Damage(str(entry.location(layout)), problem, (shard,)))
    return damage


def _read_or_note(read, where, layout: RunLayout, damage: list[Damage]):
    """``read(layout)``, or None with the damage noted if it does not parse (a repair
    deletes it and builds it again)."""
    try:
        return read(layout)
    except StoreError as exc:
        damage.append(Damage(str(where(layout)), str(exc), ()))
        return None


def _file_problem(layout: RunLayout, entry: FileEntry, check_checksums: bool) -> str | None:
    problems = size_problems(layout, [entry])
    if problems:
        return problems[0].split(": ", 1)[-1]
    if not check_checksums:
        return None
    path = entry.location(layout)
    try:
        if checksum_file(path) != entry.checksum:
            return "checksum differs from the one recorded when it was written"
        name, version = file_schema(path)
        if (name, version) != (entry.schema, entry.schema_version):
            listed = f"{entry.schema!r} v{entry.schema_version}"
            return f"holds {name!r} v{version}, inventoried as {listed}"
        if num_rows(path) != entry.rows:
            return f"{num_rows(path)} rows, inventoried with {entry.rows}"
    except (OSError, StoreError) as exc:
        return f"unreadable ({exc})"
    return None


def _shards_of(
    entry: FileEntry, inventories: dict[int, ShardInventory], manifest: RunManifest
) -> tuple[int, ...]:
    """The shards a damaged file holds: its shard's, a part's range, none for vocab."""
    m = _PART.search(entry.path)
    if m and manifest.shards_per_part:
        per_part, part = manifest.shards_per_part, int(m.group(1))
        n = len(manifest.shard_plan)
        return tuple(range(part * per_part, min(n, (part + 1) * per_part)))
    return tuple(s for s, i in inventories.items() if any(f.path == entry.path for f in i.files))


def damage_hint(layout: RunLayout, damage: list[Damage]) -> str:
    """One line: the first damaged file, how many more, and the repair command."""
    first = damage[0]
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    return (
        f"run {layout.run_id} is damaged: {first.path}: {first.problem}{more}; repair it "
        f"with: arrakis-ray verify {layout.store_root} {layout.run_id} --repair"
    )


def orphan_files(layout: RunLayout, harvest_only: bool = False) -> list:
    """Temp files left by a writer killed mid-write (``store/atomic.py`` names them);
    ``harvest_only``: those of the harvest's own files."""
    if not layout.root.is_dir():
        return []
    if harvest_only:  # the run directory itself holds the manifest and the vocabulary
        directories = [layout.root, *(d for n in _HARVEST_DIRS for d in _tree(layout.root / n))]
    else:
        directories = _tree(layout.root)
    return sorted(
        p for d in directories for p in d.iterdir() if _TEMP.match(p.name) and p.is_file()
    )


def _tree(root) -> list:
    """A directory and every directory below it (none if it does not exist)."""
    if not root.is_dir():
        return []
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


def remove_orphans(layout: RunLayout) -> int:
    """Delete the harvest's orphan temp files; only while holding the run's lease
    (``store/lease.py``), when no harvest of the run is writing. Returns how many."""
    orphans = orphan_files(layout, harvest_only=True)
    for path in orphans:
        path.unlink(missing_ok=True)
        log.info("removed %s (left by a killed writer)", path)
    return len(orphans)


def stray_files(layout: RunLayout, inventoried: set[str]) -> list[str]:
    """Parquet files under the harvest's directories that no inventory lists: copies,
    foreign files. Queries ignore them; ``verify`` names them."""
    found = []
    for name in ("activations", "tokens", "documents"):
        root = layout.root / name
        if root.is_dir():
            for path in root.rglob("*.parquet"):
                if relative_path(layout, path) not in inventoried and not _TEMP.match(path.name):
                    found.append(str(path))
    return sorted(found)
