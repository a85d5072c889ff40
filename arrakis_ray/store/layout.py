"""Where things live in a store: the marker, runs, shards, completion markers.

A store is a directory (local, or an object-store URI: ``store/location.py``) holding
``arrakis-store.json`` and ``runs/<run_id>/``; the full layout is documented in
``schemas/README.md``. Only paths are computed here, nothing is read or written except
the marker.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from arrakis_ray import hooks
from arrakis_ray.errors import StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.location import (
    StorePath,
    check_bucket,
    is_uri,
    make_dirs,
    store_path,
)

log = logging.getLogger(__name__)

STORE_MARKER = "arrakis-store.json"
STORE_FORMAT = "arrakis-ray-store"
STORE_VERSION = 3  # layout version this code reads and writes
# Version 1 kept one file per (family, shard) with every dimension as a column: at LLM
# widths (14,336 columns) each footer was ~1.8 MB and every query parsed all of them.
# Version 2 had column blocks but empty completion markers: a reader globbed the files,
# so a stray copy was read twice and a deleted file went unnoticed. Version 3 lists
# every file in an inventory (``store/inventory.py``) and reads only those.
_VERSION_CHANGES = {
    1: "one wide file per shard, no file inventories",
    2: "no file inventories",
}
MIGRATE_HINT = "arrakis-ray migrate {root}"

BLOCK_DIMS = 512
"""Dimensions per column block of a dense family (schemas/README.md, "Layout"): a
one-neuron query opens only the files of its (layer, block), whose footers stay small."""

# Families, kinds and hook <-> family maps are all derived from arrakis_ray.hooks
# (re-exported here, where the store's users have always found them).
FAMILY_KIND = hooks.FAMILY_KIND
"""Family -> storage kind (which activation schema its rows follow)."""
hook_family = hooks.hook_family
family_kind = hooks.family_kind
hook_layer = hooks.hook_layer

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD_DONE = re.compile(r"^shard-(\d+)\.json$")


def store_version(root: StorePath) -> int:
    """The layout version in a store's marker (for ``migrate``, which reads old ones)."""
    marker = root / STORE_MARKER
    try:
        version = json.loads(marker.read_text()).get("version")
    except (OSError, ValueError, AttributeError) as e:
        raise StoreError(f"{marker}: unreadable store marker ({e})") from None
    if not isinstance(version, int):
        raise StoreError(f"{marker}: no layout version")
    return version


def write_store_marker(root: StorePath, version: int = STORE_VERSION) -> None:
    with atomic_open(root / STORE_MARKER, "w") as f:
        f.write(json.dumps({"format": STORE_FORMAT, "version": version}) + "\n")


def n_blocks(kind: str, width: int | None) -> int:
    """Column blocks of a family: dense ones are cut every BLOCK_DIMS dimensions."""
    if kind != "dense" or not width:
        return 1
    return -(-width // BLOCK_DIMS)


def block_width(kind: str, width: int | None) -> int | None:
    """Columns ``d0..`` of each block file: the whole width when it fits in one block,
    else BLOCK_DIMS (the last block is padded with null columns, so that every block
    file of a family has one schema and one SQL view reads them all)."""
    if kind != "dense" or width is None or width <= BLOCK_DIMS:
        return width
    return BLOCK_DIMS


def _read_marker(root: StorePath) -> None:
    marker = root / STORE_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{marker}: unreadable store marker ({e})") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{marker}: not an arrakis-ray store marker (format {STORE_FORMAT!r})")
    version = data.get("version")
    if not isinstance(version, int) or version > STORE_VERSION:
        raise StoreError(
            f"{root}: store layout version {version!r} is newer than this arrakis-ray "
            f"(knows version {STORE_VERSION})"
        )
    if version < STORE_VERSION:
        raise StoreError(
            f"{root}: store layout version {version} ({_VERSION_CHANGES.get(version, 'old')})"
            f" is not read by this arrakis-ray (version {STORE_VERSION}); convert it in "
            f"place with: {MIGRATE_HINT.format(root=root)}"
        )


def _store_in_creation(entry: StorePath) -> bool:
    """An entry that another process creating the same store may have made already."""
    if entry.name == "runs":
        return entry.is_dir() and not any(entry.iterdir())
    return entry.name.startswith(f".{STORE_MARKER}.tmp")


