"""Interventions: hook functions that replace an activation downstream."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import UnknownHookError
from arrakis_ray.hooks import spec_of


def _zero(value, name):
    return torch.zeros_like(value)


def test_identity_interventions_everywhere_change_nothing(hm, tokens):
    writable = [n for n in hm.hook_names() if spec_of(n).writable]
    seen = []

    def same(value, name):
        seen.append(name)
        return value.clone()

    logits, _ = hm.run_with_cache(tokens, hooks=["logits"], interventions={"*": same})
    reference, _ = hm.run_with_cache(tokens, hooks=["logits"])
    assert sorted(seen) == sorted(writable)
    assert_close(logits, reference)


def test_zero_v_gives_zero_z(hm, hf, tokens):
    _, cache = hm.run_with_cache(
        tokens,
        hooks=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"],
        interventions={"blocks.0.attn.hook_v": _zero},
    )
    assert cache["blocks.0.attn.hook_v"].abs().max() == 0  # the cache holds the new value
    assert cache["blocks.0.attn.hook_z"].abs().max() == 0
    _, bias = hf.o_proj(0)
    want = torch.zeros_like(cache["blocks.0.hook_attn_out"]) + (0 if bias is None else bias)
    assert_close(cache["blocks.0.hook_attn_out"], want)


@pytest.mark.parametrize("which", ["q", "k"])
def test_zero_q_or_k_gives_uniform_causal_pattern(hm, tokens, which):
    _, cache = hm.run_with_cache(
        tokens,
        hooks=["blocks.0.attn.hook_pattern"],
        interventions={f"blocks.0.attn.hook_{which}": _zero},
    )
    n = tokens.shape[1]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert_close(cache["blocks.0.attn.hook_pattern"], uniform.expand(2, hm.n_heads, n, n))


def test_ablating_every_block_output_leaves_direct_path(hm, tokens):
    logits, cache = hm.run_with_cache(
        tokens,
        hooks=["blocks.0.hook_resid_pre", "logits"],
        interventions={"blocks.*.hook_attn_out": _zero, "blocks.*.hook_mlp_out": _zero},
    )
    direct = hm.unembed(hm.ln_final(cache["blocks.0.hook_resid_pre"]))
    assert_close(logits, direct)


def test_patching_resid_pre_restores_clean_logits(hm, tokens):
    clean = tokens[:1]
    corrupt = torch.flip(clean, dims=[1])
    clean_logits, clean_cache = hm.run_with_cache(
        clean, hooks=["blocks.1.hook_resid_pre", "logits"]
    )
    patched, _ = hm.run_with_cache(
        corrupt,
        hooks=["logits"],
        interventions={"blocks.1.hook_resid_pre": lambda v, n: clean_cache[n]},
    )
    assert_close(patched, clean_logits)


def test_mlp_pre_intervention_reaches_mlp_post(hm, hf, tokens):
    _, cache = hm.run_with_cache(
        tokens,
        hooks=["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"],
        interventions={"blocks.0.mlp.hook_pre": lambda v, n: torch.full_like(v, -100.0)},
    )
    # every activation used here (gelu variants, silu) is ~0 at -100
    assert cache["blocks.0.mlp.hook_post"].abs().max() < 1e-6
    _, bias = hf.down_proj(0)
    want = torch.zeros_like(cache["blocks.0.hook_mlp_out"]) + (0 if bias is None else bias)
    assert_close(cache["blocks.0.hook_mlp_out"], want)


def test_read_only_hooks_refuse_interventions(tiny_models, tokens):
    hm = tiny_models["llama"]
    for name in ("blocks.0.attn.hook_pattern", "blocks.0.hook_resid_mid", "logits"):
        with pytest.raises(UnknownHookError, match="read-only"):
            hm.run_with_cache(tokens, interventions={name: _zero})
