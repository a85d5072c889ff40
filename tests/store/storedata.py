"""A small store written with the store's own writer, and the arrays behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import write_manifest
from arrakis_ray.store.parquet import write_table
from arrakis_ray.store.schemas import activation_schema, load_schema, tokens_schema, vocab_schema

N_SEQ, N_POS, WIDTH, N_HEADS, D_HEAD, N_LAYERS = 3, 5, 6, 2, 4, 2
VOCAB = ["<s>", " the", " cat", "\n", ",", ' "x"', "é"]

TOY_RESULT_SCHEMA = {
    "name": "result.toy",
    "version": 1,
    "doc": "Test tool: one score per layer.",
    "fields": [
        {"name": "run_id", "type": "string", "nullable": False, "doc": "run"},
        {"name": "layer", "type": "int16", "nullable": False, "doc": "layer"},
        {"name": "score", "type": "float64", "nullable": True, "doc": "score"},
    ],
}


@dataclass
class RunData:
    """What one test run holds, as numpy arrays (the reference for SQL checks)."""

    run_id: str
    dtype: str
    token_ids: np.ndarray  # [seq, pos]
    resid: np.ndarray  # [layer, seq, pos, width] in the storage dtype
    q: np.ndarray | None = None  # [layer, seq, pos, head, d_head]
    pattern: np.ndarray | None = None  # [layer, seq, head, q, k]
    manifest: dict = field(default_factory=dict)


def _write_dense(layout: RunLayout, family: str, data: np.ndarray, dtype: str) -> None:
    n_layers, n_seq, n_pos, width = data.shape
    layer, seq, pos = np.meshgrid(
        np.arange(n_layers), np.arange(n_seq), np.arange(n_pos), indexing="ij"
    )
    flat = data.reshape(-1, width)
    columns = {
        "run_id": pa.array([layout.run_id] * flat.shape[0]),
        "layer": pa.array(layer.ravel().astype(np.int16)),
        "seq_id": pa.array(seq.ravel().astype(np.int64)),
        "pos": pa.array(pos.ravel().astype(np.int32)),
        **{f"d{i}": pa.array(flat[:, i]) for i in range(width)},
    }
    # Two shards split by sequence, as the harvest would write them.
    table = pa.table(columns)
    half = (n_seq // 2) * n_pos * n_layers
    expected = activation_schema("dense", width, dtype)
    mask = pa.array(seq.ravel() < n_seq // 2)
    for shard, part in enumerate([table.filter(mask), table.filter(pc.invert(mask))]):
        assert part.num_rows in (half, table.num_rows - half)
        path = layout.shard_file(layout.activation_dir(family), shard)
        write_table(part, path, schema_name="activation.dense", schema_version=1, expected=expected)


def build_run(store: Path, run_id: str, dtype: str, seed: int, full: bool) -> RunData:
    """Write one run: tokens, vocab, resid_post, manifest (+ attn_q, attn_pattern, results)."""
    rng = np.random.default_rng(seed)
    layout = RunLayout(store, run_id)
    token_ids = rng.integers(0, len(VOCAB), size=(N_SEQ, N_POS)).astype(np.int32)
    resid = rng.standard_normal((N_LAYERS, N_SEQ, N_POS, WIDTH)).astype(dtype)
    data = RunData(run_id, dtype, token_ids, resid)

    seq, pos = np.meshgrid(np.arange(N_SEQ), np.arange(N_POS), indexing="ij")
    tokens = pa.table(
        {
            "run_id": pa.array([run_id] * N_SEQ * N_POS),
            "seq_id": pa.array(seq.ravel().astype(np.int64)),
            "pos": pa.array(pos.ravel().astype(np.int32)),
            "doc_id": pa.array(seq.ravel().astype(np.int64) + 100),
            "doc_pos": pa.array(pos.ravel().astype(np.int32)),
            "token_id": pa.array(token_ids.ravel()),
            "token_text": pa.array([VOCAB[t] for t in token_ids.ravel()]),
        }
    )
    write_table(
        tokens,
        layout.shard_file(layout.tokens_dir, 0),
        schema_name="tokens",
        schema_version=1,
        expected=tokens_schema(),
    )
    vocab = pa.table(
        {"token_id": pa.array(range(len(VOCAB)), pa.int32()), "token_text": pa.array(VOCAB)}
    )
    write_table(
        vocab, layout.vocab_path, schema_name="vocab", schema_version=1, expected=vocab_schema()
    )
    _write_dense(layout, "resid_post", resid, dtype)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]

    if full:
        data.q = rng.standard_normal((N_LAYERS, N_SEQ, N_POS, N_HEADS, D_HEAD)).astype(dtype)
        idx = np.indices(data.q.shape[:4]).reshape(4, -1)
        flat = data.q.reshape(-1, D_HEAD)
        q_table = pa.table(
            {
                "run_id": pa.array([run_id] * flat.shape[0]),
                "layer": pa.array(idx[0].astype(np.int16)),
                "seq_id": pa.array(idx[1].astype(np.int64)),
                "pos": pa.array(idx[2].astype(np.int32)),
                "head": pa.array(idx[3].astype(np.int16)),
                **{f"d{i}": pa.array(flat[:, i]) for i in range(D_HEAD)},
            }
        )
        write_table(
            q_table,
            layout.shard_file(layout.activation_dir("attn_q"), 0),
            schema_name="activation.head",
            schema_version=1,
            expected=activation_schema("head", D_HEAD, dtype),
        )
        # Causal softmax patterns [layer, seq, head, q, k].
        scores = rng.standard_normal((N_LAYERS, N_SEQ, N_HEADS, N_POS, N_POS))
        scores[..., np.triu_indices(N_POS, 1)[0], np.triu_indices(N_POS, 1)[1]] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        data.pattern = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
        idx = np.indices(data.pattern.shape).reshape(5, -1)
        keep = idx[4] <= idx[3]
        p_table = pa.table(
            {
                "run_id": pa.array([run_id] * int(keep.sum())),
                "layer": pa.array(idx[0][keep].astype(np.int16)),
                "seq_id": pa.array(idx[1][keep].astype(np.int64)),
                "head": pa.array(idx[2][keep].astype(np.int16)),
                "q_pos": pa.array(idx[3][keep].astype(np.int32)),
                "k_pos": pa.array(idx[4][keep].astype(np.int32)),
                "weight": pa.array(data.pattern.ravel()[keep]),
            }
        )
        write_table(
            p_table,
            layout.shard_file(layout.activation_dir("attn_pattern"), 0),
            schema_name="activation.pattern",
            schema_version=1,
            expected=activation_schema("pattern", 0, dtype),
        )
        toy = load_schema("result.toy")
        result = pa.table(
            {
                "run_id": pa.array([run_id] * N_LAYERS),
                "layer": pa.array(range(N_LAYERS), pa.int16()),
                "score": pa.array(resid.astype(np.float64).mean(axis=(1, 2, 3))),
            }
        )
        write_table(
            result,
            layout.shard_file(layout.results_dir("toy"), 0),
            schema_name=toy.name,
            schema_version=toy.version,
            expected=toy.arrow(),
        )
        hooks += [f"blocks.{i}.attn.hook_q" for i in range(N_LAYERS)]
        hooks += [f"blocks.{i}.attn.hook_pattern" for i in range(N_LAYERS)]

    data.manifest = {
        "name": f"test-{run_id}",
        "status": "complete",
        "created_at": f"2025-01-0{seed}T00:00:00+00:00",
        "model": {"arch": "gpt2", "source": f"tiny-{seed}"},
        "hooks": hooks,
        "stats": {"n_sequences": N_SEQ, "n_tokens": N_SEQ * N_POS, "tokens_per_s": 10.0 * seed},
        "schema_versions": {"tokens": 1},
    }
    write_manifest(layout, data.manifest)
    layout.completions_dir.mkdir(parents=True, exist_ok=True)
    layout.completion_marker(0).touch()
    return data
