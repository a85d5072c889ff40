"""Attention tools: every score equals a direct computation from dense attention matrices.

The stored patterns of the demo run are rebuilt as one [q, k] matrix per (sequence,
layer, head) and scored with plain loops; the induction score is recomputed with HF's
own eager attention; a hand-set 2-layer gpt2 (a previous-token head feeding an
induction head) must show both heads; synthetic patterns check the induction offset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from support import DEMO_DATA, family_table

from arrakis_ray.errors import ToolError
from arrakis_ray.reports.attention_charts import SCORES, head_score_heatmap, head_scores_grid
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.attention_tools import (
    induction_score_from_patterns,
    induction_tokens,
)
from arrakis_ray.tools.base import ShardInputs
from arrakis_ray.tools.runner import analyze, make_tool


def run_tool(run_dir, params: dict | None = None, model=None) -> dict:
    """compute_shard on every shard, then reduce: the runner's path, without Ray."""
    layout = store_layout.RunLayout(run_dir.parents[1], run_dir.name)
    manifest = store_manifest.read_manifest(layout)
    reader = RunReader(layout, manifest)
    tool = make_tool("attention_tools", params)
    partials: dict[str, list] = {}
    for shard in reader.shards:
        inputs = ShardInputs(
            layout.run_id,
            shard,
            manifest,
            {"attn_pattern": reader.activations("attn_pattern", shard)},
            reader.tokens(shard),
            None,
        )
        for name, table in tool.compute_shard(inputs, None).items():
            partials.setdefault(name, []).append(table)
    # outputs outside reduced_outputs are final per shard: the runner writes them as is
    out = {k: pa.concat_tables(v) for k, v in partials.items() if k not in tool.reduced_outputs}
    out.update(tool.reduce(partials, manifest, model=model))
    return {k: v.to_pandas() for k, v in out.items()}


def dense_patterns(run_dir) -> tuple[dict, dict]:
    """(seq, layer, head) -> [q, k] matrix, and seq -> token ids, from the stored files."""
    pattern = family_table(run_dir, "attn_pattern").to_pandas()
    tokens = pd.read_parquet(run_dir / "tokens").sort_values(["seq_id", "pos"])
    ids = {s: g["token_id"].to_numpy() for s, g in tokens.groupby("seq_id")}
    mats = {}
    for (seq, layer, head), g in pattern.groupby(["seq_id", "layer", "head"]):
        n = len(ids[seq])
        mat = np.zeros((n, n))
        mat[g["q_pos"], g["k_pos"]] = g["weight"]
        mats[(seq, layer, head)] = mat
    return mats, ids


def direct_scores(mats: dict, ids: dict) -> pd.DataFrame:
    rows = {}
    for (seq, layer, head), a in mats.items():
        acc = rows.setdefault((layer, head), {"ent": [], "bos": [], "prev": [], "dup": []})
        tok = ids[seq]
        for q in range(len(a)):
            w = a[q, : q + 1]
            acc["ent"].append(-sum(x * np.log(x) for x in w if x > 0))
            if q >= 1:
                acc["bos"].append(a[q, 0])
                acc["prev"].append(a[q, q - 1])
            earlier = [k for k in range(q) if tok[k] == tok[q]]
            if earlier:
                acc["dup"].append(sum(a[q, k] for k in earlier))
    return pd.DataFrame(
        [
            {
                "layer": layer,
                "head": head,
                "entropy": np.mean(v["ent"]),
                "bos_attention": np.mean(v["bos"]),
                "prev_token_score": np.mean(v["prev"]),
                "duplicate_token_score": np.mean(v["dup"]) if v["dup"] else np.nan,
                "n_queries": len(v["ent"]),
                "n_duplicate_queries": len(v["dup"]),
            }
            for (layer, head), v in sorted(rows.items())
        ]
    )


def test_head_scores_match_dense_matrices(harvested):
    _, _, result = harvested
    got = run_tool(result.run_dir, {"induction_sequences": 0})["attention_head_scores"]
    want = direct_scores(*dense_patterns(result.run_dir))
    assert len(got) == 16 and got["induction_score"].isna().all()
    for col in ("entropy", "bos_attention", "prev_token_score", "duplicate_token_score"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-6, err_msg=col)
    for col in ("layer", "head", "n_queries", "n_duplicate_queries"):
        np.testing.assert_array_equal(got[col], want[col])
    assert (got["n_duplicate_queries"] > 0).all()  # the demo texts repeat some words


