"""Per-head weights reproduce the hooked activations of every architecture.

Each identity is checked against ``run_with_cache`` (the hooks are read off the real
forward), on tiny models whose biases are set to random values so the bias terms are
exercised too; the per-head slices are also compared with ``HF.qkv_head`` (conftest),
which locates each family's q/k/v rows independently of the adapters.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import ToolError
from arrakis_ray.models import build_model
from arrakis_ray.models.weights import attention_weights, mlp_out_weights, unembed_weights

from .conftest import ALL_MODELS, HF, VARIANTS

# llama-like families have no biases by default: switch them on where the config can
BIAS_CFG = {"llama": {"attention_bias": True, "mlp_bias": True}}


@pytest.fixture(scope="module")
def biased_models() -> dict:
    """Every tiny model (and variant), with each bias parameter filled with noise."""
    models = {}
    gen = torch.Generator().manual_seed(7)
    for name in ALL_MODELS:
        arch, cfg = VARIANTS.get(name, (name, {}))
        hm = build_model(arch, seed=0, **{**cfg, **BIAS_CFG.get(arch, {})})
        with torch.no_grad():
            for pname, param in hm.model.named_parameters():
                if pname.endswith(".bias"):
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        models[name] = hm
    return models


@pytest.fixture(params=ALL_MODELS)
def bm(request, biased_models):
    return biased_models[request.param]


def _hooks(hm, layer: int) -> list[str]:
    names = ["q", "k", "v", "z"]
    return [
        f"blocks.{layer}.hook_resid_pre",
        *[f"blocks.{layer}.attn.hook_{n}" for n in names],
        f"blocks.{layer}.hook_attn_out",
        f"blocks.{layer}.mlp.hook_post",
        f"blocks.{layer}.hook_mlp_out",
    ]


def test_qkv_o_mlp_identities(bm, tokens):
    hm = bm
    _, cache = hm.run_with_cache(
        tokens, hooks=[h for L in range(hm.n_layers) for h in _hooks(hm, L)]
    )
    group = hm.n_heads // hm.n_kv_heads
    for layer in range(hm.n_layers):
        w = attention_weights(hm, layer)
        nh, dm, dh = hm.n_heads, hm.d_model, hm.d_head
        for t in (w.W_Q, w.W_K, w.W_V):
            assert t.shape == (nh, dm, dh) and t.dtype == torch.float32 and not t.requires_grad
        assert w.W_O.shape == (nh, dh, dm)
        # the attention reads ln1(resid_pre) in sequential and parallel blocks alike
        ln1 = hm.adapter.sub(hm.model, layer, hm.adapter.ln1)
        x = ln1(cache[f"blocks.{layer}.hook_resid_pre"])
        for which, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
            got = torch.einsum("bpd,hde->bphe", x, W) + (0 if b is None else b)
            ref = cache[f"blocks.{layer}.attn.hook_{which}"]
            if which != "q":
                ref = ref.repeat_interleave(group, dim=2)  # kv head h // group
            assert_close(got, ref, atol=1e-5, rtol=1e-4)
        z = cache[f"blocks.{layer}.attn.hook_z"]
        out = torch.einsum("bphe,hed->bpd", z, w.W_O) + (0 if w.b_O is None else w.b_O)
        assert_close(out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=1e-4)
        W_out, b_out = mlp_out_weights(hm, layer)
        assert W_out.shape == (hm.d_mlp, dm)
        mlp = cache[f"blocks.{layer}.mlp.hook_post"] @ W_out + (0 if b_out is None else b_out)
        assert_close(mlp, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=1e-4)


def test_biases_present_where_the_family_has_them(biased_models):
    # a bias that exists must come through (and be the noise we put in, not zeros)
    for name in ("gpt2", "gpt-neox", "qwen2", "llama", "phi3"):
        w = attention_weights(biased_models[name], 0)
        has_qkv_bias = name in ("gpt2", "gpt-neox", "qwen2", "llama")
        assert (w.b_Q is not None) == has_qkv_bias, name
        if has_qkv_bias:
            assert w.b_Q.abs().sum() > 0 and w.b_K.shape == (4, 16)


def test_heads_match_independent_slicing(hm):
    """W_Q[h] / W_K[h] / W_V[h] equal the rows conftest's HF helper slices per family."""
    hf = HF(hm)
    group = hm.n_heads // hm.n_kv_heads
    w = attention_weights(hm, 1)
    for which, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
        for h in range(hm.n_heads):
            src = h if which == "q" else h // group
            ref_w, ref_b = hf.qkv_head(1, which, src)
            assert_close(W[h], ref_w.T.float())
            if ref_b is not None:
                assert_close(b[h], ref_b.float())
    ref_o, _ = hf.o_proj(1)
    for h in range(hm.n_heads):
        assert_close(w.W_O[h], ref_o[:, h * hm.d_head : (h + 1) * hm.d_head].T.float())


def test_unembed_gives_logits(bm, tokens):
    logits, cache = bm.run_with_cache(tokens, hooks=["ln_final.hook_normalized", "logits"])
    W_U, b_U = unembed_weights(bm)
    assert W_U.shape == (bm.d_model, bm.vocab_size)
    got = cache["ln_final.hook_normalized"] @ W_U + (0 if b_U is None else b_U)
    assert_close(got, logits, atol=1e-5, rtol=1e-4)


def test_copies_not_views(tiny_models):
    hm = tiny_models["gpt2"]
    w = attention_weights(hm, 0)
    w.W_O.zero_()  # must not touch the model
    assert attention_weights(hm, 0).W_O.abs().sum() > 0


def test_layer_out_of_range_is_named(tiny_models):
    with pytest.raises(ToolError, match=r"layer 5 .*2 layers"):
        attention_weights(tiny_models["llama"], 5)
