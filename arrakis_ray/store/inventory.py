"""File inventories: a run lists the files it wrote, so readers trust exactly those.

A directory listing cannot tell a harvested file from a stray copy, a foreign file under
a shard's name, or a file swapped or flipped since. So every writer records what it
wrote, and readers read only what is recorded:

- ``completions/shard-NNNNN.json``: a shard's inventory, and its completion marker. It
  is written last (atomically), by whoever wrote the shard's last file, and lists every
  file of the shard: path, size, rows, schema name and version, and a checksum; and
  the nodes that harvested it (``harvest/placement.py`` decides where they run).
- ``completions/parts.json``: a compacted run's part files (``store/compact.py``).
- ``completions/vocab.json``: the vocabulary file.
- a tool's record ``tools/<tool>.json`` lists its result files (``manifest.ToolRecord``).

Opening a store checks each listed file's size (one stat); ``arrakis-ray verify``
(``store/verify.py``) reads every file back against its checksum (``store/checksum.py``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

from arrakis_ray.config import build_dataclass, to_dict
from arrakis_ray.errors import ConfigError, StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import StorePath, is_remote

log = logging.getLogger(__name__)

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

    def __post_init__(self) -> None:
        # an inventory names files inside its own run: never another run's, nor outside
        parts = PurePosixPath(self.path).parts
        if not parts or self.path.startswith("/") or ".." in parts or "\\" in self.path:
            raise ValueError(f"file path {self.path!r} is not a path inside the run")
        if self.bytes < 0 or self.rows < 0:
            raise ValueError(f"file {self.path!r}: negative size or row count")

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
    nodes: tuple[str, ...] = ()
    """The Ray node id of the actor that ran each pipeline stage on the shard, in stage
    order (one for a replica harvest). Empty: harvested outside Ray, or by an
    arrakis-ray that did not record it."""
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
    inventory = _parse(ShardInventory, read_json(path), path)
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
    return _parse(PartsInventory, read_json(path), path)


def read_vocab_inventory(layout: RunLayout) -> FileEntry | None:
    path = vocab_inventory_path(layout)
    if not path.exists():
        return None
    return _parse(FileEntry, read_json(path), path)


_ENTRY_TYPES = {
    "path": str, "bytes": int, "rows": int, "schema": str, "schema_version": int, "checksum": str
}  # fmt: skip


def file_entries(raw: Any, where: str) -> tuple[FileEntry, ...]:
    """File entries from JSON (an inventory's ``files``, the list a pipeline stage hands
    on); StoreError naming ``where``. Checked by hand, not by ``build_dataclass``: a
    store's open parses every entry of every inventory, thousands of them."""
    if not isinstance(raw, list):
        raise StoreError(f"{where}: corrupt inventory: files: expected a list")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or item.keys() != _ENTRY_TYPES.keys():
            raise StoreError(
                f"{where}: corrupt inventory: files[{i}]: expected the keys "
                f"{', '.join(_ENTRY_TYPES)}"
            )
        for key, kind in _ENTRY_TYPES.items():
            if not isinstance(item[key], kind) or isinstance(item[key], bool):
                raise StoreError(
                    f"{where}: corrupt inventory: files[{i}].{key}: {item[key]!r} is not "
                    f"{'an integer' if kind is int else 'a string'}"
                )
        try:
            entries.append(FileEntry(**item))
        except ValueError as exc:
            raise StoreError(f"{where}: corrupt inventory: files[{i}]: {exc}") from None
    return tuple(entries)


def table_of(path: str) -> str:
    """The table a file of a run belongs to, from its path: ``tokens``, ``vocab``,
    ``documents``, ``activations/<family>`` or ``results/<output>``."""
    parts = path.split("/")
    if parts[0] in ("activations", "results") and len(parts) > 2:
        return f"{parts[0]}/{parts[1]}"
    return "vocab" if path == "vocab.parquet" else parts[0]


