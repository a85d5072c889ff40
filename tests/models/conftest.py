"""Tiny random-init models of every architecture, built once per session.

Besides the nine default configs, two variants cover the other residual layout of the
families that have a switch: gpt-neox sequential and stablelm parallel.

``HF`` gives the tests direct access to each family's HF modules, written out per
family by attribute (independently of the adapters under test).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from arrakis_ray.models import ARCHITECTURES, build_model

VARIANTS = {
    "gpt-neox/sequential": ("gpt-neox", {"use_parallel_residual": False}),
    "stablelm/parallel": ("stablelm", {"use_parallel_residual": True}),
}
ALL_MODELS = [*ARCHITECTURES, *VARIANTS]
SEQ = 10  # tokens per test sequence


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """arch -> HookedModel, seed 0, default tiny config."""
    return {arch: build_model(arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def all_models(tiny_models) -> dict:
    """The nine tiny models plus the residual-layout variants."""
    variants = {name: build_model(arch, seed=0, **cfg) for name, (arch, cfg) in VARIANTS.items()}
    return {**tiny_models, **variants}


@pytest.fixture(autouse=True)
def _no_grad_one_thread():
    """No grad (cached activations are inference tensors) and one torch thread.

    Tiny matmuls gain nothing from a second thread, and on a busy 2-core box torch's
    spinning worker threads made this suite 10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=ALL_MODELS)
def hm(request, all_models):
    """Each tiny model in turn."""
    return all_models[request.param]


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """A fixed [2, SEQ] batch of token ids."""
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1234))


@contextlib.contextmanager
def _hf_attention(model, impl: str):
    """Run the HF model under ``impl`` attention, then put the old one back."""
    old = model.config._attn_implementation
    if old != impl:
        model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        if old != impl:
            model.set_attn_implementation(old)


class HF:
    """Per-family access to a tiny model's HF modules and weights (``[out, in]``)."""

    def __init__(self, hm):
        self.hm = hm
        self.arch = hm.arch
        root = hm.model
        if self.arch in ("gpt2", "gpt-neo"):
            self.blocks = root.transformer.h
        elif self.arch == "gpt-neox":
            self.blocks = root.gpt_neox.layers
        else:
            self.blocks = root.model.layers

    @staticmethod
    def _wb(module, conv1d: bool = False):
        weight = module.weight.T if conv1d else module.weight
        return weight, module.bias

    def ln1(self, layer: int):
        blk = self.blocks[layer]
        return blk.ln_1 if self.arch in ("gpt2", "gpt-neo") else blk.input_layernorm

    def mlp_norm(self, layer: int):
        """The norm whose output the mlp reads."""
        blk = self.blocks[layer]
        if self.arch in ("gpt2", "gpt-neo"):
            return blk.ln_2
        if self.arch == "stablelm" and self.hm.model.config.use_parallel_residual:
            return blk.input_layernorm
        return blk.post_attention_layernorm

    def o_proj(self, layer: int):
        blk = self.blocks[layer]
        if self.arch == "gpt2":
            return self._wb(blk.attn.c_proj, conv1d=True)
        if self.arch == "gpt-neo":
            return self._wb(blk.attn.attention.out_proj)
        if self.arch == "gpt-neox":
            return self._wb(blk.attention.dense)
        return self._wb(blk.self_attn.o_proj)

    def down_proj(self, layer: int):
        blk = self.blocks[layer]
        if self.arch == "gpt2":
            return self._wb(blk.mlp.c_proj, conv1d=True)
        if self.arch == "gpt-neo":
            return self._wb(blk.mlp.c_proj)
        if self.arch == "gpt-neox":
            return self._wb(blk.mlp.dense_4h_to_h)
        return self._wb(blk.mlp.down_proj)

    def mlp_in(self, layer: int):
        """(W, b) of the pre-activation (the gate of gated mlps)."""
        blk, d_mlp = self.blocks[layer], self.hm.d_mlp
        if self.arch == "gpt2":
            return self._wb(blk.mlp.c_fc, conv1d=True)
        if self.arch == "gpt-neo":
            return self._wb(blk.mlp.c_fc)
        if self.arch == "gpt-neox":
            return self._wb(blk.mlp.dense_h_to_4h)
        if self.arch == "phi3":
            return blk.mlp.gate_up_proj.weight[:d_mlp], None
        return self._wb(blk.mlp.gate_proj)

    def mlp_up(self, layer: int):
        """(W, b) of the up projection of gated mlps, None otherwise."""
        blk, d_mlp = self.blocks[layer], self.hm.d_mlp
        if self.arch in ("gpt2", "gpt-neo", "gpt-neox"):
            return None
        if self.arch == "phi3":
            return blk.mlp.gate_up_proj.weight[d_mlp:], None
        return self._wb(blk.mlp.up_proj)

    def act(self):
        from transformers.activations import ACT2FN

        cfg = self.hm.model.config
        name = cfg.activation_function if self.arch in ("gpt2", "gpt-neo") else cfg.hidden_act
        return ACT2FN[name]

    def qkv_head(self, layer: int, which: str, head: int):
        """(W [d_head, d_model], b [d_head] | None) of one head of q, k or v."""
        blk, hm = self.blocks[layer], self.hm
        dh, nh, nkv, d = hm.d_head, hm.n_heads, hm.n_kv_heads, hm.d_model
        idx = "qkv".index(which)
        rows = None
        if self.arch == "gpt2":
            # Conv1D c_attn: columns [q | k | v], each d_model wide
            weight, bias = self._wb(blk.attn.c_attn, conv1d=True)
            rows = slice(idx * d + head * dh, idx * d + (head + 1) * dh)
        elif self.arch == "gpt-neox":
            # per head: [q_h | k_h | v_h]
            weight, bias = self._wb(blk.attention.query_key_value)
            start = head * 3 * dh + idx * dh
            rows = slice(start, start + dh)
        elif self.arch == "phi3":
            weight, bias = self._wb(blk.self_attn.qkv_proj)
            start = (0, nh * dh, (nh + nkv) * dh)[idx] + head * dh
            rows = slice(start, start + dh)
        else:
            attn = blk.attn.attention if self.arch == "gpt-neo" else blk.self_attn
            weight, bias = self._wb(getattr(attn, f"{which}_proj"))
            rows = slice(head * dh, (head + 1) * dh)
        return weight[rows], (None if bias is None else bias[rows])


@pytest.fixture
def hf(hm) -> HF:
    """HF module access for the current ``hm``."""
    return HF(hm)


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def count_hooks():
    """``count_hooks(model)``: forward hooks + pre-hooks registered anywhere in it."""
    return _count_hooks


@pytest.fixture
def attention():
    """``attention(model, impl)``: context manager running the HF model under ``impl``."""
    return _hf_attention
