"""Every norm read through the adapter's declaration reproduces the HF module.

The reference is the module's own forward; the expected kind per family is written out
here (LayerNorm: gpt2, gpt-neo, gpt-neox, stablelm; gemma's RMSNorm scales by
``1 + weight``), independently of the adapters under test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import ToolError
from arrakis_ray.models import build_model
from arrakis_ray.models.adapters import get_module
from arrakis_ray.models.circuits import layer_factors, norm_fold
from arrakis_ray.models.norms import final_norm, ln1_norm, read_norm
from arrakis_ray.models.weights import attention_weights

from .conftest import ALL_MODELS, VARIANTS

LAYERNORM = {"gpt2", "gpt-neo", "gpt-neox", "stablelm"}


def _norms(hm) -> dict[str, torch.nn.Module]:
    a, root = hm.adapter, hm.model
    out = {"final": get_module(root, a.final_norm), "ln1": a.sub(root, 0, a.ln1)}
    ln2 = a.sub(root, 0, a.ln2) if a.ln2 else None
    if ln2 is not None:  # None in stablelm's parallel block
        out["ln2"] = ln2
    return out


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_norm_reproduces_its_module(name):
    arch, cfg = VARIANTS.get(name, (name, {}))
    hm = build_model(arch, seed=0, **cfg)  # a fresh copy: its norms get random weights
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, hm.d_model, generator=gen) * 2 + 0.3
    for where, module in _norms(hm).items():
        with torch.no_grad():
            for p in module.parameters():  # random gains and biases
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
        norm = read_norm(hm, module, where)
        assert_close(norm(x), module(x), atol=1e-5, rtol=1e-5)
        assert norm.centred == (hm.arch in LAYERNORM)
        weight = module.weight.detach()
        assert_close(norm.gain, weight + 1 if hm.arch == "gemma" else weight)


def test_gemma_and_llama_declare_their_gain():
    for arch, kind in (("gemma", "rmsnorm_one_plus"), ("llama", "rmsnorm"), ("gpt2", "layernorm")):
        hm = build_model(arch, seed=2)
        assert hm.adapter.norm == kind
        assert final_norm(hm).kind == ln1_norm(hm, 1).kind == kind


def test_a_wrong_declaration_fails_loudly():
    hm = build_model("gemma", seed=0)
    with torch.no_grad():
        get_module(hm.model, hm.adapter.final_norm).weight.uniform_(-1, 1)
    hm.adapter = dataclasses.replace(hm.adapter, norm="rmsnorm")  # gemma's is 1 + weight
    with pytest.raises(ToolError, match="declares.*rmsnorm"):
        final_norm(hm)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_layer_factors_fold_ln1_into_the_readers(arch):
    """Folded W_Q equals diag(gain) (P) W_Q, and T factors keep every Frobenius norm."""
    hm = build_model(arch, seed=4)
    with torch.no_grad():
        hm.adapter.sub(hm.model, 1, hm.adapter.ln1).weight.uniform_(0.5, 1.5)
    f = layer_factors(hm, 1, fold_ln=True)
    w = attention_weights(hm, 1)
    gain, centres = norm_fold(hm, 1)
    read = torch.diag(gain)
    if centres:
        read = (torch.eye(hm.d_model) - 1.0 / hm.d_model) @ read
    assert_close(f.W_Q, read @ w.W_Q, atol=1e-5, rtol=1e-5)
    qk = torch.stack([f.W_Q[h] @ f.W_K[h].T for h in range(hm.n_heads)])
    ov = torch.stack([f.W_V[h] @ f.W_O[h] for h in range(hm.n_heads)])
    assert_close(f.qk_norm(), qk.flatten(1).norm(dim=1), atol=1e-5, rtol=1e-4)
    assert_close(f.ov_norm(), ov.flatten(1).norm(dim=1), atol=1e-5, rtol=1e-4)
