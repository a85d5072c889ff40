"""A stored run of synthetic activations, written with the store's own writers.

It mirrors what the harvest writes (tokens, vocab, one dense activation family split in
shards, completion markers, a manifest with the model shape, hooks and shard plan over
an input JSONL file), so run-scope tools read it through ``RunInputs`` exactly as they
read a harvested run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from arrakis_ray.harvest.inputs import plan_shards
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store.layout import RunLayout, init_store
from arrakis_ray.store.manifest import read_manifest, write_manifest
from arrakis_ray.store.parquet import write_table
from arrakis_ray.store.schemas import activation_schema, tokens_schema, vocab_schema
from arrakis_ray.tools.base import RunInputs

VOCAB = ["<bos>", "a", "b", "c", "d"]


def write_synthetic_run(
    root: Path,
    hook_template: str,
    acts: dict[int, np.ndarray],
    *,
    documents: list[dict] | None = None,
    shard_size: int = 50,
    dtype: str = "float32",
    run_id: str = "synthetic",
) -> RunLayout:
    """Store ``acts`` (layer -> [n_seq, n_pos, width]) as hook family ``hook_template``.

    Sequence i is document i of ``documents`` (written as the run's input JSONL; default
    one ``{"text": ...}`` per sequence); shards hold ``shard_size`` sequences each.
    """
    store = init_store(root / "store")
    layout = RunLayout(store, run_id)
    layers = sorted(acts)
    n_seq, n_pos, width = acts[layers[0]].shape
    documents = documents or [{"text": f"doc {i}"} for i in range(n_seq)]
    assert len(documents) == n_seq
    data_path = root / "inputs.jsonl"
    data_path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    shards = plan_shards(data_path, shard_size)
    hooks = [hook_template.format(layer=layer) for layer in layers]
    family = store_layout.hook_family(hooks[0])

    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, len(VOCAB), size=(n_seq, n_pos)).astype(np.int32)
    token_ids[:, 0] = 0
    for shard in shards:
        seqs = np.arange(shard.first_doc, shard.first_doc + shard.count)
        seq, pos = (a.ravel() for a in np.meshgrid(seqs, np.arange(n_pos), indexing="ij"))
        n = len(seq)
        tokens = pa.table(
            {
                "run_id": pa.array([run_id] * n),
                "seq_id": pa.array(seq.astype(np.int64)),
                "pos": pa.array(pos.astype(np.int32)),
                "doc_id": pa.array(seq.astype(np.int64)),  # one document per sequence
                "doc_pos": pa.array(pos.astype(np.int32)),
                "token_id": pa.array(token_ids[seq, pos]),
                "token_text": pa.array([VOCAB[t] for t in token_ids[seq, pos]]),
            }
        )
        write_table(
            tokens,
            layout.shard_file(layout.tokens_dir, shard.shard),
            schema_name="tokens",
            schema_version=1,
            expected=tokens_schema(),
        )
        parts = []
        for layer in layers:
            rows = acts[layer][seq, pos].astype(dtype)
            parts.append(
                pa.table(
                    {
                        "run_id": pa.array([run_id] * n),
                        "layer": pa.array(np.full(n, layer, np.int16)),
                        "seq_id": pa.array(seq.astype(np.int64)),
                        "pos": pa.array(pos.astype(np.int32)),
                        **{f"d{i}": pa.array(rows[:, i]) for i in range(width)},
                    }
                )
            )
        write_table(
            pa.concat_tables(parts),
            layout.shard_file(layout.activation_dir(family), shard.shard),
            schema_name="activation.dense",
            schema_version=1,
            expected=activation_schema("dense", width, dtype),
        )
        layout.completions_dir.mkdir(parents=True, exist_ok=True)
        layout.completion_marker(shard.shard).touch()

    write_table(
        pa.table({"token_id": pa.array(range(len(VOCAB)), pa.int32()), "token_text": VOCAB}),
        layout.vocab_path,
        schema_name="vocab",
        schema_version=1,
        expected=vocab_schema(),
    )
    write_manifest(
        layout,
        {
            "run_id": run_id,
            "name": "synthetic",
            "status": "complete",
            "hooks": hooks,
            "model": {"arch": "synthetic", "n_layers": max(layers) + 1, "d_model": width},
            "data": {"path": str(data_path), "n_documents": n_seq, "n_sequences": n_seq},
            "shard_plan": [s.to_dict() for s in shards],
            "results": {},
        },
    )
    return layout


def run_inputs(layout: RunLayout) -> RunInputs:
    """The RunInputs the runner would hand a run-scope tool for this run."""
    return RunInputs(
        run_id=layout.run_id,
        layout=layout,
        manifest=read_manifest(layout),
        vocab=np.asarray(VOCAB, dtype=object),
        shards=sorted(layout.completed_shards()),
    )
