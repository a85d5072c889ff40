"""Plan a harvest without running it: run id, shard plan, stages, size, model shape.

``plan_run`` is pure: it starts no Ray and runs no forward pass. The model's shape comes
from the model built on torch's ``meta`` device (no memory, no weights), kept on disk
with the tokenizer's facts and the model's fingerprint (``facts_cache``: a new process
planning a known model imports neither torch nor transformers), and everything that
reads the data (its fingerprint, the shard plan) is cached per process by the files'
stamps, so a sweep plans a thousand variants of one pipeline in seconds
(benchmarks/plan.py, benchmarks/sweep_plan.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from arrakis_ray.config import DataConfig, ModelConfig, PipelineConfig
from arrakis_ray.errors import ConfigError
from arrakis_ray.harvest import facts_cache, inputs
from arrakis_ray.harvest.checks import (
    check_position_limit,
    check_tokenizer_fits,
    named_in,
)
from arrakis_ray.harvest.facts_cache import HookShape, file_stamp, tokenizer_facts
from arrakis_ray.harvest.model_source import tokenizer_dir
from arrakis_ray.store.manifest import ModelShape, Shard
from arrakis_ray.store.plan import RunPlan

# Auto shard size: ~128 MiB of activations per shard. Fewer, larger files make every
# query open fewer Parquet footers (top-k of one neuron over 2M rows: 256 files of 8 MB
# 0.31 s, 16 files of 128 MB 0.06 s; benchmarks/BENCHMARKS.md), while a shard stays
# small enough to hold in an actor's memory and cheap to redo on resume.
SHARD_BYTES = 128 << 20
SHARD_SIZE_RANGE = (16, 4096)
MIN_SHARDS = 4  # a small corpus is still split, so a few actors share it
# packed mode: a corpus's tokens per byte are measured on 8 runs of 32 documents
SAMPLE_PIECES, SAMPLE_DOCS = 8, 32


def plan_run(config: PipelineConfig) -> RunPlan:
    """The plan of harvesting ``config``: checks the model, hooks, data and budget.

    Raises the user's error (ConfigError, DataError, UnknownHookError, ModelLoadError)
    before anything is written anywhere.
    """
    with named_in(config.source):
        return _plan_run(config)


def _plan_run(config: PipelineConfig) -> RunPlan:
    facts = facts_cache.model_facts(config.model, config.source)
    shape = facts.shape
    hook_names, hook_shapes = facts.resolve(config.harvest.hooks)
    # the check reads the limit off an HF config; the facts keep only the limit
    check_position_limit(config, SimpleNamespace(max_position_embeddings=facts.position_limit))
    check_tokenizer_fits(config, tokenizer_facts(config.model), shape.d_vocab)
    if config.harvest.shard_size is None:  # resolved before the run id is hashed
        size = auto_shard_size(config, hook_shapes)
        config = replace(config, harvest=replace(config.harvest, shard_size=size))
    shards = _plan_shards(config.data.path, config.harvest.shard_size, config.data.max_documents)
    inputs.check_columns(list(shards), config.data)
    stages = stage_ranges(config, shape.n_layers)
    identity = {
        "model": facts_cache.model_fingerprint(config.model),
        "data": _data_fingerprint(shards, config.data),
        "hooks": list(hook_names),
        "context_length": config.data.context_length,
        "mode": config.data.mode,
        "storage_dtype": config.harvest.storage_dtype,
        "shard_size": config.harvest.shard_size,
    }
    if len(stages) > 1:  # a staged run is a run of its own (its files equal a whole one's)
        identity["stages"] = [list(s) for s in stages]
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    max_tokens = _max_tokens(config, shards)
    predicted = predict_bytes(
        hook_shapes, max_tokens, config.data.context_length, config.harvest.storage_dtype
    )
    budget = config.harvest.max_bytes
    if budget is not None and predicted > budget:
        raise ConfigError(
            f"{config.source}: harvest.max_bytes: this run may write up to {predicted:,} bytes "
            f"(at most {max_tokens:,} tokens), over the budget of "
            f"{budget:,}; harvest fewer hooks or documents, or raise the budget"
        )
    return RunPlan(
        config=config,
        run_id=run_id,
        identity=identity,
        hooks=hook_names,
        shape=shape,
        shards=shards,
        stages=stages,
        max_tokens=max_tokens,
        predicted_bytes=predicted,
        model_source=_model_source(config.model),
    )


def hook_shapes(config: PipelineConfig) -> tuple[HookShape, ...]:
    """What each of the config's hooks stores per token."""
    return facts_cache.model_facts(config.model, config.source).resolve(config.harvest.hooks)[1]