def test_top_positions_are_each_querys_heaviest_keys(harvested):
    _, _, result = harvested
    top = run_tool(result.run_dir, {"induction_sequences": 0, "top_k": 2})
    top = top["attention_top_positions"]
    mats, _ = dense_patterns(result.run_dir)
    expected = []
    for (seq, layer, head), a in mats.items():
        for q in range(1, len(a)):  # query 0 only sees BOS, which is excluded
            keys = sorted(range(1, q + 1), key=lambda k: (-a[q, k], k))[:2]
            expected += [(layer, seq, head, q, r + 1, k) for r, k in enumerate(keys)]
    got = top[["layer", "seq_id", "head", "q_pos", "rank", "k_pos"]].itertuples(index=False)
    assert sorted(map(tuple, got)) == sorted(expected)
    # a sequence's global top-2 pairs (BOS excluded) are among the per-query rows
    for (seq, layer, head), a in list(mats.items())[:20]:
        pairs = [(a[q, k], q, k) for q in range(len(a)) for k in range(1, q + 1)]
        best = sorted(pairs, reverse=True)[:2]
        rows = top[(top.seq_id == seq) & (top.layer == layer) & (top["head"] == head)]
        assert {(q, k) for _, q, k in best} <= set(zip(rows.q_pos, rows.k_pos, strict=True))


def test_induction_score_matches_hf_attentions(harvested, hf_model):
    from arrakis_ray.models import load_pretrained
    from arrakis_ray.zoo import zoo_path

    _, _, result = harvested
    model, tokenizer = hf_model
    params = {"induction_sequences": 3, "induction_seq_len": 10, "seed": 7}
    hooked = load_pretrained(zoo_path("facts-gpt2"))
    got = run_tool(result.run_dir, params, model=hooked)["attention_head_scores"]

    special = set(tokenizer.all_special_ids)
    candidates = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = induction_tokens(3, 10, candidates, tokenizer.bos_token_id, seed=7)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert (ids[:, 1:11] == ids[:, 11:]).all() and not set(ids[:, 1:].ravel()) & special
    assert all(len(set(row[1:11])) == 10 for row in ids)
    with torch.no_grad():
        attentions = model(torch.from_numpy(ids), output_attentions=True).attentions
    for layer, att in enumerate(attentions):
        for head in range(att.shape[1]):
            weights = [att[b, head, q, q - 9].item() for b in range(3) for q in range(11, 21)]
            row = got[(got.layer == layer) & (got["head"] == head)]
            np.testing.assert_allclose(row["induction_score"], np.mean(weights), rtol=1e-5)


