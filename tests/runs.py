"""Synthetic runs for tests and benchmarks, written through ``RunWriter`` alone.

A synthetic run holds what a harvest writes (tokens, vocab, activation families split in
shards and stages, the kept input columns, completion markers, a typed ``RunManifest``),
but its values are arrays the caller chose, so a test can compare what a tool or a query
computes from the store with a direct computation on those arrays. Rows are built with
the harvest's own table builders (``arrakis_ray.harvest.tables``); no path is spelled
here. One document per sequence: ``doc_id = seq_id + doc_offset``.

Tests import it as ``from runs import write_run`` (pytest puts ``tests/`` on the path);
a benchmark puts ``tests/`` on ``sys.path`` first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arrakis_ray.config import DataConfig, HarvestConfig, ModelConfig, PipelineConfig, to_dict
from arrakis_ray.harvest import tables
from arrakis_ray.harvest.tokenize import documents_table
from arrakis_ray.store import schemas
from arrakis_ray.store.layout import RunLayout, family_kind, hook_family, hook_layer
from arrakis_ray.store.manifest import (
    DataInfo,
    HarvestCall,
    HarvestRecord,
    ModelShape,
    RunManifest,
    Shard,
)
from arrakis_ray.store.writer import RunWriter

CREATED_AT = "2025-01-01T00:00:00+00:00"
SOURCE = "synthetic.parquet"  # the input file a synthetic run claims (never read)


def synthetic_shape(arch: str = "gpt2", **fields: Any) -> ModelShape:
    """A small gpt2-like shape; ``fields`` override any of its fields."""
    shape = {
        "n_layers": 2,
        "d_model": 8,
        "d_mlp": 32,
        "n_heads": 2,
        "d_head": 4,
        "d_vocab": 16,
        "norm": "layernorm",
        "positional": "learned",
        "parallel_blocks": False,
    } | fields
    shape.setdefault("n_kv_heads", shape["n_heads"])
    return ModelShape(arch=arch, **shape)


def shard_plan(n_documents: int, shard_size: int, first_doc: int = 0) -> tuple[Shard, ...]:
    """Shards of ``shard_size`` documents (the last may be shorter), in input order."""
    return tuple(
        Shard(
            shard=i,
            file=SOURCE,
            format="parquet",
            offset=start,  # row offset of the first document
            count=min(shard_size, n_documents - start),
            first_doc=first_doc + start,
        )
        for i, start in enumerate(range(0, n_documents, shard_size))
    )


def synthetic_manifest(
    run_id: str,
    hooks: Sequence[str],
    shape: ModelShape,
    shards: Sequence[Shard],
    *,
    name: str | None = None,
    keep_columns: Sequence[str] = (),
    storage_dtype: str = "float32",
    context_length: int = 128,
    stages: Sequence[tuple[int, int]] | None = None,
    n_tokens: int = 0,
    seconds: float = 1.0,
    model_source: str = "synthetic",
    created_at: str = CREATED_AT,
) -> RunManifest:
    """The manifest of a complete run of ``hooks`` over ``shards``, harvested in one call
    of ``seconds`` (its config is a real ``PipelineConfig``, resolved as a harvest's)."""
    stages = tuple(tuple(s) for s in stages or [(0, shape.n_layers)])
    n_documents = sum(s.count for s in shards)
    config = PipelineConfig(
        name=name or run_id,
        model=ModelConfig(arch=shape.arch),
        data=DataConfig(
            path=SOURCE, keep_columns=tuple(keep_columns), context_length=context_length
        ),
        harvest=HarvestConfig(
            hooks=tuple(hooks),
            shard_size=max((s.count for s in shards), default=1),
            storage_dtype=storage_dtype,
            layer_ranges=stages if len(stages) > 1 else (),
        ),
    )
    call = HarvestCall(
        finished_at=created_at,
        shards=len(shards),
        tokens=n_tokens,
        bytes=0,
        sequences=n_documents,
        seconds=seconds,
    )
    return RunManifest(
        run_id=run_id,
        name=config.name,
        status="complete",
        created_at=created_at,
        updated_at=created_at,
        config=to_dict(config),
        hooks=tuple(hooks),
        shape=shape,
        model_source=model_source,
        model_fingerprint=f"{model_source}-fingerprint",
        data=DataInfo(
            path=SOURCE,
            fingerprint="synthetic",
            n_documents=n_documents,
            n_sequences=n_documents,  # one sequence per document
            n_shards=len(shards),
        ),
        shard_plan=tuple(shards),
        stages=stages,
        schemas={n: schemas.load_schema(n).version for n in schemas.known_schemas()},
        harvest=HarvestRecord(predicted_max_bytes=0, calls=(call,)),
        versions={},
    )


def write_run(
    store_root: str | Path,
    run_id: str,
    token_ids: np.ndarray,
    vocab: Sequence[str],
    activations: Mapping[str, np.ndarray],
    *,
    shard_size: int | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    dtype: str = "float32",
    doc_offset: int = 0,
    shape: ModelShape | None = None,
    stages: Sequence[tuple[int, int]] | None = None,
    **manifest_fields: Any,
) -> RunLayout:
    """Write a complete run and return its layout.

    ``token_ids`` is ``[seq, pos]``; ``activations`` maps a concrete hook name to its
    values over every sequence: ``[seq, pos, width]`` (dense), ``[seq, pos, head,
    d_head]`` (head) or ``[seq, head, q, k]`` (pattern). ``shard_size`` sequences per
    shard (None: one shard). ``documents`` (one mapping per sequence) become the run's
    ``documents`` table, every key kept (``data.keep_columns``). ``shape`` defaults to
    one inferred from the arrays; ``manifest_fields`` go to ``synthetic_manifest``.
    """
    token_ids = np.asarray(token_ids)
    n_seq, n_pos = token_ids.shape
    vocab = np.asarray(vocab, dtype=object)
    keep = list(dict.fromkeys(k for d in documents or [] for k in d))
    if documents is not None and len(documents) != n_seq:
        raise ValueError(f"{len(documents)} documents for {n_seq} sequences")
    shards = shard_plan(n_seq, shard_size or n_seq, doc_offset)
    manifest = synthetic_manifest(
        run_id,
        list(activations),
        shape or inferred_shape(activations, len(vocab)),
        shards,
        keep_columns=keep,
        storage_dtype=dtype,
        context_length=max(n_pos, 2),
        stages=stages,
        n_tokens=token_ids.size,
        **manifest_fields,
    )
    writer = RunWriter(store_root, run_id)
    written = writer.write_vocab(vocab_table(vocab))
    for shard in shards:
        rows = slice(shard.offset, shard.offset + shard.count)
        seq_ids = np.arange(rows.start, rows.stop, dtype=np.int64)
        written += write_activations(writer, manifest, activations, shard, dtype)
        doc_ids = np.repeat(seq_ids[:, None] + doc_offset, n_pos, axis=1)
        doc_pos = np.broadcast_to(np.arange(n_pos), doc_ids.shape)
        tokens = tables.tokens_table(
            schemas.tokens_schema(),
            run_id,
            seq_ids,
            doc_ids,
            doc_pos,
            token_ids[rows],
            np.ones(doc_ids.shape, bool),
            vocab,
        )
        written += writer.write_tokens(shard.shard, tokens)
        if documents is not None:
            kept = {c: [d.get(c) for d in documents[rows]] for c in keep}
            table = documents_table(run_id, shard.first_doc, json.dumps(kept))
            written += writer.write_documents(shard.shard, table)
        writer.mark_complete(shard.shard)
    (call,) = manifest.harvest.calls
    harvest = replace(manifest.harvest, calls=(replace(call, bytes=written),))
    writer.write_manifest(manifest.with_changes(harvest=harvest))
    return writer.layout


def write_activations(
    writer: RunWriter,
    manifest: RunManifest,
    activations: Mapping[str, np.ndarray],
    shard: Shard,
    dtype: str,
) -> int:
    """Write one shard's rows of ``activations`` (hook -> values over every sequence,
    as ``write_run`` takes them): one table per family and layer. Returns the bytes
    written."""
    rows = slice(shard.offset, shard.offset + shard.count)
    seq_ids = np.arange(rows.start, rows.stop, dtype=np.int64)
    n_layers = manifest.shape.n_layers
    written = 0
    for hook in sorted(activations, key=lambda h: hook_layer(h, n_layers)):
        layer = hook_layer(hook, n_layers)
        values = activations[hook][rows]
        table = activation_table(writer.run_id, hook, layer, values, seq_ids, dtype)
        written += writer.write_activations(hook_family(hook), shard.shard, table)
    return written


def activation_table(
    run_id: str, hook: str, layer: int, values: np.ndarray, seq_ids: np.ndarray, dtype: str
) -> pa.Table:
    """A hook's rows for sequences ``seq_ids`` (every position a real token)."""
    kind = family_kind(hook_family(hook))
    if kind == "pattern":  # [seq, head, q, k], always float32
        values = np.asarray(values, np.float32)
        lengths = np.full(len(values), values.shape[-1])
        schema = schemas.activation_schema("pattern", 0, dtype)
        return tables.pattern_table(schema, run_id, layer, values, lengths, seq_ids)
    values = np.asarray(values).astype(dtype)  # rounded by numpy, as the caller's reference
    schema = schemas.activation_schema(kind, values.shape[-1], dtype)
    build = tables.head_table if kind == "head" else tables.dense_table
    return build(schema, run_id, layer, values, np.ones(values.shape[:2], bool), seq_ids)


def vocab_table(vocab: Sequence[str]) -> pa.Table:
    """The ``vocab`` table: token id i -> ``vocab[i]``."""
    return pa.Table.from_arrays(
        [pa.array(np.arange(len(vocab), dtype=np.int32)), pa.array(list(vocab), pa.string())],
        schema=schemas.vocab_schema(),
    )


def inferred_shape(activations: Mapping[str, np.ndarray], d_vocab: int) -> ModelShape:
    """A shape that fits the arrays: blocks up to the deepest hook, the width of the first
    dense hook as d_model, heads and d_head of the first per-head hook."""
    fields: dict[str, Any] = {"d_vocab": d_vocab}
    blocks = [int(h.split(".")[1]) for h in activations if h.startswith("blocks.")]
    if blocks:
        fields["n_layers"] = max(blocks) + 1
    for hook, values in activations.items():
        kind = family_kind(hook_family(hook))
        if kind == "dense":
            fields.setdefault("d_model", values.shape[-1])
        elif kind == "head":
            fields.setdefault("n_heads", values.shape[2])
            fields.setdefault("d_head", values.shape[3])
    return synthetic_shape(**fields)
