"""Hook names, pattern resolution, scoping (removal, attention switch) and early stop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import UnknownHookError

PER_BLOCK = 12  # hook points in a sequential block; parallel blocks lack resid_mid


def test_hook_names_forward_order_and_count(hm):
    names = hm.hook_names()
    learned_pos = hm.arch in ("gpt2", "gpt-neo")
    per_block = PER_BLOCK - hm.parallel_residual
    # after the blocks: ln_final.hook_scale, ln_final.hook_normalized, logits
    assert len(names) == len(set(names)) == 1 + learned_pos + hm.n_layers * per_block + 3
    assert names[0] == "hook_embed" and names[-2:] == ["ln_final.hook_normalized", "logits"]
    assert ("hook_pos_embed" in names) == learned_pos
    assert ("blocks.0.hook_resid_mid" in names) == (not hm.parallel_residual)
    layers = [hm.layer_of(n) for n in names]
    assert layers == sorted(layers)  # blocks appear in order
    block0 = [n for n in names if n.startswith("blocks.0.")]
    assert block0.index("blocks.0.hook_resid_pre") == 0
    assert block0[-1] == "blocks.0.hook_resid_post"
    assert block0.index("blocks.0.hook_attn_out") < block0.index("blocks.0.mlp.hook_pre")


def test_resolve_globs_dedup_and_order(tiny_models):
    hm = tiny_models["llama"]
    assert hm.resolve_hooks(["blocks.*.hook_resid_post"]) == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    got = hm.resolve_hooks(["logits", "blocks.1.hook_resid_pre", "blocks.0.*", "blocks.0.mlp.*"])
    assert got[0] == "blocks.0.hook_resid_pre" and got[-2:] == ["blocks.1.hook_resid_pre", "logits"]
    assert len(got) == len(set(got)) == PER_BLOCK + 2
    assert hm.resolve_hooks("hook_embed") == ["hook_embed"]  # a bare string is one pattern
    assert hm.resolve_hooks(["*"]) == hm.hook_names()


def test_unknown_hook_suggests_close_match(tiny_models):
    hm = tiny_models["gpt2"]
    with pytest.raises(UnknownHookError) as err:
        hm.resolve_hooks(["blocks.0.hook_resid_pots"])
    assert "blocks.0.hook_resid_pots" in str(err.value)
    assert "blocks.0.hook_resid_post" in str(err.value)
    with pytest.raises(UnknownHookError, match=r"blocks\.7\.\*"):
        hm.run_with_cache(torch.zeros(1, 3, dtype=torch.long), hooks=["blocks.7.*"])
    with pytest.raises(UnknownHookError):
        hm.hook_shape("blocks.0.attn.hook_x")


def test_resid_mid_of_parallel_block_is_explained(tiny_models):
    with pytest.raises(UnknownHookError, match="parallel"):
        tiny_models["gpt-neox"].resolve_hooks(["blocks.0.hook_resid_mid"])


def test_shape_heads_and_layer_metadata_match_cache(hm, tokens):
    _, cache = hm.run_with_cache(tokens, hooks=["*"])
    assert list(cache) == hm.hook_names()  # every point fires, in forward order
    batch, pos = tokens.shape
    for name, value in cache.items():
        kind, width = hm.hook_shape(name)
        if kind == "dense":
            assert value.shape == (batch, pos, width), name
        elif kind == "head":
            assert value.shape == (batch, pos, hm.n_heads_of(name), width), name
        else:
            assert kind == "pattern" and width is None
            assert value.shape == (batch, hm.n_heads_of(name), pos, pos), name
        assert not value.requires_grad
    assert hm.n_heads_of("blocks.1.attn.hook_k") == hm.n_kv_heads
    assert hm.n_heads_of("blocks.1.attn.hook_q") == hm.n_heads
    assert hm.layer_of("hook_embed") == -1
    assert hm.layer_of("blocks.1.mlp.hook_post") == 1
    assert hm.layer_of("logits") == hm.layer_of("ln_final.hook_normalized") == hm.n_layers
    with pytest.raises(UnknownHookError):
        hm.n_heads_of("blocks.0.hook_resid_pre")


def test_early_stop_returns_no_logits_and_same_values(hm, tokens):
    calls = []
    later = hm.adapter.layer_modules(hm.model)[1]
    handle = later.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        logits, early = hm.run_with_cache(tokens, hooks=["blocks.0.*"])
    finally:
        handle.remove()
    assert logits is None
    assert calls == []  # block 1 never ran
    _, full = hm.run_with_cache(tokens, hooks=["*"])
    assert list(early) == [n for n in hm.hook_names() if n.startswith("blocks.0.")]
    for name, value in early.items():
        assert torch.equal(value, full[name]), name


def test_plain_forward_without_hooks(tiny_models, tokens):
    hm = tiny_models["qwen2"]
    logits, cache = hm.run_with_cache(tokens)
    assert cache == {}
    assert_close(logits, hm.model(tokens).logits)


def test_fresh_cache_per_call(tiny_models, tokens):
    hm = tiny_models["phi3"]
    _, first = hm.run_with_cache(tokens, hooks=["hook_embed"])
    _, second = hm.run_with_cache(tokens[:1], hooks=["blocks.0.hook_resid_pre"])
    assert first is not second and list(second) == ["blocks.0.hook_resid_pre"]
    assert first["hook_embed"].shape[0] == 2


def test_hooks_removed_and_attention_restored(hm, tokens, count_hooks):
    before = count_hooks(hm.model)
    impl = hm.model.config._attn_implementation
    assert impl == ("eager" if hm.arch == "gpt-neo" else "sdpa")  # gpt-neo has only eager
    hm.run_with_cache(tokens, hooks=["*"])
    assert count_hooks(hm.model) == before
    assert hm.model.config._attn_implementation == impl


def test_hooks_removed_after_exception_in_a_hook(hm, tokens, count_hooks):
    before = count_hooks(hm.model)
    impl = hm.model.config._attn_implementation

    def boom(value, name):
        raise ValueError(f"boom at {name}")

    with pytest.raises(ValueError, match="boom at blocks.1.attn.hook_z"):
        hm.run_with_cache(
            tokens,
            hooks=["blocks.*.attn.hook_pattern", "logits"],
            interventions={"blocks.1.attn.hook_z": boom},
        )
    assert count_hooks(hm.model) == before
    assert hm.model.config._attn_implementation == impl
    # and the model still works, with no leftovers in the next cache
    logits, cache = hm.run_with_cache(tokens, hooks=["logits"])
    assert list(cache) == ["logits"]
    assert_close(logits, hm.model(tokens).logits)
