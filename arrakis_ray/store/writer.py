"""RunWriter: the one way anything writes into a run (the harvest, the tools, fixtures).

Every file is written atomically and checked against its versioned schema. The writer
remembers each file of a shard it wrote (size, rows, checksum); a shard's completion
marker is its inventory of those files (``store/inventory.py``), written last by whoever
wrote the shard's last file, so a marked shard is whole and readers read exactly its
files. The paths come from ``RunLayout``; nobody else spells a file name.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from arrakis_ray.errors import SchemaError, StoreError
from arrakis_ray.store import schemas
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.inventory import (
    FileEntry,
    ShardInventory,
    relative_path,
    write_shard_inventory,
    write_vocab_inventory,
)
from arrakis_ray.store.layout import (
    BLOCK_DIMS,
    RunLayout,
    block_width,
    family_kind,
    init_store,
    n_blocks,
)
from arrakis_ray.store.manifest import RunManifest, ToolRecord, write_manifest, write_tool_record
from arrakis_ray.store.parquet import WrittenFile, write_table

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa

    from arrakis_ray.store.location import StorePath


class RunWriter:
    """Writes the files of one run (``RunWriter(store, run_id)``; the store is created if
    it does not exist)."""

    def __init__(self, store_root: str | StorePath, run_id: str, create: bool = True) -> None:
        if create:
            store_root = init_store(store_root)
        self._start(RunLayout(store_root, run_id))

    @classmethod
    def for_layout(cls, layout: RunLayout, call: str | None = None) -> RunWriter:
        """A writer of an existing run; ``call``: the tool call whose artifacts it writes."""
        writer = cls.__new__(cls)
        writer._start(layout, call)
        return writer

    def _start(self, layout: RunLayout, call: str | None = None) -> None:
        self.layout = layout
        self.call = call
        # shard -> path -> entry of the files written for it and not yet inventoried
        # (a shard written again replaces its entries: the latest file is the one kept)
        self._written: dict[int, dict[str, FileEntry]] = {}
        self._lock = threading.Lock()  # the harvest writes a shard's files in threads

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    # ---------------------------------------------------------------- harvest tables

    def write_activations(
        self, family: str, shard: int, table: pa.Table, layer: int | None = None
    ) -> int:
        """One shard's table of a hook family (any of its layers, every dimension as a
        column ``d0..``), stored as one file per (layer, column block) and checked
        against its kind's schema. ``layer``: the table's one layer, so that a shard
        without rows still writes its (empty) files. Returns the bytes written."""
        kind = family_kind(family)
        name = schemas.activation_schema_name(kind)
        version = schemas.load_schema(name).version
        n_dims, dtype = schemas.stored_dims(table.schema)
        width = n_dims or None
        columns = block_width(kind, width)
        expected = schemas.activation_schema(kind, columns or 1, dtype)
        n_keys = table.num_columns - n_dims
        if kind == "dense" and table.column_names[n_keys:] != [f"d{i}" for i in range(n_dims)]:
            raise SchemaError(
                f"activations of {family!r} for shard {shard}: columns must be the keys, "
                f"then d0..d{n_dims - 1} in order"
            )
        written = 0
        layers = _by_layer(table) if table.num_rows or layer is None else [(layer, table)]
        for layer_of_rows, rows in layers:
            arrays = rows.columns  # once: each call builds a list of every column
            for block in range(n_blocks(kind, width)):
                part = (
                    rows if kind != "dense" else _block_table(rows, arrays, n_keys, block, columns)
                )
                directory = self.layout.block_dir(family, layer_of_rows, block)
                path = self.layout.shard_file(directory, shard)
                done = write_table(
                    part, path, schema_name=name, schema_version=version, expected=expected
                )
                self._remember(shard, path, done, name, version)
                written += done.bytes
        return written

    def write_tokens(self, shard: int, table: pa.Table) -> int:
        path = self.layout.shard_file(self.layout.tokens_dir, shard)
        return self._write_fixed("tokens", path, table, shard).bytes

    def write_documents(self, shard: int, table: pa.Table) -> int:
        """The labels kept from the input documents (``data.keep_columns``)."""
        path = self.layout.shard_file(self.layout.documents_dir, shard)
        return self._write_fixed("documents", path, table, shard).bytes

    def write_vocab(self, table: pa.Table) -> int:
        """The vocabulary, and its inventory (one file, written once per run)."""
        entry = self._write_fixed("vocab", self.layout.vocab_path, table)
        write_vocab_inventory(self.layout, entry)
        return entry.bytes

    def take_files(self, shard: int) -> list[FileEntry]:
        """The files written for ``shard`` and not yet inventoried, forgotten here: a
        pipeline stage hands them on to the stage that marks the shard complete."""
        with self._lock:
            return list(self._written.pop(shard, {}).values())

    def mark_complete(
        self,
        shard: int,
        *,
        files: list[FileEntry] = (),
        sequences: int = 0,
        seconds: float = 0.0,
        call: str | None = None,
        nodes: tuple[str, ...] = (),
    ) -> ShardInventory:
        """Say shard ``shard`` is whole: write its inventory, after every file of it.

        The inventory lists the files this writer wrote for the shard plus ``files``
        (those other writers wrote: earlier pipeline stages). Its token count is the
        rows of the shard's tokens file. ``call``: the harvest call (its start time);
        ``nodes``: the Ray node each pipeline stage ran on, in stage order.
        """
        entries = {e.path: e for e in files}
        entries.update({e.path: e for e in self.take_files(shard)})
        tokens_path = self._relative(self.layout.shard_file(self.layout.tokens_dir, shard))
        tokens = entries[tokens_path].rows if tokens_path in entries else 0
        inventory = ShardInventory(
            shard=shard,
            files=tuple(entries[p] for p in sorted(entries)),
            tokens=tokens,
            sequences=int(sequences),
            seconds=round(float(seconds), 3),
            call=call,
            nodes=tuple(nodes),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_shard_inventory(self.layout, inventory)
        return inventory

    def write_manifest(self, manifest: RunManifest) -> None:
        """The run's manifest (the harvest driver's alone; tools record themselves)."""
        if manifest.run_id != self.run_id:
            raise ValueError(f"manifest of run {manifest.run_id} written to {self.run_id}")
        write_manifest(self.layout, manifest)

    # ------------------------------------------------------------------- tool results

    def write_result(
        self,
        output: str,
        shard: int,
        table: pa.Table,
        schema: pa.Schema,
        schema_version: int,
        call: str | None = None,
    ) -> FileEntry:
        """One result table of a tool as ``results/<output>/<call>/shard-NNNNN.parquet``
        (without ``call``: ``results/<output>/shard-NNNNN.parquet``), checked against
        ``schema`` (the tool's ``result_schema(output)``).

        Each call of a tool writes its own directory, so the previous call's files stay
        whole and listed until the new call's record replaces its record
        (``record_tool``). Returns the file's entry, which that record lists.
        """
        directory = self.layout.results_dir(output)
        if call is not None:
            directory = directory / self.layout.checked_name(call, "tool call")
        target = self.layout.shard_file(directory, shard)
        name = f"result.{output}"
        done = write_table(
            table, target, schema_name=name, schema_version=schema_version, expected=schema
        )
        return self._entry(target, done, name, schema_version)

    def remove_results(self, files: Sequence[FileEntry], keep: Sequence[FileEntry] = ()) -> None:
        """Delete tool result files (those not in ``keep``): a replaced call's, or a
        failed call's partial ones. Best effort: a file left behind is never read,
        because no record lists it."""
        kept = {e.path for e in keep}
        for entry in files:
            if entry.path.startswith("results/") and entry.path not in kept:
                path = entry.location(self.layout)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove %s: %s", entry.path, exc)
                if path.parent.parent.name != "results":  # a call's own directory
                    _remove_if_empty(path.parent)

    def remove_call(self, outputs: Sequence[str], call: str) -> None:
        """Delete what a tool call wrote in its own directories of ``outputs`` (its
        tables' and its artifacts'), best effort: a failed call's, or a replaced one's
        artifacts."""
        for output in outputs:
            directory = self.layout.results_dir(output) / self.layout.checked_name(
                call, "tool call"
            )
            for path in directory.glob("*") if directory.is_dir() else []:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)
            _remove_if_empty(directory)

    def record_tool(self, tool: str, record: ToolRecord) -> None:
        """Record a finished tool call (its own file: concurrent calls never collide)."""
        write_tool_record(self.layout, tool, record)

    def _write_fixed(self, name: str, path, table: pa.Table, shard: int | None = None):
        schema = schemas.load_schema(name)
        done = write_table(
            table, path, schema_name=name, schema_version=schema.version, expected=schema.arrow()
        )
        if shard is not None:
            return self._remember(shard, path, done, name, schema.version)
        return self._entry(path, done, name, schema.version)

    def _entry(self, path, done: WrittenFile, name: str, version: int) -> FileEntry:
        return FileEntry(self._relative(path), done.bytes, done.rows, name, version, done.checksum)

    def _remember(self, shard: int, path, done: WrittenFile, name: str, version: int):
        entry = self._entry(path, done, name, version)
        with self._lock:
            self._written.setdefault(shard, {})[entry.path] = entry
        return entry

    def _relative(self, path) -> str:
        return relative_path(self.layout, path)

    # ----------------------------------------------------------------- tool artifacts

    def write_artifact(self, tool: str, name: str, data: bytes) -> str:
        """A file a tool keeps beside its result tables (trained weights, say), written
        atomically as ``results/<tool>/<call>/<name>`` (``results/<tool>/<name>`` for a
        writer without a call): each call keeps its own, like its tables.

        Returns its path relative to the run directory: what a result row records and
        ``RunReader.read_artifact`` takes.
        """
        if not _ARTIFACT.match(name) or _SHARD_FILE.match(name):
            raise StoreError(
                f"invalid artifact name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, and not a result file's shard-*.parquet"
            )
        directory = self.layout.results_dir(tool)
        if self.call is not None:
            directory = directory / self.layout.checked_name(self.call, "tool call")
        path = directory / name
        with atomic_open(path, "wb") as f:
            f.write(data)
        return path.relative_to(self.layout.root).as_posix()


def _by_layer(table: pa.Table) -> list[tuple[int, pa.Table]]:
    """The rows of each layer of an activation table, in layer order."""
    import pyarrow.compute as pc

    layers = pc.unique(table.column("layer")).to_pylist()
    if len(layers) == 1:
        return [(layers[0], table)]
    return [(x, table.filter(pc.equal(table.column("layer"), x))) for x in sorted(layers)]


def _block_table(rows: pa.Table, arrays: list, n_keys: int, block: int, columns: int) -> pa.Table:
    """Dimensions ``block * BLOCK_DIMS ..`` of a dense table (``arrays``: its columns,
    keys first, then ``d0..d{width-1}`` in order) as ``d0..d{columns-1}``, null past the
    width."""
    import pyarrow as pa

    first = n_keys + block * BLOCK_DIMS
    chosen = arrays[:n_keys] + arrays[first : first + columns]
    padding = columns - (len(chosen) - n_keys)
    if padding:  # the last block of a width that BLOCK_DIMS does not divide
        chosen += [pa.nulls(rows.num_rows, arrays[first].type)] * padding
    names = [rows.schema.field(i).name for i in range(n_keys)] + [f"d{j}" for j in range(columns)]
    return pa.Table.from_arrays(chosen, names=names)


_ARTIFACT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD_FILE = re.compile(r"^shard-.*\.parquet$")  # result tables' names: never an artifact


def _remove_if_empty(directory) -> None:
    """Remove an empty directory (object stores have none: nothing to do there)."""
    try:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    except OSError:
        pass