def table_schema(path: str) -> str:
    """The schema name a file at ``path`` (relative to its run) must hold: ``tokens``,
    ``vocab``, ``documents``, ``activation.<kind>`` of its family, ``result.<output>``."""
    from arrakis_ray.store.layout import family_kind
    from arrakis_ray.store.schemas import activation_schema_name

    table = table_of(path)
    if table.startswith("activations/"):
        return activation_schema_name(family_kind(table.split("/")[1]))
    if table.startswith("results/"):
        return f"result.{table.split('/')[1]}"
    return table


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


MAX_READ_AT_OPEN = 32
"""Files newer than their inventories whose checksums an open reads; past this many
(a store copied without its mtimes) it reads none and says to run ``verify``."""


def size_problems(
    layout: RunLayout, entries: list[FileEntry], listed_at: dict[str, int] | None = None
) -> list[str]:
    """What is wrong with the files by their sizes (missing, or not the recorded size);
    one line per file. Cheap: a stat each on a local disk, one listing of the run on an
    object store (a stat there is a request per file). Checksums are ``verify``'s,
    except for a file changed after the inventory listing it was written (``listed_at``:
    path -> the inventory's mtime in ns), which is read back: an edit in place keeps the
    size, not the mtime."""
    problems, newer = [], []
    sizes = _remote_sizes(layout) if is_remote(layout.root) else None
    root = str(layout.root)
    for entry in entries:
        # a string, not a Path: building thousands of Paths was a third of an open
        path = f"{root}/{entry.path}"
        if sizes is not None:
            size, mtime = sizes.get(entry.path), None
            if size is None:
                problems.append(f"{path}: file is missing")
                continue
        else:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                problems.append(f"{path}: file is missing")
                continue
            except OSError as e:
                problems.append(f"{path}: cannot be read ({e.strerror or e})")
                continue
            size, mtime = stat.st_size, stat.st_mtime_ns
        if size != entry.bytes:
            problems.append(f"{path}: {size} bytes, but {entry.bytes} were written")
        elif listed_at is not None and mtime > listed_at.get(entry.path, mtime):
            newer.append((path, entry))
    if len(newer) > MAX_READ_AT_OPEN:
        log.warning(
            "run %s: %d files are newer than their inventories (a copy that did not keep "
            "mtimes?): their checksums are not read at open; run arrakis-ray verify",
            layout.run_id, len(newer),
        )  # fmt: skip
        newer = []
    for path, entry in newer:
        try:
            if checksum_file(entry.location(layout)) != entry.checksum:
                problems.append(f"{path}: changed since it was written (its checksum differs)")
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e.strerror or e})")
    return problems


def _remote_sizes(layout: RunLayout) -> dict[str, int]:
    """Path (relative to the run) -> size of every object under a run on an object store."""
    root = layout.root.path.rstrip("/")
    try:
        found = layout.root.fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(root) + 1 :]: info.get("size", 0) for name, info in found.items()}


def _parse(cls: type, data: Any, path: StorePath) -> Any:
    files = None
    if isinstance(data, dict) and "files" in data:
        data = dict(data)
        files = file_entries(data["files"], str(path))
        data["files"] = []  # parsed above
    try:
        value = build_dataclass(cls, data, str(path), "")
    except ConfigError as exc:
        raise StoreError(f"corrupt inventory: {exc}") from None
    if files is not None:
        value = replace(value, files=files)
    if getattr(value, "version", INVENTORY_VERSION) > INVENTORY_VERSION:
        raise StoreError(
            f"{path}: inventory version {value.version} is newer than this arrakis-ray "
            f"(knows {INVENTORY_VERSION}); upgrade arrakis-ray to read this run"
        )
    return value


def read_json(path: StorePath, what: str = "inventory", missing: str | None = None) -> Any:
    """A small JSON file of the store (an inventory, a manifest, a tool record);
    StoreError naming it if it is missing or does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: {missing or what + ' is missing'}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: corrupt {what} ({e})") from None


def _write_json(path: StorePath, data: dict) -> None:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
