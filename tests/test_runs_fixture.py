"""The shared synthetic-run fixture (``tests/runs.py``): everything it writes reads back
through ``RunReader`` as the arrays it was given, staged or not."""

from __future__ import annotations

import numpy as np
import pytest
from runs import synthetic_shape, write_run

from arrakis_ray.errors import StoreError
from arrakis_ray.store.reader import RunReader

N_SEQ, N_POS, WIDTH, N_HEADS, D_HEAD, N_LAYERS = 5, 4, 3, 2, 2, 4
VOCAB = ["<bos>", " a", " b", " c"]


def _arrays(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, len(VOCAB), (N_SEQ, N_POS)).astype(np.int32)
    acts = {"hook_embed": rng.standard_normal((N_SEQ, N_POS, WIDTH))}
    for i in range(N_LAYERS):
        acts[f"blocks.{i}.hook_resid_post"] = rng.standard_normal((N_SEQ, N_POS, WIDTH))
        acts[f"blocks.{i}.attn.hook_z"] = rng.standard_normal((N_SEQ, N_POS, N_HEADS, D_HEAD))
        pattern = rng.random((N_SEQ, N_HEADS, N_POS, N_POS))
        acts[f"blocks.{i}.attn.hook_pattern"] = pattern / pattern.sum(-1, keepdims=True)
    return token_ids, acts


def _by_key(table, keys: list[str]) -> dict[tuple, np.ndarray]:
    dims = sorted((c for c in table.column_names if c[0] == "d" and c[1:].isdigit()), key=len)
    values = np.column_stack([table[c].to_numpy() for c in dims or ["weight"]])
    key_cols = [table[k].to_pylist() for k in keys]
    return {tuple(k): v for k, v in zip(zip(*key_cols, strict=True), values, strict=True)}


@pytest.mark.parametrize("stages", [None, [(0, 1), (1, 4)]], ids=["whole", "staged"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_synthetic_run_reads_back_as_its_arrays(tmp_path, stages, dtype):
    token_ids, acts = _arrays()
    docs = [{"text": f"doc {i}", "label": ["x", "y"][i % 2], "n": i} for i in range(N_SEQ)]
    shape = synthetic_shape(
        n_layers=N_LAYERS, d_model=WIDTH, n_heads=N_HEADS, d_head=D_HEAD, d_vocab=len(VOCAB)
    )
    layout = write_run(
        tmp_path / "store", "run-1", token_ids, VOCAB, acts, shard_size=2, documents=docs,
        dtype=dtype, doc_offset=10, shape=shape, stages=stages, name="fixture", seconds=2.0,
    )  # fmt: skip
    reader = RunReader(layout)
    m = reader.manifest
    assert (m.run_id, m.name, m.status, m.shape) == ("run-1", "fixture", "complete", shape)
    assert m.hooks == tuple(acts)
    assert [(s.shard, s.count, s.first_doc) for s in m.shard_plan] == [
        (0, 2, 10),
        (1, 2, 12),
        (2, 1, 14),
    ]
    assert m.stages == (tuple(tuple(s) for s in stages) if stages else ((0, N_LAYERS),))
    assert (m.data.n_documents, m.data.n_shards) == (N_SEQ, 3)
    assert m.harvest.n_tokens == N_SEQ * N_POS and m.harvest.tokens_per_s == 10.0
    assert m.config["data"]["keep_columns"] == ["text", "label", "n"]
    assert m.config["harvest"]["storage_dtype"] == dtype
    assert reader.shards == [0, 1, 2]
    assert reader.families == ["attn_pattern", "attn_z", "embed", "resid_post"]
    assert reader.vocab.tolist() == VOCAB

    seen = set()
    for shard in reader.shards:
        tokens = reader.tokens(shard)
        columns = ("seq_id", "pos", "doc_id", "doc_pos", "token_id", "token_text")
        for s, p, d, dp, t, text in zip(*(tokens[c].to_pylist() for c in columns), strict=True):
            assert (d, dp, t, text) == (s + 10, p, token_ids[s, p], VOCAB[token_ids[s, p]])
            seen.add((s, p))
    assert seen == {(s, p) for s in range(N_SEQ) for p in range(N_POS)}

    for hook, values in acts.items():
        family = hook.split(".")[-1].removeprefix("hook_")
        family = {"z": "attn_z", "pattern": "attn_pattern"}.get(family, family)
        layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else -1
        got = {}
        for _, table in reader.iter_activations(family, layer=layer):
            if family == "attn_pattern":
                got |= _by_key(table, ["seq_id", "head", "q_pos", "k_pos"])
            elif family == "attn_z":
                got |= _by_key(table, ["seq_id", "pos", "head"])
            else:
                got |= _by_key(table, ["seq_id", "pos"])
        if family == "attn_pattern":
            want = {
                (s, h, q, k): values[s, h, q, k]
                for s in range(N_SEQ)
                for h in range(N_HEADS)
                for q in range(N_POS)
                for k in range(q + 1)
            }
            assert got.keys() == want.keys()
            np.testing.assert_array_equal(
                np.concatenate([got[k] for k in want]), np.float32(list(want.values()))
            )
            continue
        stored = values.astype(dtype)
        assert got.keys() == set(np.ndindex(stored.shape[:-1])), hook
        for key, vec in got.items():
            np.testing.assert_array_equal(vec, stored[key])

    labels = reader.documents("label")
    assert labels == {10 + i: ["x", "y"][i % 2] for i in range(N_SEQ)}
    assert reader.documents("n") == {10 + i: str(i) for i in range(N_SEQ)}  # JSON text
    with pytest.raises(StoreError, match="did not keep the input column 'relation'"):
        reader.documents("relation")
