"""The hook vocabulary (arrakis_ray.hooks) against the hooks the models really offer.

Also ``ln_final.hook_scale``, checked against the norm formula on every architecture.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from arrakis_ray import hooks
from arrakis_ray.errors import UnknownHookError
from arrakis_ray.models import build_model
from arrakis_ray.models.hooked import HookedModel
from arrakis_ray.models.points import build_point, norm_eps
from arrakis_ray.store import layout

# Written out per family from the HF modeling code, independently of the adapters.
LAYERNORM_ARCHS = ("gpt2", "gpt-neo", "gpt-neox", "stablelm")
RMSNORM_ARCHS = ("llama", "gemma", "phi3", "qwen2", "mistral")
EPS_FIELD = {
    "gpt2": "layer_norm_epsilon",
    "gpt-neo": "layer_norm_epsilon",
    "gpt-neox": "layer_norm_eps",
    "stablelm": "layer_norm_eps",
    **{arch: "rms_norm_eps" for arch in RMSNORM_ARCHS},
}


def _final_norm(hm) -> nn.Module:
    root = hm.model
    if hm.arch in ("gpt2", "gpt-neo"):
        return root.transformer.ln_f
    if hm.arch == "gpt-neox":
        return root.gpt_neox.final_layer_norm
    return root.model.norm


def test_hooks_module_imports_nothing_heavy():
    code = (
        "import sys, arrakis_ray.hooks; "
        "heavy = [m for m in ('torch', 'pyarrow', 'numpy', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_table_is_consistent():
    assert [s.where for s in hooks.HOOK_SPECS] == sorted(
        (s.where for s in hooks.HOOK_SPECS), key=["before", "block", "after"].index
    )
    for spec in hooks.HOOK_SPECS:
        assert spec.kind in hooks.KINDS
        assert (spec.width is None) == (spec.kind == "pattern")
        assert spec.width is None or isinstance(spec.width, int) or spec.width in hooks.DIMS
        assert (spec.heads is not None) == (spec.kind != "dense"), spec.family
        assert spec.requires is None or spec.requires in hooks.REQUIREMENTS
        assert hooks.hook_family(spec.hook(3)) == spec.family
        assert hooks.spec_of(spec.glob.replace("*", "0")) is spec


def test_every_hook_maps_to_a_family_and_back(hm):
    dims = {"d_model": hm.d_model, "d_mlp": hm.d_mlp, "d_head": hm.d_head, "d_vocab": hm.vocab_size}
    for name in hm.hook_names():
        family = hooks.hook_family(name)
        spec = hooks.family_spec(family)
        # the family's harvest glob resolves to this hook, and to hooks of that family only
        resolved = hm.resolve_hooks([hooks.harvest_glob(family)])
        assert name in resolved
        assert {hooks.hook_family(h) for h in resolved} == {family}
        layer = hm.layer_of(name)
        assert hooks.hook_layer(name, hm.n_layers) == layer
        assert hooks.family_hook(family, layer) == name
        assert hm.hook_shape(name) == (hooks.family_kind(family), spec.width_in(dims))
        if spec.heads is None:
            with pytest.raises(UnknownHookError):
                hm.n_heads_of(name)
        else:
            assert hm.n_heads_of(name) == getattr(hm, spec.heads)


def test_writable_specs_are_the_points_with_a_write(hm):
    for name in hm.hook_names():
        if name == "logits":  # the forward's result, not a module's: no point
            assert not hooks.spec_of(name).writable
            continue
        point = build_point(hm, name, batch=1)
        assert (point.write is not None) == hooks.spec_of(name).writable, name


def test_every_spec_exists_in_some_model(all_models):
    offered = {hooks.hook_family(n) for hm in all_models.values() for n in hm.hook_names()}
    assert offered == set(hooks.FAMILIES)


def test_store_layout_derives_from_the_vocabulary():
    assert layout.FAMILY_KIND == hooks.FAMILY_KIND
    assert layout.family_kind("ln_final_scale") == "dense"
    assert layout.hook_family("ln_final.hook_scale") == "ln_final_scale"
    assert layout.hook_layer("ln_final.hook_scale", 4) == 4
    for family in hooks.DENSE_BLOCK_FAMILIES:
        hook = hooks.family_hook(family, 2)
        assert hook == f"blocks.2.{hooks.family_spec(family).name}"
        assert layout.hook_family(hook) == family and layout.hook_layer(hook, 4) == 2
        assert layout.family_kind(family) == "dense"
    assert set(hooks.DENSE_BLOCK_FAMILIES) == {
        s.family for s in hooks.HOOK_SPECS if s.in_block and s.kind == "dense"
    }


@pytest.mark.parametrize(
    ("family", "glob"),
    [
        ("embed", "hook_embed"),
        ("pos_embed", "hook_pos_embed"),
        ("resid_post", "blocks.*.hook_resid_post"),
        ("attn_out", "blocks.*.hook_attn_out"),
        ("attn_z", "blocks.*.attn.hook_z"),
        ("mlp_pre", "blocks.*.mlp.hook_pre"),
        ("ln_final", "ln_final.hook_normalized"),
        ("ln_final_scale", "ln_final.hook_scale"),
        ("logits", "logits"),
    ],
)
def test_harvest_glob(family, glob):
    assert hooks.harvest_glob(family) == glob


def test_unknown_names_and_families():
    with pytest.raises(UnknownHookError, match="unknown hook family 'resid'"):
        hooks.harvest_glob("resid")
    with pytest.raises(UnknownHookError, match="maps to no stored family"):
        hooks.hook_family("blocks.0.ln_final.hook_scale")
    with pytest.raises(ValueError, match="give a layer"):
        hooks.family_hook("resid_post")
    assert hooks.family_hook("embed", 5) == "hook_embed"  # outside the blocks: no layer


def test_missing_optional_hooks_are_explained(tiny_models):
    with pytest.raises(UnknownHookError, match="learned position embeddings"):
        tiny_models["llama"].resolve_hooks(["hook_pos_embed"])
    with pytest.raises(UnknownHookError, match="parallel"):
        tiny_models["gpt-neox"].hook_shape("blocks.1.hook_resid_mid")


# ---------------------------------------------------------------- ln_final.hook_scale


def test_norm_eps(tiny_models):
    assert norm_eps(nn.LayerNorm(4, eps=0.25)) == 0.25
    assert (
        norm_eps(_final_norm(tiny_models["llama"]))
        == tiny_models["llama"].model.config.rms_norm_eps
    )
    assert norm_eps(nn.Identity()) is None


@pytest.mark.parametrize("arch", LAYERNORM_ARCHS + RMSNORM_ARCHS)
def test_ln_final_scale_matches_the_norm_formula(arch, tokens):
    # residuals of a tiny random model have mean(x^2) ~ 1e-3: with an eps as large, a
    # missing eps or a wrong kind (centring or not) is off by 0.4% to 50%
    eps = 1e-3
    hm = build_model(arch, seed=0, **{EPS_FIELD[arch]: eps})
    last = f"blocks.{hm.n_layers - 1}.hook_resid_post"  # the final norm's input
    _, cache = hm.run_with_cache(tokens, hooks=[last, "ln_final.*"])
    x = cache[last].double()
    if arch in LAYERNORM_ARCHS:
        x = x - x.mean(-1, keepdim=True)
    want = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    scale = cache["ln_final.hook_scale"]
    assert scale.shape == (*tokens.shape, 1) and scale.dtype == hm.dtype
    assert_close(scale.double(), want)

    # ours: hook_normalized is the norm's output, its weight (and bias) applied
    norm = _final_norm(hm)
    gain = norm.weight.double() + (1.0 if arch == "gemma" else 0.0)  # gemma scales by 1 + w
    bias = 0.0 if getattr(norm, "bias", None) is None else norm.bias.double()
    assert_close(cache["ln_final.hook_normalized"].double(), x / want * gain + bias)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_ln_final_scale_intervention_rescales_the_output(arch, tiny_models, tokens):
    hm = tiny_models[arch]
    names = ["ln_final.hook_scale", "ln_final.hook_normalized"]
    logits, ref = hm.run_with_cache(tokens, hooks=[*names, "logits"])
    new_logits, got = hm.run_with_cache(
        tokens, hooks=[*names, "logits"], interventions={"ln_final.hook_scale": lambda s, n: 2 * s}
    )
    norm = _final_norm(hm)
    bias = 0.0 if getattr(norm, "bias", None) is None else norm.bias
    assert_close(got["ln_final.hook_scale"], 2 * ref["ln_final.hook_scale"])
    assert_close(
        got["ln_final.hook_normalized"], (ref["ln_final.hook_normalized"] - bias) / 2 + bias
    )
    assert_close(new_logits, hm.unembed(got["ln_final.hook_normalized"]))
    assert not torch.allclose(new_logits, logits)


def test_no_scale_hook_for_another_final_norm():
    hm = build_model("gpt2", seed=0)
    hm.model.transformer.ln_f = nn.Identity()
    bare = HookedModel(hm.model)
    assert "ln_final.hook_scale" not in bare.hook_names()
    assert "ln_final.hook_normalized" in bare.hook_names()
    with pytest.raises(UnknownHookError, match="final norm has an eps"):
        bare.resolve_hooks(["ln_final.hook_scale"])
    assert bare.resolve_hooks(["ln_final.*"]) == ["ln_final.hook_normalized"]
