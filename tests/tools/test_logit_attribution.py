"""Direct logit attribution: the terms add up to the model's logit, and each term is the
component's write computed by hand from the HF modules (LayerNorm and RMSNorm models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tools.decomp_support import ARCH_CASES, batch, case_id, model_shard, stored_shard, tiny, wide

from arrakis_ray.errors import ToolError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.logit_attribution import LogitAttribution, LogitAttributionParams
from arrakis_ray.tools.runner import analyze, make_tool


def _attribute(inputs, model, **params):
    tool = LogitAttribution(LogitAttributionParams(**params))
    return tool.compute_shard(inputs, model).to_pandas()


def _sums(rows):
    return rows.groupby(["seq_id", "pos"]).contribution.sum()


@pytest.mark.parametrize("case", ARCH_CASES, ids=case_id)
def test_contributions_sum_to_the_next_token_logit(case):
    arch, overrides = case
    model = tiny(arch, **overrides)
    if arch == "llama":  # give one model an unembedding bias: it is not attributed
        lm_head = model.model.lm_head
        lm_head.bias = torch.nn.Parameter(torch.randn(lm_head.out_features) * 0.5)
    inputs, _ = model_shard(model, *batch(model.vocab_size, [7, 4, 9]))
    rows = _attribute(inputs, model)
    logits = wide(inputs.activations["logits"])
    tokens = {
        (s, p): t
        for s, p, t in zip(
            *(inputs.tokens[c].to_pylist() for c in ("seq_id", "pos", "token_id")), strict=True
        )
    }
    bias = model.model.lm_head.bias
    bias = None if bias is None else bias.detach()
    # every position with a next token, none without
    assert set(_sums(rows).index) == {(s, p) for s, p in tokens if (s, p + 1) in tokens}
    for (seq, pos), total in _sums(rows).items():
        target = tokens[(seq, pos + 1)]
        expected = logits[(seq, pos)][target] - (0.0 if bias is None else float(bias[target]))
        assert total == pytest.approx(expected, abs=2e-5 * max(1.0, abs(expected)))
    n_comp = rows.component.nunique()
    has_pos = arch in ("gpt2", "gpt-neo")
    per_layer = model.n_heads + 1 + (rows.component == "L0.attn_bias").any()
    assert n_comp == 1 + has_pos + model.n_layers * per_layer + (
        "ln_final.bias" in set(rows.component)
    )
    assert ("ln_final.bias" in set(rows.component)) == (
        arch in ("gpt2", "gpt-neo", "gpt-neox", "stablelm")
    )


def _by_hand(model, cache, arch, layer, head, b, p, direction):
    """One head's term from the HF modules themselves (not through weights.py)."""
    hf, dh, n = model.model, model.d_head, model.n_layers
    z = cache[f"blocks.{layer}.attn.hook_z"][b, p, head].double()
    resid = cache[f"blocks.{n - 1}.hook_resid_post"][b, p].double()
    if arch == "gpt2":
        w_c = hf.transformer.h[layer].attn.c_proj.weight.detach().double()  # Conv1D: [in, out]
        out = z @ w_c[head * dh : (head + 1) * dh]
        ln = hf.transformer.ln_f
        scale = torch.sqrt(resid.var(unbiased=False) + ln.eps)
        return float(((out - out.mean()) / scale * ln.weight.detach().double()) @ direction)
    w_o = hf.model.layers[layer].self_attn.o_proj.weight.detach().double()  # [out, in]
    out = w_o[:, head * dh : (head + 1) * dh] @ z
    norm = hf.model.norm
    eps = norm.eps if arch == "gemma" else norm.variance_epsilon
    gain = (1 + norm.weight.detach().double()) if arch == "gemma" else norm.weight.detach().double()
    scale = torch.sqrt(resid.pow(2).mean() + eps)
    return float((out / scale * gain) @ direction)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_each_term_matches_a_hand_computation(arch):
    """LayerNorm (gpt2), RMSNorm (llama) and RMSNorm with gain 1 + weight (gemma)."""
    model = tiny(arch, seed=3)
    ids, mask = batch(model.vocab_size, [6, 8], seed=1)
    inputs, cache = model_shard(model, ids, mask)
    target, other = 17, 40
    rows = _attribute(inputs, model, token=target, other_token=other, positions=[2, -1])
    w_u = model.model.lm_head.weight.detach().double()
    direction = w_u[target] - w_u[other]
    seq0 = int(inputs.tokens["seq_id"].to_numpy().min())
    assert sorted(set(zip(rows.seq_id, rows.pos, strict=True))) == [
        (seq0, 2),
        (seq0, 5),
        (seq0 + 1, 2),
        (seq0 + 1, 7),
    ]
    assert (rows.target_token_id == target).all() and (rows.other_token_id == other).all()
    for b, p in [(0, 5), (1, 2)]:
        got = rows[(rows.seq_id == seq0 + b) & (rows.pos == p)].set_index("component")
        for layer, head in [(0, 1), (1, 3)]:
            expected = _by_hand(model, cache, arch, layer, head, b, p, direction)
            assert got.contribution[f"L{layer}H{head}"] == pytest.approx(expected, abs=1e-5)
            assert got["layer"][f"L{layer}H{head}"] == layer
            assert got["head"][f"L{layer}H{head}"] == head
        logits = cache["logits"][b, p].double()
        assert got.contribution.sum() == pytest.approx(
            float(logits[target] - logits[other]), abs=2e-5
        )
        if arch == "gpt2":  # the LayerNorm bias term: bias . (W_U[t] - W_U[o]), unscaled
            bias = float(model.model.transformer.ln_f.bias.detach().double() @ direction)
            assert got.contribution["ln_final.bias"] == pytest.approx(bias, abs=1e-6)


