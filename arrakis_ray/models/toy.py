"""A hand-written pre-LayerNorm transformer: the example of a custom model.

Nothing here comes from a model library: it shows the contract of ``models/custom.py``
in about 150 lines, and the tests check every hook point of it against a manual
computation. Use it in a pipeline as::

    model:
      factory: "arrakis_ray.models.toy:build"
      config: {n_layers: 2, d_model: 32, n_heads: 4, d_mlp: 64, vocab: 386}
      tokenizer: zoo:facts-gpt2
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from arrakis_ray.models.adapters import Adapter
from arrakis_ray.models.custom import TorchModel, causal_softmax

ADAPTER = Adapter(
    arch="toy",
    model_types=(),
    embed="embed",
    pos_embed="pos_embed",
    layers="blocks",
    final_norm="ln_final",
    lm_head="unembed",
    attn="attn",
    ln1="ln1",
    ln2="ln2",
    q="attn.q",
    k="attn.k",
    v="attn.v",
    o_proj="attn.o",
    pattern="attn.hook_pattern",
    mlp="mlp",
    mlp_in="mlp.w_in",
    mlp_down="mlp.w_out",
    norm="layernorm",
)


class Attention(nn.Module):
    """Scaled dot-product attention; the pattern passes through ``hook_pattern``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.o = nn.Linear(d_model, d_model)
        self.hook_pattern = nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, p, _ = x.shape
        q, k, v = (
            f(x).view(b, p, self.n_heads, self.d_head).transpose(1, 2)
            for f in (self.q, self.k, self.v)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        pattern = self.hook_pattern(causal_softmax(scores, attention_mask))
        z = (pattern @ v).transpose(1, 2).reshape(b, p, -1)  # heads side by side
        return self.o(z)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, norms: bool):
        super().__init__()
        if norms:  # else no module at all: the adapter says there is none
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.norms = norms
        self.attn, self.mlp = Attention(d_model, n_heads), MLP(d_model, d_mlp)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = x + self.attn(self.ln1(x) if self.norms else x, attention_mask)
        return x + self.mlp(self.ln2(x) if self.norms else x)


class ToyTransformer(nn.Module):
    """Token and learned position embeddings, pre-LN blocks, a final norm, an unembedding."""

    def __init__(self, sizes: dict[str, int], norms: bool):
        super().__init__()
        d_model, vocab = sizes["d_model"], sizes["vocab"]
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(sizes["max_positions"], d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, sizes["n_heads"], sizes["d_mlp"], norms)
            for _ in range(sizes["n_layers"])
        )
        self.ln_final = nn.LayerNorm(d_model) if norms else nn.Identity()
        self.unembed = nn.Linear(d_model, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids) + self.pos_embed(position_ids)
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask)
        return self.unembed(self.ln_final(x))


NORM_FREE = replace(ADAPTER, arch="toy-no-norms", final_norm=None, ln1=None, ln2=None, norm=None)


def build(
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int = 64,
    vocab: int = 386,
    max_positions: int = 64,
    norms: bool = True,
) -> TorchModel:
    """The toy transformer of the given sizes, described for ``HookedModel``;
    ``norms=False`` leaves out every LayerNorm (as the grokking model does)."""
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
    sizes = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=d_mlp,
        vocab=vocab,
        max_positions=max_positions,
    )
    module = ToyTransformer(sizes, norms)
    adapter = ADAPTER if norms else NORM_FREE
    return TorchModel(module, adapter, n_heads=n_heads, max_positions=max_positions)