def model_shape(model) -> ModelShape:
    """The shape of a HookedModel (real or on the meta device)."""
    return ModelShape(
        arch=model.arch,
        n_layers=model.n_layers,
        d_model=model.d_model,
        d_mlp=model.d_mlp,
        n_heads=model.n_heads,
        n_kv_heads=model.n_kv_heads,
        d_head=model.d_head,
        d_vocab=model.vocab_size,
        norm=_norm_name(model.adapter.norm),
        positional=model.positional,
        parallel_blocks=model.parallel_residual,
    )


def _norm_name(kind: str | None) -> str:
    # gemma's (1 + w) gain is a parametrisation of RMSNorm, not another norm
    if kind is None:
        return "none"
    return "layernorm" if kind == "layernorm" else "rmsnorm"


def _plan_shards(path: str, shard_size: int, max_documents: int | None) -> tuple[Shard, ...]:
    files = inputs.input_files(path)
    return _cached_shards(
        path, shard_size, max_documents, json.dumps([file_stamp(f) for f in files])
    )


@lru_cache(maxsize=256)
def _cached_shards(path: str, shard_size: int, max_documents, _stamps: str) -> tuple[Shard, ...]:
    return tuple(inputs.plan_shards(path, shard_size, max_documents))


def _data_fingerprint(shards: tuple[Shard, ...], data: DataConfig) -> str:
    files = dict.fromkeys(s.file for s in shards)
    stamps = json.dumps([file_stamp(Path(f)) for f in files])
    columns = (data.text_column, data.token_column, tuple(data.keep_columns))
    return _cached_data_fingerprint(shards, columns, stamps)


@lru_cache(maxsize=256)
def _cached_data_fingerprint(shards: tuple[Shard, ...], columns: tuple, _stamps: str) -> str:
    return inputs.data_fingerprint(list(shards), *columns)


def _max_tokens(config: PipelineConfig, shards) -> int:
    n_docs = sum(s.count for s in shards)
    if config.data.mode == "document":  # every document cut to the context length
        return n_docs * config.data.context_length
    # packed: nothing is cut; every document's tokens, plus BOS and EOS
    return input_tokens_bound(shards, config.data.token_column) + 2 * n_docs


def input_tokens_bound(shards, token_column: str | None) -> int:
    """An upper bound of the tokens in the input files the shards come from.

    Text (and JSON lists of ids) takes at least one byte per token, so the files' bytes
    bound it. Ids in a .npy array or a Parquet list column may take less (compression,
    dictionaries), so those are counted: the array's shape, the column's value count.
    """
    total = 0
    for file, fmt in {(s.file, s.format) for s in shards}:
        if fmt == "npy":
            total += math.prod(np.load(file, mmap_mode="r").shape)
        elif fmt == "parquet" and token_column is not None:
            total += _parquet_values(file, token_column)
        else:
            total += Path(file).stat().st_size
    return total


def _parquet_values(file: str, column: str) -> int:
    """Values of one (list) column of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    leaves = [
        i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == column
    ]
    return sum(meta.row_group(g).column(i).num_values for g in range(meta.num_row_groups)
               for i in leaves)  # fmt: skip


def shard_size_for(bytes_per_document: int) -> int:
    """Documents per shard for ~SHARD_BYTES of activations, clamped to SHARD_SIZE_RANGE."""
    low, high = SHARD_SIZE_RANGE
    return max(low, min(high, SHARD_BYTES // max(1, bytes_per_document)))


def auto_shard_size(config: PipelineConfig, hook_shapes: tuple[HookShape, ...]) -> int:
    """The default ``shard_size``: ~SHARD_BYTES of activations per shard.

    A document is at most one context of tokens in document mode; in packed mode its
    tokens are estimated from its bytes (``packed_tokens_per_document``). A corpus too
    small for MIN_SHARDS such shards gets smaller ones. The result depends only on the
    data, the model, the hooks and the context, never on how many actors run: a rerun
    with other resources plans the same shards, keeps the same run id and resumes.
    """
    context = config.data.context_length
    shards = _plan_shards(config.data.path, SHARD_SIZE_RANGE[1], config.data.max_documents)
    n_docs = sum(s.count for s in shards)
    if config.data.mode == "document":
        tokens_per_doc = context
    else:
        tokens_per_doc = math.ceil(packed_tokens_per_document(config))
    per_doc = predict_bytes(hook_shapes, tokens_per_doc, context, config.harvest.storage_dtype)
    return max(1, min(shard_size_for(per_doc), -(-n_docs // MIN_SHARDS)))


def packed_tokens_per_document(config: PipelineConfig) -> float:
    """Mean tokens of a document in packed mode (BOS and EOS included), estimated from
    the bytes of the documents the run reads (its first ``data.max_documents``, not
    whole files) times the tokens per byte of a sample: SAMPLE_PIECES runs of up to
    SAMPLE_DOCS documents spread over them, tokenized as the harvest does. An estimate,
    not an upper bound: a JSONL line of English text takes ~4 to 6 bytes per token (its
    field names and other columns add bytes, not tokens), so one byte per token would
    make shards several times too small. Kept by the files' stamps (``facts_cache``).
    """
    data, model = config.data, config.model
    files = inputs.input_files(data.path)
    key = {
        "model": facts_cache.shape_key(model),
        "tokenizer": facts_cache.dir_stamps(tokenizer_dir(model)),
        "data": [data.path, data.text_column, data.token_column, data.max_documents],
        "files": [file_stamp(f) for f in files],
    }
    return facts_cache.cached(
        "tokens_per_document", key, lambda: _measure_tokens_per_document(config), _tokens_value
    )


def _tokens_value(value) -> float:
    """A cached mean (a corrupt entry raises, and is measured again)."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"tokens per document {value!r}")
    return float(value)


