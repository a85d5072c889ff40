"""Every hook value checked against a second computation: HF outputs or a manual matmul."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from arrakis_ray.models.tiny import ARCHITECTURES


def _layers(hm):
    return range(hm.n_layers)


def test_residuals_and_logits_match_hf_hidden_states(hm, tokens):
    logits, cache = hm.run_with_cache(
        tokens,
        hooks=["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post", "ln_final.*", "logits"],
    )
    ref = hm.model(tokens, output_hidden_states=True)
    # HF: hidden_states[L] is the input of layer L, the last one is after the final norm
    assert len(ref.hidden_states) == hm.n_layers + 1
    for layer in _layers(hm):
        assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer])
    for layer in range(hm.n_layers - 1):
        assert_close(cache[f"blocks.{layer}.hook_resid_post"], ref.hidden_states[layer + 1])
    assert_close(cache["ln_final.hook_normalized"], ref.hidden_states[-1])
    assert_close(logits, ref.logits)
    assert_close(cache["logits"], ref.logits)
    # the last resid_post through the model's own final norm and unembedding
    last = cache[f"blocks.{hm.n_layers - 1}.hook_resid_post"]
    assert_close(hm.unembed(hm.ln_final(last)), ref.logits)


def test_pattern_matches_hf_eager_attentions(hm, tokens, attention):
    _, cache = hm.run_with_cache(tokens, hooks=["blocks.*.attn.hook_pattern"])
    with attention(hm.model, "eager"):
        ref = hm.model(tokens, output_attentions=True)
    for layer in _layers(hm):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (2, hm.n_heads, tokens.shape[1], tokens.shape[1])
        assert_close(pattern, ref.attentions[layer])


def test_pattern_rows_sum_to_one_and_are_causal(hm, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["blocks.*.attn.hook_pattern"])
    n = tokens.shape[1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    for layer in _layers(hm):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert pattern[..., future].abs().max() == 0


def test_residual_identities(hm, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["*"])
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    assert_close(cache["blocks.0.hook_resid_pre"], embed)
    for layer in _layers(hm):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        attn = cache[f"blocks.{layer}.hook_attn_out"]
        mlp = cache[f"blocks.{layer}.hook_mlp_out"]
        post = cache[f"blocks.{layer}.hook_resid_post"]
        if hm.parallel_residual:
            assert f"blocks.{layer}.hook_resid_mid" not in cache
            assert_close(post, pre + attn + mlp)
        else:
            mid = cache[f"blocks.{layer}.hook_resid_mid"]
            assert_close(mid, pre + attn)
            assert_close(post, mid + mlp)
        if layer + 1 < hm.n_layers:
            assert torch.equal(cache[f"blocks.{layer + 1}.hook_resid_pre"], post)


def test_gemma_embedding_is_scaled_by_sqrt_d_model(tiny_models, tokens):
    hm = tiny_models["gemma"]
    _, cache = hm.run_with_cache(tokens, hooks=["hook_embed"])
    raw = hm.model.model.embed_tokens.weight[tokens]
    assert_close(cache["hook_embed"], raw * math.sqrt(hm.d_model))


def test_qkv_are_projections_of_ln1_output(hm, hf, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["blocks.*.hook_resid_pre", "blocks.*.attn.hook_?"])
    for layer in _layers(hm):
        x = hf.ln1(layer)(cache[f"blocks.{layer}.hook_resid_pre"])
        for which, n in (("q", hm.n_heads), ("k", hm.n_kv_heads), ("v", hm.n_kv_heads)):
            got = cache[f"blocks.{layer}.attn.hook_{which}"]
            assert got.shape == (*tokens.shape, n, hm.d_head)
            for head in (0, n - 1):
                weight, bias = hf.qkv_head(layer, which, head)
                want = x @ weight.T + (0 if bias is None else bias)
                assert_close(got[:, :, head], want, atol=1e-5, rtol=1e-4)


def _rotary(x: torch.Tensor, rot_dim: int, theta: float) -> torch.Tensor:
    """Rotate-half rotary embedding of the first ``rot_dim`` dims of [b, pos, head, d]."""
    if rot_dim == 0:
        return x
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x[..., : rot_dim // 2], x[..., rot_dim // 2 : rot_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot_dim:]], dim=-1)


def test_pattern_and_z_recomputed_from_q_k_v(hm, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["blocks.*.attn.*"])
    cfg = hm.model.config
    rot_dim, theta = 0, 1.0
    if hm.arch not in ("gpt2", "gpt-neo"):
        rope = cfg.rope_parameters
        rot_dim = int(hm.d_head * rope.get("partial_rotary_factor", 1.0))
        theta = rope["rope_theta"]
    scale = 1.0 if hm.arch == "gpt-neo" else hm.d_head**-0.5  # gpt-neo does not scale
    group = hm.n_heads // hm.n_kv_heads
    n = tokens.shape[1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    for layer in _layers(hm):
        hook = f"blocks.{layer}.attn.hook_"
        if hm.arch == "stablelm" and cfg.qk_layernorm:
            continue
        q = _rotary(cache[hook + "q"], rot_dim, theta)
        k = _rotary(cache[hook + "k"], rot_dim, theta).repeat_interleave(group, dim=2)
        v = cache[hook + "v"].repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
        assert_close(cache[hook + "pattern"], pattern, atol=1e-5, rtol=1e-4)
        z = torch.einsum("bhqk,bkhd->bqhd", cache[hook + "pattern"], v)
        assert_close(cache[hook + "z"], z, atol=1e-5, rtol=1e-4)


def test_attn_out_is_z_through_o_proj(hm, hf, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["blocks.*.attn.hook_z", "blocks.*.hook_attn_out"])
    for layer in _layers(hm):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape == (*tokens.shape, hm.n_heads, hm.d_head)
        weight, bias = hf.o_proj(layer)
        want = z.flatten(-2) @ weight.T + (0 if bias is None else bias)
        assert_close(cache[f"blocks.{layer}.hook_attn_out"], want, atol=1e-5, rtol=1e-4)


def test_mlp_pre_post_out_by_hand(hm, hf, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["*"])
    act = hf.act()
    for layer in _layers(hm):
        resid = "hook_resid_pre" if hm.parallel_residual else "hook_resid_mid"
        x = hf.mlp_norm(layer)(cache[f"blocks.{layer}.{resid}"])
        pre, post = cache[f"blocks.{layer}.mlp.hook_pre"], cache[f"blocks.{layer}.mlp.hook_post"]
        assert pre.shape == post.shape == (*tokens.shape, hm.d_mlp)
        weight, bias = hf.mlp_in(layer)
        assert_close(pre, x @ weight.T + (0 if bias is None else bias), atol=1e-5, rtol=1e-4)
        up = hf.mlp_up(layer)
        want_post = act(pre) if up is None else act(pre) * (x @ up[0].T)
        assert_close(post, want_post, atol=1e-5, rtol=1e-4)
        weight, bias = hf.down_proj(layer)
        want_out = post @ weight.T + (0 if bias is None else bias)
        assert_close(cache[f"blocks.{layer}.hook_mlp_out"], want_out, atol=1e-5, rtol=1e-4)


def test_padding_either_side_keeps_real_token_values(hm):
    gen = torch.Generator().manual_seed(7)
    long, short = (
        torch.randint(3, 128, (10,), generator=gen),
        torch.randint(3, 128, (6,), generator=gen),
    )
    hooks = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern", "logits"]
    alone = [hm.run_with_cache(seq[None], hooks=hooks)[1] for seq in (long, short)]
    pad = torch.zeros(4, dtype=torch.long)
    for side in ("right", "left"):
        row = torch.cat([short, pad]) if side == "right" else torch.cat([pad, short])
        real = slice(0, 6) if side == "right" else slice(4, 10)
        ids = torch.stack([long, row])
        mask = torch.ones_like(ids)
        mask[1] = (torch.arange(10) < 6) if side == "right" else (torch.arange(10) >= 4)
        logits, cache = hm.run_with_cache(ids, attention_mask=mask, hooks=hooks)
        assert logits.shape == (2, 10, hm.vocab_size)
        assert not logits[1, real].isnan().any()
        for name, value in cache.items():
            assert value.shape[0] == 2, name
            if name.endswith("hook_pattern"):
                assert value.shape == (2, hm.n_heads, 10, 10)
                assert_close(value[0], alone[0][name][0], atol=1e-5, rtol=1e-4)
                assert_close(value[1][:, real, real], alone[1][name][0], atol=1e-5, rtol=1e-4)
            else:
                assert_close(value[0], alone[0][name][0], atol=1e-5, rtol=1e-4)
                assert_close(value[1, real], alone[1][name][0], atol=1e-5, rtol=1e-4)


def test_all_architectures_are_covered(tiny_models):
    assert sorted(tiny_models) == sorted(ARCHITECTURES)
    for arch, hm in tiny_models.items():
        assert hm.arch == arch
        assert (hm.n_layers, hm.d_model, hm.n_heads, hm.d_head) == (2, 64, 4, 16)
        assert hm.vocab_size == 128 and hm.d_mlp == 128
