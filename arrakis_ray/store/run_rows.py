"""What the catalog knows of one run: its ``runs`` row, its manifest, its files.

The catalog (``store/catalog.py``) builds the ``runs`` table from these rows and its
views from the files, which are exactly the run's inventoried ones
(``store/inventory.py``): the harvest's, and each tool record's results. Totals come
from the inventories too, so a resumed run counts the shards of a killed call, and temp
files or strays count nowhere.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from arrakis_ray.config import to_dict
from arrakis_ray.errors import StoreError
from arrakis_ray.store.history import harvest_calls
from arrakis_ray.store.inventory import (
    FileEntry,
    harvest_files,
    parts_inventory_path,
    read_parts_inventory,
    read_shard_inventories,
    read_vocab_inventory,
    size_problems,
    vocab_inventory_path,
)
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import is_remote
from arrakis_ray.store.manifest import RunManifest, read_manifest, split_record_key
from arrakis_ray.store.verify import damaged_run

log = logging.getLogger(__name__)

RUNS_COLUMNS = (
    ("run_id", "VARCHAR"),
    ("name", "VARCHAR"),
    ("status", "VARCHAR"),
    ("model", "VARCHAR"),
    ("arch", "VARCHAR"),
    ("n_sequences", "BIGINT"),
    ("n_tokens", "BIGINT"),
    ("hooks", "VARCHAR[]"),
    ("created_at", "VARCHAR"),
    ("tokens_per_s", "DOUBLE"),
    ("bytes", "BIGINT"),
    ("manifest", "VARCHAR"),
)


@dataclass(frozen=True)
class RunContents:
    """A run as the catalog reads it."""

    row: dict
    manifest: RunManifest | None
    """None: no readable manifest (the run gets a row and no views)."""
    files: tuple[FileEntry, ...]
    """Every file queries may read: the harvest's and the tools' results."""
    listed_at: dict[str, int] | None = None
    """Path -> mtime (ns) of the inventory listing it (None on an object store)."""
    variants: dict[str, str] = field(default_factory=dict)
    """Path -> variant of the result files a tool variant's record lists
    (``tools/<tool>.<variant>.json``: one setting of a tool among a sweep's)."""


def manifest_stamp(path: Path) -> tuple:
    """What changes when a manifest is rewritten (atomically, under a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def run_stamp(layout: RunLayout) -> tuple:
    """What changes when a run gains a shard, is compacted or gets a tool's results: its
    manifest, and the entries of its completions and tool records directories."""
    stamps = [manifest_stamp(layout.manifest_path)]
    for directory in (layout.completions_dir, layout.tool_records_dir):
        try:
            stamps.append(os.stat(directory).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def read_run(layout: RunLayout) -> RunContents:
    """A run's row, manifest and files; StoreError if an inventoried file is missing or
    of another size than written (checked again once: a compaction may have switched
    the run from shard files to parts between the reads)."""
    try:
        contents = _read_run(layout)
        problems = size_problems(layout, list(contents.files), contents.listed_at)
        if problems:
            contents = _read_run(layout)
            problems = size_problems(layout, list(contents.files), contents.listed_at)
    except StoreError as exc:  # an inventory that does not parse
        problems = [str(exc)]
    if problems:
        raise StoreError(damaged_run(layout, problems))
    return contents


def _read_run(layout: RunLayout) -> RunContents:
    row: dict = {"run_id": layout.run_id}
    try:
        manifest = read_manifest(layout)
    except StoreError as e:
        log.warning("%s", e)
        row["status"] = "no-manifest" if not layout.manifest_path.exists() else "corrupt-manifest"
        return RunContents(row, None, ())
    shards = read_shard_inventories(layout)
    parts = read_parts_inventory(layout) if manifest.shards_per_part is not None else None
    vocab = read_vocab_inventory(layout)
    files = harvest_files(layout, shards, parts, vocab)
    for record in manifest.results.values():
        files += record.files
    listed = [(layout.completion_marker(s), i.files) for s, i in shards.items()]
    listed += [(vocab_inventory_path(layout), [vocab])] if vocab is not None else []
    listed += [(parts_inventory_path(layout), parts.files)] if parts is not None else []
    listed += [(layout.tool_record_path(t), r.files) for t, r in manifest.results.items()]
    listed_at = None if is_remote(layout.root) else _listed_at(listed)
    variants = {
        entry.path: variant
        for key, record in manifest.results.items()
        if (variant := split_record_key(key)[1]) is not None
        for entry in record.files
    }
    calls = harvest_calls(shards, manifest.harvest.calls)
    n_tokens = sum(i.tokens for i in shards.values())
    seconds = sum(c.seconds for c in calls)
    row.update(
        name=manifest.name,
        status=manifest.status,
        model=manifest.model_source,
        arch=manifest.shape.arch,
        n_sequences=manifest.data.n_sequences,
        n_tokens=n_tokens if shards else manifest.harvest.n_tokens,
        hooks=list(manifest.hooks),
        created_at=manifest.created_at,
        tokens_per_s=round(n_tokens / seconds, 1) if seconds and shards else None,
        bytes=sum(f.bytes for f in files),
    )
    data = manifest.to_json()
    # the records without their file lists (the views hold those)
    data["results"] = {
        name: {k: v for k, v in to_dict(r).items() if k != "files"}
        for name, r in manifest.results.items()
    }
    row["manifest"] = json.dumps(data, sort_keys=True)
    return RunContents(row, manifest, tuple(files), listed_at, variants)


def _listed_at(listed: list[tuple[Path, tuple[FileEntry, ...]]]) -> dict[str, int]:
    """Path -> mtime of the inventory that lists the file: a file modified after it was
    listed has its checksum read at open (``inventory.size_problems``)."""
    times: dict[str, int] = {}
    for inventory_path, entries in listed:
        try:
            mtime = os.stat(inventory_path).st_mtime_ns
        except OSError:
            continue
        times.update((e.path, mtime) for e in entries)
    return times
