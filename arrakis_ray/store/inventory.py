"""File inventories: a run lists the files it wrote, so readers trust exactly those.

A directory listing cannot tell a harvested file from a stray copy, a foreign file under
a shard's name, or a file swapped or flipped since. So every writer records what it
wrote, and readers read only what is recorded:

- ``completions/shard-NNNNN.json``: a shard's inventory, and its completion marker. It
  is written last (atomically), by whoever wrote the shard's last file, and lists every
  file of the shard: path, size, rows, schema name and version, and a checksum.
- ``completions/parts.json``: a compacted run's part files (``store/compact.py``).
- ``completions/vocab.json``: the vocabulary file.
- a tool's record ``tools/<tool>.json`` lists its result files (``manifest.ToolRecord``).

Opening a store checks each listed file's size (one stat); ``arrakis-ray verify``
(``store/verify.py``) reads every file back against its checksum (``store/checksum.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from arrakis_ray.config import build_dataclass, to_dict
from arrakis_ray.errors import ConfigError, StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import StorePath

INVENTORY_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """One file a run wrote, as it was when written."""

    path: str
    """Relative to the run directory, with ``/`` separators."""
    bytes: int
    rows: int
    schema: str
    """The table's schema name (``tokens``, ``activation.dense``, ``result.<output>``)."""
    schema_version: int
    checksum: str
    """``xxh3_128:<hex>`` of the file's bytes."""

    def location(self, layout: RunLayout) -> StorePath:
        """Where the file lies."""
        return layout.root.joinpath(*PurePosixPath(self.path).parts)


@dataclass(frozen=True)
class ShardInventory:
    """A finished shard: its files and what harvesting it cost."""

    shard: int
    files: tuple[FileEntry, ...]
    tokens: int
    sequences: int
    seconds: float
    """Time the shard spent in the harvest actors (all stages)."""
    call: str | None
    """Start time of the harvest call that wrote it: groups shards into calls (None:
    inventoried by ``migrate``, or written outside a harvest)."""
    finished_at: str
    version: int = INVENTORY_VERSION

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class PartsInventory:
    """A compacted run's part files (every ``layer=L/block=B`` directory's parts)."""

    shards_per_part: int
    files: tuple[FileEntry, ...] = field(default=())
    version: int = INVENTORY_VERSION


def parts_inventory_path(layout: RunLayout) -> StorePath:
    return layout.completions_dir / "parts.json"


def vocab_inventory_path(layout: RunLayout) -> StorePath:
    return layout.completions_dir / "vocab.json"


def write_shard_inventory(layout: RunLayout, inventory: ShardInventory) -> None:
    """Mark a shard complete: its inventory, atomically, after all its files."""
    _write_json(layout.completion_marker(inventory.shard), to_dict(inventory))


def write_parts_inventory(layout: RunLayout, inventory: PartsInventory) -> None:
    _write_json(parts_inventory_path(layout), to_dict(inventory))


def write_vocab_inventory(layout: RunLayout, entry: FileEntry) -> None:
    _write_json(vocab_inventory_path(layout), to_dict(entry))


def read_shard_inventory(layout: RunLayout, shard: int) -> ShardInventory:
    path = layout.completion_marker(shard)
    inventory = _parse(ShardInventory, _read_json(path), path)
    if inventory.shard != shard:
        raise StoreError(f"{path}: inventory of shard {inventory.shard}, not {shard}")
    return inventory


def read_shard_inventories(layout: RunLayout) -> dict[int, ShardInventory]:
    """Every finished shard's inventory, by shard number."""
    return {s: read_shard_inventory(layout, s) for s in sorted(layout.completed_shards())}


def read_parts_inventory(layout: RunLayout) -> PartsInventory | None:
    """The parts of a compacted run (None: not compacted, or compaction not finished)."""
    path = parts_inventory_path(layout)
    if not path.exists():
        return None
    return _parse(PartsInventory, _read_json(path), path)


