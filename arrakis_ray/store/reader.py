"""RunReader: the one way tools, the report and tests read a run.

It knows the run's stages: a staged run stores each shard of a hook family as one file
part per stage (the layers of that stage), and the reader joins the parts, or opens only
the part that holds the layer asked for. Every file is checked against its schema name
and version; a missing file is called missing, not corrupt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from arrakis_ray.errors import StoreError
from arrakis_ray.store import schemas
from arrakis_ray.store.layout import (
    BLOCK_DIMS,
    RunLayout,
    family_kind,
    hook_family,
    hook_layer,
    n_blocks,
    resolve_run,
)
from arrakis_ray.store.manifest import (
    ModelShape,
    RunManifest,
    family_width,
    read_manifest,
    read_tool_records,
    split_record_key,
)
from arrakis_ray.store.parquet import check_file_schema, read_files

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from arrakis_ray.store.location import StorePath
    from arrakis_ray.store.writer import RunWriter


class RunReader:
    """Reads one run: its manifest, activations, tokens, vocabulary, documents, results."""

    def __init__(self, layout: RunLayout, manifest: RunManifest | None = None) -> None:
        self.layout = layout
        self.manifest = manifest if manifest is not None else read_manifest(layout)
        self.call: str | None = None
        """Inside a tool's task: the tool call, whose directory its artifacts go to."""
        self._seq_ranges: dict[int, tuple[int, int]] = {}

    @classmethod
    def open(cls, run: str | Path, store: str | Path | None = None) -> RunReader:
        """A run given as its directory, or as its id (or a unique prefix) and a store."""
        return cls(resolve_run(run, store))

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    @property
    def shape(self) -> ModelShape:
        return self.manifest.shape

    @property
    def shards(self) -> list[int]:
        """Completed shards, in order (a running harvest adds more)."""
        return sorted(self.layout.completed_shards())

    @cached_property
    def families(self) -> list[str]:
        """Hook families the run harvested."""
        return sorted({hook_family(h) for h in self.manifest.hooks})

    # ------------------------------------------------------------------- activations

    def activations(
        self,
        family: str,
        shard: int,
        columns: list[str] | None = None,
        layer: int | None = None,
    ) -> pa.Table:
        """One shard's table of a hook family, every layer in layer order, or only
        ``layer``; every dimension is a column ``d0..d{width-1}``. Only the files of the
        layers and column blocks that hold the columns asked for are opened."""
        import pyarrow as pa

        if family not in self.families:
            raise StoreError(
                f"run {self.run_id} did not harvest hook family {family!r} "
                f"(it has {', '.join(self.families)})"
            )
        layers = self._family_layers(family)
        if layer is not None:
            if layer not in layers:
                raise StoreError(
                    f"run {self.run_id} has no layer {layer} of {family!r} (model has "
                    f"{self.shape.n_layers} layers; hooks: {self._family_hooks(family)})"
                )
            layers = [layer]
        tables = [self._layer_table(family, x, shard, columns) for x in sorted(layers)]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if columns is not None:
            return table.select(list(dict.fromkeys(columns)))
        return table

    def iter_activations(
        self, family: str, columns: list[str] | None = None, layer: int | None = None
    ) -> Iterator[tuple[int, pa.Table]]:
        """(shard, table) for every completed shard in order: one in memory at a time."""
        for shard in self.shards:
            yield shard, self.activations(family, shard, columns, layer)

    def matrix(
        self, family: str, layer: int, shard: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq_id, pos, float32 [rows, width]) of a dense family at one layer of one
        shard, rows sorted by (seq_id, pos)."""
        if family_kind(family) != "dense":
            raise StoreError(f"matrix() reads dense families; {family!r} is {family_kind(family)}")
        return layer_matrix(self.activations(family, shard, layer=layer), layer)

    # ------------------------------------------------------------- other run tables

    def tokens(self, shard: int) -> pa.Table:
        """One shard's tokens table (the join key of every activation row)."""
        return self._read([self.layout.shard_file(self.layout.tokens_dir, shard)], "tokens")

    @cached_property
    def vocab(self) -> np.ndarray:
        """Token id -> token text (an object array)."""
        import numpy as np

        table = self._read([self.layout.vocab_path], "vocab")
        return np.asarray(table.column("token_text").to_pylist(), dtype=object)

    def documents(self, column: str) -> dict[int, str]:
        """doc_id -> value of an input column kept at harvest time (``data.keep_columns``).

        Values are text: a value that was not a string in the input is its JSON text.
        """
        kept = self.manifest.kept_columns
        if column not in kept:
            raise StoreError(
                f"run {self.run_id} did not keep the input column {column!r} (kept: "
                f"{', '.join(kept) or 'none'}); harvest again with data.keep_columns "
                f"including {column!r}"
            )
        out: dict[int, str] = {}
        for shard in self.shards:
            path = self.layout.shard_file(self.layout.documents_dir, shard)
            table = self._read([path], "documents", filters=[("column", "==", column)])
            for doc_id, value in zip(
                table.column("doc_id").to_pylist(), table.column("value").to_pylist(), strict=True
            ):
                out[doc_id] = value
        return out

    def result(
        self, output: str, columns: list[str] | None = None, filters: list | None = None
    ) -> pa.Table:
        """The rows of one tool output (``results/<output>/``): only ``columns``, and only
        rows matching pyarrow ``filters`` (``[("seq_id", ">=", 10)]``), read with pushdown."""
        files = self._result_files(output)
        if not files:
            raise StoreError(f"run {self.run_id} has no result {output!r} (run its tool first)")
        return self._read(files, f"result.{output}", columns, filters)

    def _result_files(self, output: str) -> list[StorePath]:
        """The files of one output that its tool's record lists (never a glob: a stray
        copy beside them is not read)."""
        prefix = f"results/{output}/"
        records = read_tool_records(self.layout)  # afresh: a tool may have run since
        # the run's own calls, not a sweep's settings of them (``tools/<tool>.<variant>``)
        own = [r for key, r in records.items() if split_record_key(key)[1] is None]
        entries = [e for r in own for e in r.files if e.path.startswith(prefix)]
        return [e.location(self.layout) for e in sorted(entries, key=lambda e: e.path)]

    # ---------------------------------------------------------------------- helpers

    def _read(self, paths: list, name: str, columns=None, filters=None) -> pa.Table:
        known = schemas.load_schema(name).version
        for path in paths:
            if not path.exists():
                raise StoreError(f"{path}: file is missing from run {self.run_id}")
            check_file_schema(path, name, known)
        return read_files(paths, columns=columns, filters=filters)

    def _family_layers(self, family: str) -> list[int]:
        n_layers = self.shape.n_layers
        return [hook_layer(h, n_layers) for h in self.manifest.hooks if hook_family(h) == family]

    def width(self, family: str) -> int | None:
        """Length of one stored vector of ``family`` (None for attention patterns)."""
        return family_width(self.shape, family)

    def _layer_table(
        self, family: str, layer: int, shard: int, columns: list[str] | None
    ) -> pa.Table:
        """One layer of one shard, its column blocks side by side (``d`` global again)."""
        import pyarrow as pa

        kind = family_kind(family)
        name = schemas.activation_schema_name(kind)
        width = self.width(family)
        if kind != "dense" or n_blocks(kind, width) == 1:
            return self._block_rows(family, layer, 0, shard, name, columns)
        wanted = dim_columns(columns) if columns is not None else None
        blocks = range(n_blocks(kind, width))
        if wanted is not None:
            blocks = sorted({int(c[1:]) // BLOCK_DIMS for c in wanted}) or [0]
        keys = [f.name for f in schemas.load_schema(name).fields]
        if columns is not None:
            keys = [k for k in keys if k in columns]
        arrays, names = [], []
        for i, block in enumerate(blocks):
            first = block * BLOCK_DIMS
            local = [
                f"d{j}"
                for j in range(min(BLOCK_DIMS, width - first))
                if wanted is None or f"d{first + j}" in wanted
            ]
            table = self._block_rows(
                family, layer, block, shard, name, (keys if i == 0 else []) + local
            )
            if i == 0:
                arrays += [table.column(k) for k in keys]
                names += keys
            arrays += [table.column(c) for c in local]
            names += [f"d{first + int(c[1:])}" for c in local]
        return pa.Table.from_arrays(arrays, names=names)

    def _block_rows(
        self, family: str, layer: int, block: int, shard: int, name: str, columns
    ) -> pa.Table:
        """Rows of one shard in one (layer, block) directory: its shard file, or its
        slice of the compacted part holding it."""
        directory = self.layout.block_dir(family, layer, block)
        per_part = self.manifest.shards_per_part
        if per_part is None:
            return self._read([self.layout.shard_file(directory, shard)], name, columns)
        first, last = self._seq_range(shard)
        if first is None:  # a shard without tokens: no rows (seq_id is never negative)
            first = last = -1
        filters = [("seq_id", ">=", first), ("seq_id", "<=", last)]
        path = self.layout.part_file(directory, shard // per_part)
        if columns is not None and "seq_id" not in columns:
            table = self._read([path], name, [*columns, "seq_id"], filters)
            return table.drop_columns(["seq_id"])
        return self._read([path], name, columns, filters)

    def _seq_range(self, shard: int) -> tuple[int | None, int | None]:
        """Smallest and largest seq_id of a shard (from its tokens file; None if empty)."""
        import pyarrow.compute as pc

        if shard not in self._seq_ranges:
            path = self.layout.shard_file(self.layout.tokens_dir, shard)
            seq = self._read([path], "tokens", ["seq_id"]).column("seq_id")
            bounds = pc.min_max(seq)
            self._seq_ranges[shard] = (bounds["min"].as_py(), bounds["max"].as_py())
        return self._seq_ranges[shard]

    def _family_hooks(self, family: str) -> str:
        hooks = [h for h in self.manifest.hooks if hook_family(h) == family]
        return ", ".join(hooks[:4]) + (" ..." if len(hooks) > 4 else "")

    # ---------------------------------------------------------- tool results, artifacts

    def has_result(self, output: str) -> bool:
        """True if some tool wrote result ``output`` into this run."""
        return bool(self._result_files(output))

    def writer(self) -> RunWriter:
        """This run's RunWriter: how a run-scope tool, which receives the reader, saves an
        artifact of its own (``RunWriter.write_artifact``); the runner writes its tables."""
        from arrakis_ray.store.writer import RunWriter

        return RunWriter.for_layout(self.layout, self.call)

    def artifact_path(self, relative: str) -> StorePath:
        """Where an artifact lies, given its path relative to the run directory (as
        ``RunWriter.write_artifact`` returned it and a result row records it)."""
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise StoreError(f"artifact path {relative!r} is not inside run {self.run_id}")
        return self.layout.root.joinpath(*parts)

    def read_artifact(self, relative: str) -> bytes:
        """An artifact's bytes; StoreError naming the file if it is missing."""
        path = self.artifact_path(relative)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: file is missing from run {self.run_id}") from None
        except OSError as e:
            raise StoreError(f"{path}: could not read ({e})") from None


def dim_columns(names: Sequence[str]) -> list[str]:
    """The ``d0..d{n-1}`` names among a wide activation table's columns, in dim order."""
    return sorted((c for c in names if c[:1] == "d" and c[1:].isdigit()), key=lambda c: int(c[1:]))


def layer_matrix(table: pa.Table, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq_id, pos, [rows, width] float32) of one layer of a dense table, sorted by (seq, pos)."""
    import numpy as np
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table.column("layer"), layer))
    seq = table.column("seq_id").to_numpy()
    pos = table.column("pos").to_numpy()
    order = np.lexsort((pos, seq))
    dims = dim_columns(table.column_names)
    if not dims:
        return seq[order], pos[order], np.zeros((len(order), 0), np.float32)
    # stored float16 is widened: every computation runs in float32
    matrix = np.stack([table.column(c).to_numpy().astype(np.float32) for c in dims], axis=1)
    return seq[order], pos[order], matrix[order]