def init_store(root: str | Path) -> StorePath:
    """Create a store at ``root`` (or open the one there); returns its absolute path.

    An existing non-empty directory without the marker is refused: a store is never
    adopted by accident on top of unrelated files. Two processes creating the same new
    store at once both succeed (each writes the same marker atomically).
    """
    path = store_path(root)
    check_bucket(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory")
    if (path / STORE_MARKER).exists():
        _read_marker(path)
        return path
    if path.is_dir() and any(not _store_in_creation(p) for p in path.iterdir()):
        raise StoreError(
            f"{path} is a non-empty directory without {STORE_MARKER}: refusing to make it a "
            "store (choose a new or empty directory)"
        )
    make_dirs(path / "runs")
    write_store_marker(path)
    log.info("created store %s", path)
    return path


def open_store(root: str | Path) -> StorePath:
    """Absolute path of an existing store; StoreError if ``root`` is not one."""
    path = store_path(root)
    check_bucket(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if not (path / STORE_MARKER).is_file():
        raise StoreError(f"{path} is not an arrakis-ray store (no {STORE_MARKER})")
    _read_marker(path)
    return path


def list_run_ids(store_root: StorePath) -> list[str]:
    """Sorted ids of the run directories of a store (hidden and odd names skipped)."""
    runs = store_root / "runs"
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and _RUN_ID.match(p.name))


class RunLayout:
    """Paths of one run: ``<store>/runs/<run_id>/`` and everything under it."""

    def __init__(self, store_root: str | Path, run_id: str) -> None:
        # The run id becomes a path component and a glob match: keep it to a safe alphabet.
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise StoreError(
                f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        self.store_root = store_path(store_root)
        self.run_id = run_id
        self.root = self.store_root / "runs" / run_id
        self.manifest_path = self.root / "manifest.json"
        self.vocab_path = self.root / "vocab.parquet"
        self.tokens_dir = self.root / "tokens"
        self.activations_root = self.root / "activations"
        self.completions_dir = self.root / "completions"
        self.documents_dir = self.root / "documents"
        self.results_root = self.root / "results"
        self.tool_records_dir = self.root / "tools"

    def __repr__(self) -> str:
        return f"RunLayout({str(self.store_root)!r}, {self.run_id!r})"

    def activation_dir(self, family: str) -> StorePath:
        """Directory of one hook family: ``layer=L/block=B/`` directories below it."""
        family_kind(family)  # refuse a typo before it becomes a directory
        return self.activations_root / family

    def block_dir(self, family: str, layer: int, block: int) -> StorePath:
        """Directory of one (layer, column block) of a family, hive-style so that SQL
        prunes files by path: ``activations/mlp_post/layer=6/block=2/``."""
        return self.activation_dir(family) / f"layer={int(layer)}" / f"block={int(block)}"

    def part_file(self, directory: StorePath, part: int) -> StorePath:
        """A compacted file of ``directory``: shards ``part * P .. part * P + P - 1``
        merged (P = the manifest's ``shards_per_part``)."""
        return directory / f"part-{part:05d}.parquet"

    def results_dir(self, tool: str) -> StorePath:
        """Directory of one tool output's results (a directory per call inside it)."""
        return self.results_root / self.checked_name(tool, "tool name")

    @staticmethod
    def checked_name(name: str, what: str) -> str:
        """``name`` if it is safe as one path segment (letters, digits, ``._-``)."""
        if not _RUN_ID.match(name):
            raise StoreError(f"invalid {what} {name!r} for a results directory")
        return name

    def result_files(self, output: str) -> list[StorePath]:
        """The Parquet files of one tool output, in shard order (none: not computed)."""
        directory = self.results_dir(output)
        return sorted(directory.glob("shard-*.parquet")) if directory.is_dir() else []

    def tool_record_path(self, tool: str) -> StorePath:
        """JSON record of a tool's last call on this run (``store/manifest.py``)."""
        if not _RUN_ID.match(tool):
            raise StoreError(f"invalid tool name {tool!r} for a tool record")
        return self.tool_records_dir / f"{tool}.json"

    def shard_file(self, directory: StorePath, shard: int) -> StorePath:
        """Parquet file of shard number ``shard`` in ``directory``."""
        return directory / f"shard-{shard:05d}.parquet"

    def completion_marker(self, shard: int) -> StorePath:
        """The inventory of shard ``shard`` (``store/inventory.py``): written last, its
        presence says the shard was fully written."""
        return self.completions_dir / f"shard-{shard:05d}.json"

    def completed_shards(self) -> set[int]:
        """Shard numbers whose completion marker (inventory) exists."""
        if not self.completions_dir.is_dir():
            return set()
        done = set()
        for p in self.completions_dir.iterdir():
            m = _SHARD_DONE.match(p.name)
            if m:
                done.add(int(m.group(1)))
        return done


def resolve_run(run: str | Path, store: str | Path | None = None) -> RunLayout:
    """Layout of a run given as its directory (``.../runs/<id>``) or its id plus a store.

    A unique prefix of a run id is accepted (run ids are long content hashes).
    """
    path = store_path(run) if is_uri(run) else Path(run).expanduser()
    if path.is_dir() and (store is None or len(path.parts) > 1):
        path = store_path(path)
        if path.parent.name != "runs":
            raise StoreError(f"{path} is not a run directory (expected <store>/runs/<run_id>)")
        root = open_store(path.parent.parent)
        return RunLayout(root, path.name)
    if store is None:
        raise StoreError(f"run {str(run)!r} is not a run directory; give the store as well")
    root = open_store(store)
    run_id = str(run)
    known = list_run_ids(root)
    if run_id in known:
        return RunLayout(root, run_id)
    matches = [r for r in known if r.startswith(run_id)] if run_id else []
    if len(matches) == 1:
        return RunLayout(root, matches[0])
    if len(matches) > 1:
        raise StoreError(
            f"run {run_id!r} is ambiguous in {root}: matches {', '.join(matches[:5])}"
            + (" ..." if len(matches) > 5 else "")
        )
    hint = ", ".join(known[:5]) + (f" ... ({len(known)} runs)" if len(known) > 5 else "")
    raise StoreError(f"no run {run_id!r} in {root} (runs: {hint or 'none'})")