def _measure_tokens_per_document(config: PipelineConfig) -> float:
    from arrakis_ray.harvest.batch import SHARD_FIELDS
    from arrakis_ray.harvest.tokenize import TokenizeShard

    data = config.data
    n_docs = sum(s.count for s in _plan_shards(data.path, SHARD_SIZE_RANGE[1], data.max_documents))
    # SAMPLE_PIECES or more pieces (one more per file boundary) covering every document
    pieces = _plan_shards(data.path, -(-n_docs // SAMPLE_PIECES), data.max_documents)
    k = min(SAMPLE_PIECES, len(pieces))
    sample = [pieces[i * len(pieces) // k] for i in range(k)]
    sample = [replace(s, count=min(s.count, SAMPLE_DOCS)) for s in sample]
    step = TokenizeShard(config, facts_cache.model_facts(config.model, config.source).shape.d_vocab)
    out = step({f: np.array([getattr(s, f) for s in sample]) for f in SHARD_FIELDS})
    tokens = sum(int(lengths.sum()) for lengths in out["lengths"])
    sample_bytes = sum(inputs.shard_bytes(s) for s in sample)
    total_bytes = sum(inputs.shard_bytes(s) for s in pieces)
    return tokens * total_bytes / (max(1, sample_bytes) * n_docs)  # one rounding


def predict_bytes(
    hook_shapes: tuple[HookShape, ...], max_tokens: int, context: int, dtype: str
) -> int:
    """Upper bound of the run's size on disk for at most ``max_tokens`` tokens.

    Values are stored uncompressed in effect (activations barely compress), plus the
    key columns of each row (layer 2 B, seq_id 8 B, pos 4 B, head 2 B; patterns: q_pos,
    k_pos 4 B each and a float32 weight).
    """
    value = 2 if dtype == "float16" else 4
    per_token = 40  # tokens table: ids, positions, text
    for _hook, kind, width, heads in hook_shapes:
        if kind == "dense":
            per_token += width * value + 14
        elif kind == "head":
            per_token += heads * (width * value + 16)
        else:  # a query attends to (context + 1) / 2 keys on average
            per_token += heads * (context + 1) // 2 * 24
    return max_tokens * per_token


def stage_ranges(config: PipelineConfig, n_layers: int) -> tuple[tuple[int, int], ...]:
    """The pipeline stages' block ranges: ((0, n_layers),) unless the model is staged."""
    where = f"{config.source}: harvest"
    if config.harvest.layer_ranges:
        ranges = [tuple(r) for r in config.harvest.layer_ranges]
        expected_start = 0
        for r in ranges:
            if len(r) != 2 or r[0] != expected_start or r[1] <= r[0]:
                raise ConfigError(
                    f"{where}.layer_ranges: {[list(x) for x in ranges]} must be contiguous "
                    f"[start, stop) pairs from 0 to n_layers = {n_layers}"
                )
            expected_start = r[1]
        if expected_start != n_layers:
            raise ConfigError(
                f"{where}.layer_ranges: the ranges end at {expected_start}, but the model has "
                f"{n_layers} layers"
            )
        return tuple(ranges)
    if config.harvest.stages > n_layers:
        raise ConfigError(f"{where}.stages: {config.harvest.stages} stages for {n_layers} layers")
    if config.harvest.stages == 1:  # even_ranges' answer, without importing torch (models/)
        return ((0, n_layers),)
    from arrakis_ray.models.stage import even_ranges

    return tuple(tuple(r) for r in even_ranges(n_layers, config.harvest.stages))


def _model_source(m: ModelConfig) -> str:
    return f"zoo:{m.zoo}" if m.zoo else (m.path if m.path else f"random:{m.arch}")
