"""A small store written with the shared fixture (``runs.write_run``), and the arrays
behind it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from runs import synthetic_shape, write_activations, write_run
from support import reinventory

from arrakis_ray import hooks
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import ToolRecord, read_manifest
from arrakis_ray.store.schemas import load_schema
from arrakis_ray.store.writer import RunWriter

N_SEQ, N_POS, WIDTH, N_HEADS, D_HEAD, N_LAYERS = 3, 5, 6, 2, 4, 2
SHARD_SIZE = 2  # sequences per shard: two shards, split by sequence as the harvest does
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
    manifest: dict = field(default_factory=dict)  # manifest.json as written


def _dense_hooks(family: str, data: np.ndarray) -> dict[str, np.ndarray]:
    """Hook -> [seq, pos, width] values of a dense block family from [layer, seq, pos, width]."""
    return {hooks.family_hook(family, layer): values for layer, values in enumerate(data)}


def _write_dense(layout: RunLayout, family: str, data: np.ndarray, dtype: str) -> None:
    """Rewrite a dense family of a stored run with ``data`` [layer, seq, pos, width]."""
    manifest = read_manifest(layout)
    writer = RunWriter.for_layout(layout)
    for shard in manifest.shard_plan:
        write_activations(writer, manifest, _dense_hooks(family, data), shard, dtype)
    reinventory(layout)  # the fixture's new values are the run's


def build_run(store: Path, run_id: str, dtype: str, seed: int, full: bool) -> RunData:
    """Write one run: tokens, vocab, resid_post, manifest (+ attn_q, attn_pattern, results)."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, len(VOCAB), size=(N_SEQ, N_POS)).astype(np.int32)
    resid = rng.standard_normal((N_LAYERS, N_SEQ, N_POS, WIDTH)).astype(dtype)
    data = RunData(run_id, dtype, token_ids, resid)
    activations = _dense_hooks("resid_post", resid)

    if full:
        data.q = rng.standard_normal((N_LAYERS, N_SEQ, N_POS, N_HEADS, D_HEAD)).astype(dtype)
        # Causal softmax patterns [layer, seq, head, q, k].
        scores = rng.standard_normal((N_LAYERS, N_SEQ, N_HEADS, N_POS, N_POS))
        scores[..., np.triu_indices(N_POS, 1)[0], np.triu_indices(N_POS, 1)[1]] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        data.pattern = (weights / weights.sum(-1, keepdims=True)).astype(np.float32)
        activations |= {f"blocks.{i}.attn.hook_q": data.q[i] for i in range(N_LAYERS)}
        activations |= {f"blocks.{i}.attn.hook_pattern": data.pattern[i] for i in range(N_LAYERS)}

    layout = write_run(
        store,
        run_id,
        token_ids,
        VOCAB,
        activations,
        shard_size=SHARD_SIZE,
        dtype=dtype,
        doc_offset=100,  # doc ids unlike seq ids: a join on the wrong key shows
        shape=synthetic_shape(
            n_layers=N_LAYERS, d_model=WIDTH, n_heads=N_HEADS, d_head=D_HEAD, d_vocab=len(VOCAB)
        ),
        name=f"test-{run_id}",
        model_source=f"tiny-{seed}",
        created_at=f"2025-01-0{seed}T00:00:00+00:00",
        seconds=N_SEQ * N_POS / (10.0 * seed),  # 10 * seed tokens per second
    )
    if full:
        toy = load_schema("result.toy")
        result = pa.table(
            {
                "run_id": pa.array([run_id] * N_LAYERS),
                "layer": pa.array(range(N_LAYERS), pa.int16()),
                "score": pa.array(resid.astype(np.float64).mean(axis=(1, 2, 3))),
            }
        )
        writer = RunWriter.for_layout(layout)
        entry = writer.write_result("toy", 0, result, toy.arrow(), toy.version)
        record = ToolRecord({}, ("toy",), toy.version, 1, entry.rows, 0.0, "2025-01-02T00:00:00Z")
        writer.record_tool("toy", replace(record, files=(entry,)))
    data.manifest = read_manifest(layout).to_json()
    return data
