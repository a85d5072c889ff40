"""A small GPT-2-style character LM whose attention score is a dot product or a correlation.

Pre-LN blocks (``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``), learned positions, a
GELU mlp, a final LayerNorm and an untied unembedding. The baseline and the Leviathan
model share every line except the attention score (``attention.py``); built under the
same seed they start from identical weights, and the Leviathan one starts as the
baseline function too (its lag weights start at lag 0 only).

``build(**config)`` is the pipeline factory (``model.factory:
"arrakis_ray.studies.leviathan.model:build"``).
"""

from __future__ import annotations

import torch
from torch import nn

from arrakis_ray.models.adapters import Adapter
from arrakis_ray.models.custom import TorchModel
from arrakis_ray.studies.leviathan.attention import CausalSelfAttention

ADAPTER = Adapter(
    arch="leviathan",
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


class Mlp(nn.Module):
    """``w_out(gelu(w_in(x)))``."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.w_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))


class Block(nn.Module):
    """One pre-LN transformer block."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, attention: str, max_lag: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, attention, max_lag)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, d_mlp)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attention_mask)
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Token and position embeddings, ``n_layers`` blocks, final norm, unembedding."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        n_ctx: int,
        attention: str,
        max_lag: int,
    ):
        super().__init__()
        self.n_ctx = n_ctx
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(n_ctx, d_model)
        blocks = [Block(d_model, n_heads, d_mlp, attention, max_lag) for _ in range(n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids) + self.pos_embed(position_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.unembed(self.ln_final(x))


def build(
    vocab_size: int = 86,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    d_mlp: int = 256,
    n_ctx: int = 128,
    attention: str = "dot",
    max_lag: int = 4,
) -> TorchModel:
    """The pipeline factory: a ``CharLM`` with ``attention`` ``"dot"`` or ``"correlation"``.

    ``max_lag`` (L) is the correlation window ``[-L, L]``; the dot model ignores it.
    """
    if attention not in ("dot", "correlation"):
        raise ValueError(f"attention must be 'dot' or 'correlation', not {attention!r}")
    module = CharLM(vocab_size, d_model, n_layers, n_heads, d_mlp, n_ctx, attention, max_lag)
    return TorchModel(module=module, adapter=ADAPTER, n_heads=n_heads, max_positions=n_ctx)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
