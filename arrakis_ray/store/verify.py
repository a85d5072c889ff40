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
from dataclasses import dataclass, field

from arrakis_ray.errors import StoreError
from arrakis_ray.store import schemas
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
    table_schema,
    vocab_inventory_path,
)
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import RunManifest, read_manifest, split_record_key
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
    all_shards = tuple(s.shard for s in manifest.shard_plan)
    if manifest.status == "complete":
        missing = sorted(set(all_shards) - layout.completed_shards())
        for shard in missing:
            where = str(layout.completion_marker(shard))
            damage.append(Damage(where, "inventory is missing from a complete run", (shard,)))
    vocab = _read_or_note(read_vocab_inventory, vocab_inventory_path, layout, damage, ())
    if vocab is None and inventories and not vocab_inventory_path(layout).exists():
        # written before any shard: a run with shards and no vocabulary lost it
        damage.append(Damage(str(vocab_inventory_path(layout)), "inventory is missing", ()))
    parts = None
    if manifest.shards_per_part is not None:  # the run reads its parts: all shards in them
        parts = _read_or_note(
            read_parts_inventory, parts_inventory_path, layout, damage, all_shards
        )
        if parts is None and not parts_inventory_path(layout).exists():
            where = str(parts_inventory_path(layout))
            damage.append(Damage(where, "inventory of a compacted run is missing", all_shards))
    for entry in harvest_files(layout, inventories, parts, vocab):
        problem = _table_problem(entry) or _file_problem(layout, entry, check_checksums)
        if problem:
            shards = _shards_of(entry, inventories, manifest)
            damage.append(Damage(str(entry.location(layout)), problem, shards))
    for shard, inventory in inventories.items():
        for entry in inventory.files:
            if entry.schema == "activation.dense" and entry.rows != inventory.tokens:
                problem = f"{entry.rows} rows, but the shard has {inventory.tokens} tokens"
                damage.append(Damage(str(entry.location(layout)), problem, (shard,)))
    return damage


def _read_or_note(read, where, layout: RunLayout, damage: list[Damage], shards: tuple):
    """``read(layout)``, or None with the damage noted if it does not parse (a repair
    deletes it and harvests ``shards`` again)."""
    try:
        return read(layout)
    except StoreError as exc:
        damage.append(Damage(str(where(layout)), str(exc), shards))
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
        rows = num_rows(path)
        if rows != entry.rows:
            return f"{rows} rows, inventoried with {entry.rows}"
    except (OSError, StoreError) as exc:
        return f"unreadable: {str(exc).removeprefix(f'{path}: ')}"
    return None


def _table_problem(entry: FileEntry) -> str | None:
    """An entry whose recorded table is not the one its directory holds, or newer than
    this arrakis-ray reads (the catalog refuses both: ``Store._checked_files``)."""
    expected = table_schema(entry.path)
    if entry.schema != expected:
        return f"inventoried as table {entry.schema!r}, but its directory holds {expected!r}"
    try:
        known = schemas.load_schema(expected).version
    except StoreError:
        return None  # a tool whose schema this install lacks: the catalog only warns
    if entry.schema_version > known:
        return f"schema v{entry.schema_version} is newer than this arrakis-ray (v{known})"
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
    return damaged_run(layout, [f"{d.path}: {d.problem}" for d in damage])


def damaged_run(layout: RunLayout, problems: list[str]) -> str:
    """The one line that refuses a damaged run: its first problem, how many more, and
    the command that repairs it."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (
        f"run {layout.run_id} is damaged: {problems[0]}{more}; repair it with: "
        f"arrakis-ray verify {layout.store_root} {layout.run_id} --repair"
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


@dataclass
class RunCheck:
    """What ``verify`` found in one run, and what a repair did."""

    run_id: str
    damage: list[Damage] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    """Damaged tool result files, each with the command that writes them again."""
    orphans: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    repaired_shards: int = 0
    repair_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damage and not self.results


def check_run(layout: RunLayout) -> RunCheck:
    """Read every file of a run back against its inventory (changes nothing)."""
    check = RunCheck(layout.run_id)
    check.orphans = [str(p) for p in orphan_files(layout)]
    try:
        manifest = read_manifest(layout)
    except StoreError as exc:
        check.damage.append(Damage(str(layout.manifest_path), str(exc), ()))
        return check
    check.damage = run_damage(layout, manifest, check_checksums=True)
    check.results = _result_damage(layout, manifest)
    check.strays = stray_files(layout, _inventoried_paths(layout))
    return check


def _result_damage(layout: RunLayout, manifest: RunManifest) -> list[str]:
    problems = []
    for key, record in sorted(manifest.results.items()):
        tool, variant = split_record_key(key)
        again = f"arrakis-ray analyze {layout.root} --tool {tool}"
        if variant is not None:  # a sweep's setting: its sweep reruns it with those params
            again = f"{again} with that sweep's parameters (rerun the sweep)"
        for entry in record.files:
            problem = _table_problem(entry) or _file_problem(layout, entry, True)
            if problem:
                problems.append(
                    f"{entry.location(layout)}: {problem} (write it again with: {again})"
                )
    return problems


def _inventoried_paths(layout: RunLayout) -> set[str]:
    """Every path an inventory of the run names (shard files a compaction removed too);
    inventories that do not parse are damage, reported by ``run_damage``."""
    paths: set[str] = set()
    for shard in layout.completed_shards():
        try:
            paths |= {f.path for f in read_shard_inventory(layout, shard).files}
        except StoreError:
            continue
    for read in (read_parts_inventory, read_vocab_inventory):
        try:
            found = read(layout)
        except StoreError:
            continue
        if found is not None:
            paths |= {f.path for f in getattr(found, "files", (found,))}
    return paths