def test_induction_offset_on_synthetic_patterns():
    seq_len, offset, n = 5, 1, 1 + 2 * 5
    pattern = np.zeros((2, 3, n, n))
    q = np.arange(n)
    pattern[:, 0, q, np.maximum(q - seq_len + 1, 0)] = 1.0  # an ideal induction head
    pattern[:, 1] = np.tril(np.ones((n, n))) / (q[:, None] + 1)  # uniform over the past
    pattern[:, 2, q, np.maximum(q - 1, 0)] = 1.0  # previous-token head
    score = induction_score_from_patterns(pattern, seq_len, offset)
    uniform = np.mean([1 / (q + 1) for q in range(offset + seq_len, n)])
    np.testing.assert_allclose(score, [1.0, uniform, 0.0])


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def handset_gpt2(path, vocab: int = 386, n_pos: int = 48) -> None:
    """Save a 2-layer gpt2 with a previous-token head (0.0) and an induction head (1.0).

    The residual stream has four 64-wide subspaces: T (token), P (position), S (the
    previous token, written by head 0.0) and one unused. Token and position codes are
    balanced +-1 vectors (zero mean, norm 8), so LayerNorm only rescales by a constant
    and the codes survive it. Position codes are Hadamard rows (orthogonal), so head
    0.0's query can be position i-1's code and its key position j's code; its value
    copies the token code into S. Head 1.0 matches the current token (T, query) against
    the previous token (S, key): K-composition. MLPs and other heads are zero (those
    heads attend uniformly).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    sub, d = 64, 256
    t, p, s = slice(0, sub), slice(sub, 2 * sub), slice(2 * sub, 3 * sub)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=n_pos, n_embd=d, n_layer=2, n_head=4, n_inner=4 * d,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    rng = np.random.default_rng(0)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = torch.ones_like(state[name])
    wte = np.zeros((vocab, d))
    wte[:, t] = [rng.permutation(np.repeat([1.0, -1.0], sub // 2)) for _ in range(vocab)]
    wpe = np.zeros((n_pos, d))
    hadamard = _hadamard(sub)
    wpe[:, p] = hadamard[1 : n_pos + 1]  # row 0 is all ones: not zero-mean
    code = hadamard / np.sqrt(sub)  # code @ x_P: position j -> one-hot at j + 1
    shift = np.eye(sub, k=1)  # one-hot at j + 1 -> one-hot at j
    attn0, attn1 = np.zeros((d, 3 * d)), np.zeros((d, 3 * d))
    attn0[p, 0:sub] = 4.0 * (shift @ code).T  # query of position i: code of i - 1
    attn0[p, d : d + sub] = 4.0 * code.T  # key of position j: code of j
    attn0[t, 2 * d : 2 * d + sub] = np.eye(sub)  # value: the token code
    proj0 = np.zeros((d, d))
    proj0[0:sub, s] = np.eye(sub)  # head 0 writes into S
    attn1[t, 0:sub] = 2.0 * np.eye(sub)  # query: this token
    attn1[s, d : d + sub] = np.eye(sub)  # key: the previous token
    as_tensor = {
        "transformer.wte.weight": wte,
        "lm_head.weight": wte,
        "transformer.wpe.weight": wpe,
        "transformer.h.0.attn.c_attn.weight": attn0,
        "transformer.h.0.attn.c_proj.weight": proj0,
        "transformer.h.1.attn.c_attn.weight": attn1,
    }
    state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in as_tensor.items()})
    model.load_state_dict(state)
    model.save_pretrained(path)


def test_handset_model_shows_its_previous_token_and_induction_heads(ray_session, tmp_path):
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.harvest.model_source import load_model

    torch.set_num_threads(1)
    handset_gpt2(tmp_path / "model")
    config = pipeline_from_dict(
        {
            "name": "handset",
            "model": {"path": str(tmp_path / "model"), "tokenizer": "zoo:facts-gpt2"},
            "data": {"path": str(DEMO_DATA), "context_length": 24, "max_documents": 8},
            "harvest": {
                "hooks": ["blocks.*.attn.hook_pattern"],
                "batch_size": 8,
                "shard_size": 8,
                "storage_dtype": "float32",
            },
        }
    )
    run = harvest(config, tmp_path / "store")
    scores = run_tool(run.run_dir, {"induction_sequences": 4}, model=load_model(config.model))
    scores = scores["attention_head_scores"].set_index(["layer", "head"])
    assert scores.loc[(0, 0), "prev_token_score"] > 0.99
    assert scores["prev_token_score"].idxmax() == (0, 0)
    assert scores.drop((0, 0))["prev_token_score"].max() < 0.3  # uniform heads
    assert scores.loc[(1, 0), "induction_score"] > 0.99
    assert scores["induction_score"].idxmax() == (1, 0)
    assert scores.loc[(0, 0), "induction_score"] < 0.01  # it looks one back, not ahead


def test_bad_inputs_are_refused(harvested):
    from arrakis_ray.models import load_pretrained
    from arrakis_ray.tools.attention_tools import induction_scores
    from arrakis_ray.zoo import zoo_path

    _, _, result = harvested
    with pytest.raises(ToolError, match="top_k"):
        make_tool("attention_tools", {"top_k": 0})
    manifest = store_manifest.read_manifest(
        store_layout.RunLayout(result.run_dir.parents[1], result.run_dir.name)
    )
    with pytest.raises(ToolError, match=r"layers \[7\] out of range"):
        make_tool("attention_tools", {"layers": [7]}).required_hooks(manifest)
    model = load_pretrained(zoo_path("facts-gpt2"))  # context of 64 tokens
    with pytest.raises(ToolError, match="exceed the model's context of 64"):
        induction_scores(model, [0], seq_len=40, n_sequences=1, seed=0)


def test_runner_writes_queryable_scores(harvested):
    from arrakis_ray.store.catalog import Store

    _, store, result = harvested
    done = analyze(result.run_dir, "attention_tools", {"induction_sequences": 2, "layers": [0, 3]})
    assert done.shards == 3
    with Store(store) as db:
        scores = db.sql(
            "SELECT layer, head, prev_token_score, induction_score, n_queries "
            "FROM results_attention_head_scores ORDER BY layer, head"
        )
        top = db.sql(
            "SELECT count(*) AS n, max(rank) AS max_rank, min(k_pos) AS min_k "
            "FROM results_attention_top_positions p JOIN tokens t "
            "ON t.run_id = p.run_id AND t.seq_id = p.seq_id AND t.pos = p.k_pos"
        )
    assert scores["layer"].to_list() == [0] * 4 + [3] * 4
    assert scores["n_queries"].to_list() == [result.tokens] * 8
    assert scores["induction_score"].is_between(0, 1).all()
    want = direct_scores(*dense_patterns(result.run_dir))
    want = want[want.layer.isin([0, 3])]
    np.testing.assert_allclose(scores["prev_token_score"], want["prev_token_score"], rtol=1e-6)
    assert top["max_rank"][0] == 3 and top["min_k"][0] == 1 and top["n"][0] > 0


def test_head_score_charts():
    df = pd.DataFrame(
        [
            {"layer": la, "head": h, **{s: 0.1 * (la + h) for s in SCORES}}
            for la in range(2)
            for h in range(3)
        ]
    )
    spec = head_score_heatmap(df, "prev_token_score", title="prev").to_dict()
    cells, text = spec["layer"]
    enc = cells["encoding"]
    assert cells["mark"]["type"] == "rect" and text["mark"]["type"] == "text"
    assert (enc["x"]["field"], enc["y"]["field"]) == ("head", "layer")
    assert enc["color"]["field"] == "prev_token_score"
    assert enc["color"]["scale"]["domain"] == [0, 1]
    assert text["encoding"]["text"]["field"] == "prev_token_score"
    grid = head_scores_grid(df).to_dict()
    colors = [c["layer"][0]["encoding"]["color"]["field"] for c in grid["hconcat"]]
    assert colors == list(SCORES)
    with pytest.raises(Exception, match="induction_score"):
        head_score_heatmap(df.drop(columns="induction_score"), "induction_score")
