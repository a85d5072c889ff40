"""``arrakis-ray verify STORE [RUN] [--repair]``: check runs against their inventories,
and repair them by harvesting exactly the damaged shards again.

``store/verify.py`` finds the damage. A repair, for each damaged run, under the run's
harvest lease: deletes the temp files of killed writers, the damaged parts and
vocabulary, and the inventories of the damaged shards (their files are rewritten); then
it runs the harvest of the run's own config, which redoes those shards only, writes the
missing parts again from them and removes the shard files the parts make redundant.
A run whose inputs changed since (its config no longer names the same run) is not
repaired: the message says so. Damaged tool results are reported with the tool to
run again; the harvest cannot rebuild them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ArrakisError, StoreError
from arrakis_ray.store import compact
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.inventory import (
    PartsInventory,
    describe_file,
    harvest_files,
    parts_inventory_path,
    read_parts_inventory,
    read_shard_inventories,
    read_vocab_inventory,
    size_problems,
    vocab_inventory_path,
    write_parts_inventory,
)
from arrakis_ray.store.layout import RunLayout, list_run_ids, open_store, resolve_run
from arrakis_ray.store.lease import harvest_lease
from arrakis_ray.store.manifest import RunManifest, read_manifest
from arrakis_ray.store.verify import (
    Damage,
    orphan_files,
    remove_orphans,
    run_damage,
    stray_files,
)

log = logging.getLogger(__name__)

ORPHAN_AGE_S = 300
"""A temp file outside the harvest's directories (a tool's result being written) is an
orphan once untouched this long: a live writer keeps touching its file."""


@dataclass
class RunCheck:
    """What ``verify`` found in one run, and what a repair did."""

    run_id: str
    damage: list[Damage] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    """Damaged tool result files, each with the tool to run again."""
    orphans: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    repaired_shards: int = 0
    repair_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damage and not self.results


def verify_store(store: str | Path, run: str | None = None, repair: bool = False) -> list[RunCheck]:
    """Check every run of ``store`` (or only ``run``), reading every file back against its
    inventory; with ``repair``, mend what the harvest can rebuild."""
    root = open_store(store)
    layouts = [resolve_run(run, root)] if run else [RunLayout(root, r) for r in list_run_ids(root)]
    checks = []
    for layout in layouts:
        check = check_run(layout)
        if repair and (check.damage or check.orphans):
            try:
                check.repaired_shards = repair_run(layout, check)
                check = _recheck(layout, check)
            except ArrakisError as exc:
                check.repair_error = str(exc)
        checks.append(check)
    return checks


def check_run(layout: RunLayout) -> RunCheck:
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


def repair_run(layout: RunLayout, check: RunCheck) -> int:
    """Delete what is damaged and harvest it again; returns the shards redone."""
    from arrakis_ray.harvest.driver import harvest  # the harvest imports the store

    manifest = read_manifest(layout)
    config = pipeline_from_dict(manifest.config, source=str(layout.manifest_path))
    shards = sorted({s for d in check.damage for s in d.shards})
    with harvest_lease(layout):
        remove_orphans(layout)
        _remove_old_orphans(layout)
        for damage in check.damage:
            _remove_damaged(layout, damage)
        if manifest.shards_per_part is not None and _parts_or_none(layout) is None:
            _rebuild_parts_inventory(layout, manifest)
        for shard in shards:
            layout.completion_marker(shard).unlink(missing_ok=True)
    if check.damage:
        result = harvest(config, layout.store_root)
        if result.run_id != layout.run_id:  # pragma: no cover - plan_run names it first
            raise StoreError(f"repair of run {layout.run_id} harvested run {result.run_id}")
    return len(shards)


def _parts_or_none(layout: RunLayout) -> PartsInventory | None:
    try:
        return read_parts_inventory(layout)
    except StoreError:  # a damaged parts.json: deleted by now, rebuilt below
        return None


def _remove_damaged(layout: RunLayout, damage: Damage) -> None:
    """Delete a damaged part or vocabulary (the harvest writes them again); a shard's
    files are overwritten when it is redone, an inventory that does not parse goes."""
    path = Path(damage.path)
    if path.name.startswith("part-") or path == Path(str(layout.vocab_path)):
        path.unlink(missing_ok=True)
    if path == Path(str(layout.vocab_path)):
        vocab_inventory_path(layout).unlink(missing_ok=True)
    if path in (Path(str(parts_inventory_path(layout))), Path(str(vocab_inventory_path(layout)))):
        path.unlink(missing_ok=True)


def _rebuild_parts_inventory(layout: RunLayout, manifest: RunManifest) -> None:
    """A compacted run whose parts.json was lost: its parts, read back (the damaged ones
    are gone by now and are written again by the harvest)."""
    n_shards = len(manifest.shard_plan)
    entries = []
    for directory in compact.block_directories(layout):
        for part in range(-(-n_shards // manifest.shards_per_part)):
            path = layout.part_file(directory, part)
            if path.exists():
                entries.append(describe_file(layout, path))
    write_parts_inventory(layout, PartsInventory(manifest.shards_per_part, tuple(entries)))


def _remove_old_orphans(layout: RunLayout) -> None:
    now = time.time()
    for path in orphan_files(layout):
        try:
            if now - path.stat().st_mtime > ORPHAN_AGE_S:
                path.unlink()
        except FileNotFoundError:
            pass


def _recheck(layout: RunLayout, before: RunCheck) -> RunCheck:
    after = check_run(layout)
    after.repaired_shards = before.repaired_shards
    return after


def _result_damage(layout: RunLayout, manifest: RunManifest) -> list[str]:
    problems = []
    for tool, record in sorted(manifest.results.items()):
        for entry in record.files:
            path = entry.location(layout)
            problem = next(iter(size_problems(layout, [entry])), None)
            if problem is None and checksum_file(path) != entry.checksum:
                problem = f"{path}: checksum differs from the one recorded when it was written"
            if problem:
                problems.append(f"{problem} (run the tool again: arrakis-ray analyze ... {tool})")
    return problems


def _inventoried_paths(layout: RunLayout) -> set[str]:
    """Every path any inventory of the run names (shard files a compaction removed too)."""
    try:
        shards = read_shard_inventories(layout)
        parts = read_parts_inventory(layout)
        vocab = read_vocab_inventory(layout)
    except StoreError:
        return set()
    paths = {f.path for inventory in shards.values() for f in inventory.files}
    return paths | {f.path for f in harvest_files(layout, shards, parts, vocab)}
