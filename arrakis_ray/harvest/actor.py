"""The second Ray Data step of a harvest: capture a shard's hooks and write them.

The tokenize step (``tokenize.py``) comes before it. Both are plain callables
(``__call__(batch) -> batch``), so a unit test runs them without Ray and a 100-GPU job
runs them in an actor pool. A batch holds one or more
*shards* (see ``inputs.Shard``). The harvest step writes a shard's Parquet files itself
(atomically, one file per hook family), then its completion marker; the rows it returns
downstream are only small statistics, so the activations never travel through Ray's
object store and the driver never holds them.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from arrakis_ray.config import PipelineConfig, to_dict
from arrakis_ray.errors import HarvestError
from arrakis_ray.harvest import tables
from arrakis_ray.harvest.batch import (
    SHARD_FIELDS,
    batch_column,
    batch_rows,
    describe_shard,
    shard_of,
)
from arrakis_ray.harvest.model_source import vocab_texts
from arrakis_ray.harvest.tokenize import documents_table
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import schemas
from arrakis_ray.store.inventory import file_entries
from arrakis_ray.store.writer import RunWriter

log = logging.getLogger(__name__)

# Row keys a stage hands on to the next one, beside the shard descriptor and the residual.
PASSED_ON = ("lengths", "seq_ids", "token_ids", "doc_ids", "doc_pos", "documents")
# ... and "files": the JSON list of the files earlier stages wrote for the shard, which
# the last stage's inventory lists (store/inventory.py); "nodes": the JSON list of the
# nodes the earlier stages ran on, likewise.
# Threads encoding a shard's Parquet files (one file per hook family, plus tokens).
WRITE_THREADS = 4
# Shards a harvest actor works on at once: one in the model, one being written.
CONCURRENT_SHARDS = 2


class HarvestStage:
    """Ray Data step (an actor): one pipeline stage of the hooked model on a shard.

    A stage holds blocks ``[start, stop)`` (all of them in replica mode: one stage). It
    captures the hooks of its own blocks and writes them; a stage that is not the last
    passes the residual stream on in the row (``resid``). The last stage writes the
    tokens and then the shard's completion marker, so a marked shard is complete.

    The CPU work after the forward pass overlaps it: while batch i+1 runs through the
    model, a helper thread lays out batch i's captures as Arrow tables, and a shard's
    files are encoded in parallel, one thread per file (torch and pyarrow release the
    GIL). Ray Data runs two calls per actor at once (``CONCURRENT_SHARDS``); a lock lets
    one shard at a time use the model, so shard i+1's forward runs while shard i's files
    are written. On a GPU actor the forward then hides the layout and the writes; on a
    CPU actor the threads fill the cores the forward leaves idle (benchmarks/BENCHMARKS.md).
    """

    def __init__(
        self,
        config: PipelineConfig,
        run_id: str,
        store_root,
        hooks: list[str],
        stages: list[tuple[int, int]],
        stage: int,
        call: str | None = None,
        probe=None,
    ):
        """``probe``: the driver's store probe (``placement.store_probe``), checked before
        anything is written: a node that cannot see a local store refuses the work."""
        from arrakis_ray.harvest.placement import check_probe
        from arrakis_ray.live.holder import ModelHolder

        check_probe(store_root, probe)  # before the model loads: the refusal is instant
        self.config = config
        self.run_id = run_id
        self.call = call  # the harvest call's start time, recorded in each inventory
        self.node = _node_id()  # recorded in each inventory: where each stage ran
        self.writer = RunWriter(store_root, run_id, create=False)
        # shared: a warm actor harvesting run after run loads its model once; in a Ray
        # Data actor pool each actor is a process of its own, so nothing is shared there
        holder = ModelHolder.shared(
            config.model,
            tuple(stages[stage]),
            num_gpus=config.harvest.num_gpus_per_actor,
            sharing=config.harvest.actors * len(stages),
        )
        self.device = holder.device
        self.stage = holder.stage
        self.model = hooked = holder.model
        self._model_lock = holder.lock  # one shard at a time runs the model
        self.hooks = [h for h in hooks if self.stage.owns(h, hooked.layer_of)]
        self.vocab_text = np.array(vocab_texts(hooked.tokenizer, hooked.vocab_size), dtype=object)
        self.pad_id = hooked.tokenizer.pad_token_id or 0
        self.storage_dtype = config.harvest.storage_dtype
        # per hook, once: (kind, layer, Arrow schema); a 1,000-column schema takes ~1 ms
        # to build, and every batch needs one per hook
        self._hook_tables = {}
        for name in self.hooks:
            kind, width = hooked.hook_shape(name)
            schema = schemas.activation_schema(kind, width, self.storage_dtype)
            family = store_layout.hook_family(name)
            self._hook_tables[name] = (family, kind, hooked.layer_of(name), schema)
        self._tokens_schema = schemas.tokens_schema()
        self._layout_thread = ThreadPoolExecutor(1, thread_name_prefix="arrakis-layout")
        self._write_threads = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="arrakis-write")
        for pool in (self._layout_thread, self._write_threads):
            weakref.finalize(self, pool.shutdown, wait=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = defaultdict(list)
        for row in batch_rows(batch):
            started = time.perf_counter()
            try:
                n_tokens, n_bytes, resid = self.harvest_shard(row)
            except Exception as exc:
                raise HarvestError(
                    f"{describe_shard(shard_of(row))}, stage "
                    f"{self.stage.start}-{self.stage.stop}: {type(exc).__name__}: {exc}"
                ) from exc
            seconds = float(row.get("seconds", 0.0)) + time.perf_counter() - started
            n_bytes += int(row.get("bytes", 0))
            if self.stage.last:
                out["shard"].append(int(row["shard"]))
                out["tokens"].append(n_tokens)
                out["sequences"].append(len(row["lengths"]))
                out["bytes"].append(n_bytes)
                out["seconds"].append(seconds)
            else:  # hand the shard on to the next stage
                for key in (*SHARD_FIELDS, *PASSED_ON):
                    if key in row:
                        out[key].append(row[key])
                written = [to_dict(e) for e in self.writer.take_files(int(row["shard"]))]
                out["files"].append(json.dumps(_earlier_files(row) + written))
                out["nodes"].append(json.dumps(_earlier_nodes(row) + [self.node]))
                out["resid"].append(resid)
                out["bytes"].append(n_bytes)
                out["seconds"].append(seconds)
        return {k: batch_column(v) for k, v in out.items()}

    def harvest_shard(self, row: dict) -> tuple[int, int, np.ndarray | None]:
        """Capture this stage's hooks for one shard and write them.

        Returns (tokens, bytes written, residual stream for the next stage or None).
        """
        shard = int(row["shard"])
        started = time.perf_counter()
        laid_out: list = []  # futures of each batch's tables, in batch order
        try:
            with self._model_lock:
                resid_out = self._forward_shard(row, laid_out)
            per_family: dict[str, list] = defaultdict(list)
            token_parts = []
            for future in laid_out:
                activations, tokens = future.result()
                for family, part in activations:
                    per_family[family].append(part)
                if tokens is not None:
                    token_parts.append(tokens)
        finally:  # on an error, let the helper finish before the shard is given up
            for future in laid_out:
                future.cancel()
            for future in laid_out:
                if not future.cancelled():
                    future.exception()
        files = [(self._write_family, family, parts, shard) for family, parts in per_family.items()]
        if self.stage.last:
            tokens = pa.concat_tables(token_parts)
            files.append((self.writer.write_tokens, shard, tokens))
            kept = row.get("documents")
            if kept and kept != "{}":  # the labels of data.keep_columns
                table = documents_table(self.run_id, int(row["first_doc"]), kept)
                files.append((self.writer.write_documents, shard, table))
        writes = []
        try:
            for file in files:
                writes.append(self._write_threads.submit(*file))
        finally:  # every file is finished (or failed) before the shard is reported
            errors = [f.exception() for f in writes]
        first_error = next((e for e in errors if e is not None), None)
        if first_error is not None:
            raise first_error
        n_bytes = sum(f.result() for f in writes)
        if self.stage.last:
            # the marker goes last: a shard without it is redone from scratch on resume
            earlier = file_entries(_earlier_files(row), f"shard {shard} from earlier stages")
            nodes = _earlier_nodes(row) + [self.node]
            self.writer.mark_complete(
                shard,
                files=list(earlier),
                sequences=len(row["lengths"]),
                seconds=float(row.get("seconds", 0.0)) + time.perf_counter() - started,
                call=self.call,
                nodes=() if None in nodes else tuple(nodes),  # outside Ray: not known
            )
        return int(np.sum(row["lengths"])), n_bytes, resid_out

    def _forward_shard(self, row: dict, laid_out: list) -> np.ndarray | None:
        """Run a shard's batches through this stage; queue each batch's table layout on
        the helper thread (its future appended to ``laid_out``).

        Returns the residual stream for the next stage (None for the last stage).
        """
        import torch

        lengths = np.asarray(row["lengths"], dtype=np.int64)
        flat = np.asarray(row["token_ids"], dtype=np.int64)
        resid_in = row.get("resid")
        seq_ids = np.asarray(row["seq_ids"], dtype=np.int64)
        flat_docs = np.asarray(row["doc_ids"], dtype=np.int64)
        flat_pos = np.asarray(row["doc_pos"], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        resid_out = None
        batch_size = self.config.harvest.batch_size
        for lo in range(0, len(lengths), batch_size):
            idx = np.arange(lo, min(lo + batch_size, len(lengths)))
            width = max(1, int(lengths[idx].max()))
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            docs = np.zeros((len(idx), width), dtype=np.int64)
            doc_pos = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=bool)
            for j, i in enumerate(idx):
                span = slice(starts[i], starts[i] + lengths[i])
                ids[j, : lengths[i]] = flat[span]
                docs[j, : lengths[i]] = flat_docs[span]
                doc_pos[j, : lengths[i]] = flat_pos[span]
                mask[j, : lengths[i]] = True
            cache, resid = self.stage.run(
                torch.from_numpy(ids).to(self.device),
                torch.from_numpy(mask).long().to(self.device),
                self.hooks,
                None if resid_in is None else torch.from_numpy(resid_in[idx, :width]),
            )
            if resid is not None:
                if resid_out is None:  # padded to the shard's longest sequence
                    resid_out = np.zeros(
                        (len(lengths), int(lengths.max()), resid.shape[-1]), np.float32
                    )
                # float32 holds float16 and bfloat16 values exactly
                resid_out[idx, :width] = resid.float().cpu().numpy()
            batch = (cache, mask, lengths[idx], seq_ids[idx], docs, doc_pos, ids)
            laid_out.append(self._layout_thread.submit(self._batch_tables, *batch))
            if len(laid_out) > 1:
                # at most one batch's captures wait for the helper: on a GPU the forward
                # outruns the layout, and queued captures would fill device memory
                laid_out[-2].result()
        return resid_out

    def _batch_tables(self, cache: dict, mask, lengths, seq_ids, docs, doc_pos, ids):
        """One forward batch's tables: ([(family, (layer, table))], tokens table or None)."""
        activations = [
            (self._hook_tables[name][0], self._table(name, tensor, mask, lengths, seq_ids))
            for name, tensor in cache.items()
        ]
        tokens = None
        if self.stage.last:
            tokens = tables.tokens_table(
                self._tokens_schema, self.run_id, seq_ids, docs, doc_pos, ids, mask,
                self.vocab_text,
            )  # fmt: skip
        return activations, tokens

    def _table(self, name: str, tensor, mask: np.ndarray, lengths: np.ndarray, seq_ids):
        """(layer, table) of one hook's captured tensor for one forward batch."""
        _family, kind, layer, schema = self._hook_tables[name]
        tensor = tensor.detach()
        if kind == "pattern":  # probabilities, stored as float32 (the weight column)
            values = tensor.float().cpu().numpy()
            return layer, tables.pattern_table(schema, self.run_id, layer, values, lengths, seq_ids)
        if self.storage_dtype == "float16":
            self._check_float16_range(tensor, name)
        build = tables.head_table if kind == "head" else tables.dense_table
        return layer, build(schema, self.run_id, layer, tensor, mask, seq_ids)

    @staticmethod
    def _check_float16_range(tensor, name: str) -> None:
        # bfloat16 has no numpy/Parquet type: float16 holds its values exactly in
        # [6.1e-5, 65504] (8 of float16's 11 mantissa bits), float32 everywhere. Beyond
        # 65504 float16 would store inf: refuse rather than corrupt.
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > 65504.0:
            raise HarvestError(
                f"{name}: |values| up to {peak:.3g} exceed float16's range; "
                "set harvest.storage_dtype: float32"
            )

    def _write_family(self, family: str, parts: list, shard: int) -> int:
        # one table per layer: the writer stores each (layer, column block) as a file
        by_layer: dict[int, list] = {}
        for layer, table in parts:
            by_layer.setdefault(layer, []).append(table)
        return sum(
            self.writer.write_activations(family, shard, pa.concat_tables(tables), layer)
            for layer, tables in sorted(by_layer.items())
        )


def _earlier_nodes(row: dict) -> list[str | None]:
    """The node ids earlier pipeline stages ran a row's shard on, in stage order."""
    raw = row.get("nodes")
    return json.loads(raw) if raw else []


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray: a unit test calls the step
    directly)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _earlier_files(row: dict) -> list[dict]:
    """The file entries earlier pipeline stages wrote for a row's shard (JSON dicts)."""
    raw = row.get("files")
    return json.loads(raw) if raw else []