def read_vocab_inventory(layout: RunLayout) -> FileEntry | None:
    path = vocab_inventory_path(layout)
    if not path.exists():
        return None
    return _parse(FileEntry, _read_json(path), path)


def file_entries(raw: Any, where: str) -> tuple[FileEntry, ...]:
    """File entries from JSON (a tool record's ``files``); StoreError naming ``where``."""
    try:
        return tuple(build_dataclass(FileEntry, item, where, "files") for item in raw or ())
    except ConfigError as exc:
        raise StoreError(f"corrupt file list: {exc}") from None


def relative_path(layout: RunLayout, path: StorePath) -> str:
    """A path inside the run as an inventory spells it (``tokens/shard-00000.parquet``)."""
    root, text = str(layout.root).rstrip("/"), str(path)
    if not text.startswith(root + "/"):
        raise StoreError(f"{path} is not inside run {layout.run_id}")
    return text[len(root) + 1 :]


def describe_file(layout: RunLayout, path: StorePath) -> FileEntry:
    """The entry of a file already in the run, read back from it (``migrate``
    inventories the files of a store written before inventories)."""
    from arrakis_ray.store.parquet import file_schema, num_rows

    name, version = file_schema(path)
    if name is None or version is None:
        raise StoreError(f"{path}: no arrakis.schema metadata (not written by arrakis-ray)")
    return FileEntry(
        relative_path(layout, path),
        path.stat().st_size,
        num_rows(path),
        name,
        version,
        checksum_file(path),
    )


def harvest_files(
    layout: RunLayout,
    shards: dict[int, ShardInventory],
    parts: PartsInventory | None,
    vocab: FileEntry | None,
) -> list[FileEntry]:
    """The files a run's harvest holds now: the vocabulary, every finished shard's
    files, and once compacted, the parts in place of the shards' activation files."""
    files = [vocab] if vocab is not None else []
    for inventory in shards.values():
        for entry in inventory.files:
            if parts is None or not entry.path.startswith("activations/"):
                files.append(entry)
    if parts is not None:
        files += parts.files
    return files


def size_problems(
    layout: RunLayout, entries: list[FileEntry], listed_at: dict[str, int] | None = None
) -> list[str]:
    """What is wrong with the files by a stat each (missing, or not its recorded size);
    one line per file. Cheap: checksums are ``verify``'s, except for a file changed
    after the inventory listing it was written (``listed_at``: path -> the inventory's
    mtime in ns), which is read back: an edit in place keeps the size, not the mtime."""
    problems = []
    for entry in entries:
        path = entry.location(layout)
        try:
            stat = path.stat()
        except FileNotFoundError:
            problems.append(f"{path}: file is missing")
            continue
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e.strerror or e})")
            continue
        if stat.st_size != entry.bytes:
            problems.append(f"{path}: {stat.st_size} bytes, but {entry.bytes} were written")
        elif (
            listed_at is not None
            and stat.st_mtime_ns > listed_at.get(entry.path, stat.st_mtime_ns)
            and checksum_file(path) != entry.checksum
        ):
            problems.append(f"{path}: changed since it was written (its checksum differs)")
    return problems


def _parse(cls: type, data: Any, path: StorePath) -> Any:
    try:
        value = build_dataclass(cls, data, str(path), "")
    except ConfigError as exc:
        raise StoreError(f"corrupt inventory: {exc}") from None
    if getattr(value, "version", INVENTORY_VERSION) > INVENTORY_VERSION:
        raise StoreError(
            f"{path}: inventory version {value.version} is newer than this arrakis-ray "
            f"(knows {INVENTORY_VERSION}); upgrade arrakis-ray to read this run"
        )
    return value


def _read_json(path: StorePath) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: inventory is missing") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: corrupt inventory ({e})") from None


def _write_json(path: StorePath, data: dict) -> None:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