def test_the_demo_run_attributions_sum_to_its_stored_logits(harvested):
    """On the trained gpt2 demo model (float32 store): every shard, every position."""
    from arrakis_ray.harvest.model_source import load_model

    config, _, result = harvested
    model = load_model(config.model)
    inputs = stored_shard(result.run_dir, 1)  # the stored manifest and vocab, via RunReader
    rows = _attribute(inputs, model)
    logits = wide(inputs.activations["logits"])
    tokens = {
        (s, p): t
        for s, p, t in zip(
            *(inputs.tokens[c].to_pylist() for c in ("seq_id", "pos", "token_id")), strict=True
        )
    }
    sums = _sums(rows)
    assert len(sums) == inputs.tokens.num_rows - len(set(inputs.tokens["seq_id"].to_pylist()))
    errors = [abs(total - logits[(s, p)][tokens[(s, p + 1)]]) for (s, p), total in sums.items()]
    assert max(errors) < 1e-3
    # a trained model: some head writes the answer strongly somewhere
    assert rows[rows["head"].notna()].contribution.abs().max() > 1.0


def test_the_runner_writes_a_logit_difference_table(harvested):
    _, store, result = harvested
    vocab = RunReader.open(result.run_dir).vocab.tolist()
    target, other = vocab.index("paris"), vocab.index("berlin")
    done = analyze(
        result.run_dir,
        "logit_attribution",
        {"token": "paris", "other_token": "berlin", "positions": [-1, 3]},
    )
    assert done.shards == 3
    with Store(store) as db:
        got = db.sql(
            f"""
            SELECT r.seq_id, r.pos, sum(r.contribution) AS total, count(*) AS n,
                   any_value(l.d{target} - l.d{other}) AS expected
            FROM results_logit_attribution r
            JOIN act_logits l ON l.run_id = r.run_id AND l.seq_id = r.seq_id AND l.pos = r.pos
            GROUP BY r.seq_id, r.pos
            """
        )
        n_seq = db.sql("SELECT count(DISTINCT seq_id) AS n FROM tokens")["n"][0]
    assert len(got) == 2 * n_seq  # positions 3 and the last of each sequence
    # 4 layers x (4 heads, bias, mlp) + embed, pos_embed, ln_final.bias
    assert set(got["n"]) == {4 * 6 + 3}
    np.testing.assert_allclose(got["total"], got["expected"], atol=1e-3)


def test_bad_parameters_are_refused():
    with pytest.raises(ToolError, match="positions 'last' has no next token"):
        make_tool("logit_attribution", {"positions": "last"})
    with pytest.raises(ToolError, match="positions must be"):
        make_tool("logit_attribution", {"positions": "first"})
    with pytest.raises(ToolError, match="other_token must be"):
        make_tool("logit_attribution", {"other_token": -3})
    model = tiny("llama")
    inputs, _ = model_shard(model, *batch(model.vocab_size, [5]))
    with pytest.raises(ToolError, match=r"no token .* 't1000'.*did you mean"):
        _attribute(inputs, model, token="t1000")
    with pytest.raises(ToolError, match="outside the vocabulary"):
        _attribute(inputs, model, token=10_000)


def test_rows_processed_in_chunks_give_the_same_result(monkeypatch):
    from arrakis_ray.tools import decompose

    model = tiny("gpt2")
    inputs, _ = model_shard(model, *batch(model.vocab_size, [7, 4, 9]))
    whole = _attribute(inputs, model)
    # 3 rows per chunk: 17 rows make 6 chunks, the last one short
    monkeypatch.setattr(decompose, "CHUNK_FLOATS", 3 * model.n_heads * model.d_model)
    chunked = _attribute(inputs, model)
    assert whole.drop(columns="contribution").equals(chunked.drop(columns="contribution"))
    np.testing.assert_allclose(whole.contribution, chunked.contribution, rtol=1e-5, atol=1e-7)
