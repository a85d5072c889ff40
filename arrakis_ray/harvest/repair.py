"""``arrakis-ray verify STORE [RUN] [--repair]``: check runs against their inventories
(``store/verify.py``), and repair them by harvesting exactly the damaged shards again.

A repair first plans the run's own config: if it no longer names the same run (the data
or the model changed since), nothing is touched and the message says so. Then, under the
run's harvest lease, it deletes the temp files of killed writers, the damaged parts and
vocabulary, and the inventories of the damaged shards (their files are rewritten); a
compacted run whose parts' inventory is lost has every part deleted, since no part can
be trusted without it. The harvest of the run's config then redoes those shards only,
writes the missing parts again from them and removes the shard files the parts make
redundant. Damaged tool results are reported with the command that writes them again;
the harvest cannot rebuild them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ArrakisError, StoreError
from arrakis_ray.store import compact
from arrakis_ray.store.inventory import parts_inventory_path, vocab_inventory_path
from arrakis_ray.store.layout import RunLayout, list_run_ids, open_store, resolve_run
from arrakis_ray.store.lease import harvest_lease
from arrakis_ray.store.manifest import read_manifest
from arrakis_ray.store.verify import Damage, RunCheck, check_run, orphan_files, remove_orphans

log = logging.getLogger(__name__)

ORPHAN_AGE_S = 300
"""A temp file outside the harvest's directories (a tool's result being written) is an
orphan once untouched this long: a live writer keeps touching its file."""


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
                shards = repair_run(layout, check)
                check = check_run(layout)
                check.repaired_shards = shards
            except ArrakisError as exc:
                check.repair_error = str(exc)
        checks.append(check)
    return checks


def repair_run(layout: RunLayout, check: RunCheck) -> int:
    """Delete what is damaged and harvest it again; returns the shards redone."""
    from arrakis_ray.harvest.driver import harvest  # the harvest imports the store
    from arrakis_ray.harvest.plan import plan_run

    manifest = read_manifest(layout)
    config = pipeline_from_dict(manifest.config, source=str(layout.manifest_path))
    if check.damage:
        planned = plan_run(config).run_id  # refuses before anything is deleted
        if planned != layout.run_id:
            raise StoreError(
                f"run {layout.run_id}: its config now names run {planned} (its data or model "
                "changed since it was harvested), so its shards cannot be harvested again "
                "identically; harvest the config into a new run instead"
            )
    shards = sorted({s for d in check.damage for s in d.shards})
    with harvest_lease(layout):
        remove_orphans(layout)
        _remove_old_orphans(layout)
        for damage in check.damage:
            _remove_damaged(layout, damage)
        for shard in shards:
            layout.completion_marker(shard).unlink(missing_ok=True)
    if check.damage:
        harvest(config, layout.store_root)
    return len(shards)


def _remove_damaged(layout: RunLayout, damage: Damage) -> None:
    """Delete a damaged part, vocabulary or inventory (the harvest writes them again; a
    shard's own files are overwritten when it is redone). Without the parts' inventory
    no part can be trusted: all go, and are written again from the redone shards."""
    path = Path(damage.path)
    vocab, parts = Path(str(layout.vocab_path)), Path(str(parts_inventory_path(layout)))
    if path.name.startswith("part-") or path in (vocab, parts):
        path.unlink(missing_ok=True)
    if path == vocab:
        vocab_inventory_path(layout).unlink(missing_ok=True)
    if path == Path(str(vocab_inventory_path(layout))):
        path.unlink(missing_ok=True)
    if path == parts:
        for directory in compact.block_directories(layout):
            for part in directory.glob("part-*.parquet"):
                part.unlink()


def _remove_old_orphans(layout: RunLayout) -> None:
    now = time.time()
    for path in orphan_files(layout):
        try:
            if now - path.stat().st_mtime > ORPHAN_AGE_S:
                path.unlink()
        except FileNotFoundError:
            pass
