"""The one-layer transformer of Nanda et al. (2023), "Progress measures for grokking".

``a + b mod p`` is read from the sequence ``a, b, =``: one attention layer (4 heads of
32), a ReLU MLP of 512 neurons, no LayerNorm and no biases (the paper's model had none
that trained: TransformerLens' demo froze them at zero). Token ids: ``0..p-1`` are the
numbers and ``p`` is ``=``, so the vocabulary is ``p + 1`` (114 for p = 113); the
unembedding has all ``p + 1`` outputs so that the model fits the custom-model contract
(``lm_head`` maps d_model to the vocabulary), and the loss reads only the first ``p``
logits at ``=``, as the paper's ``d_vocab_out = p`` did.

The module follows the custom-model contract of ``arrakis_ray.models.custom``: the
attention passes its softmaxed pattern through ``attn.hook_pattern`` (an
``nn.Identity``) so the backend can hook it, and the forward honours ``position_ids``
and ``attention_mask``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from arrakis_ray.models.custom import causal_softmax

P = 113
"""The modulus: the numbers are 0..112."""


class Attention(nn.Module):
    """Causal multi-head attention without biases; returns attn_out ``[b, pos, d_model]``."""

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.q = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.k = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.o = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.hook_pattern = nn.Identity()  # the backend hooks the pattern here

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, pos, _ = x.shape
        return x.view(b, pos, self.n_heads, self.d_head).transpose(1, 2)  # [b, head, pos, d_head]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [b, head, q_pos, k_pos]
        n = x.shape[1]
        pattern = self.hook_pattern(causal_softmax(scores, attention_mask))
        z = (pattern @ v).transpose(1, 2).reshape(x.shape[0], n, -1)  # [b, pos, head*d_head]
        return self.o(z)


class MLP(nn.Module):
    """``w_out(relu(w_in(x)))``: hook_pre is the w_in output, hook_post the w_out input."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_mlp, bias=False)
        self.act = nn.ReLU()
        self.w_out = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))


class Block(nn.Module):
    """Sequential block without norms: ``x + attn(x)`` then ``+ mlp(.)``."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_heads, d_head)
        self.mlp = MLP(d_model, d_mlp)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(x, attention_mask)
        return x + self.mlp(x)


class GrokkingTransformer(nn.Module):
    """Token and learned positional embeddings, ``n_layers`` blocks, an unembedding."""

    def __init__(
        self,
        vocab: int = P + 1,
        d_model: int = 128,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 512,
        n_layers: int = 1,
        n_positions: int = 3,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(n_positions, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_head, d_mlp) for _ in range(n_layers))
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: N(0, 1/fan_in) for every matrix, N(0, 1/d_model) for embeddings."""
        d_model = self.embed.embedding_dim
        self.embed.weight.normal_(0.0, d_model**-0.5)
        self.pos_embed.weight.normal_(0.0, d_model**-0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)

    def residual(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final residual stream ``[b, pos, d_model]``."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids) + self.pos_embed(position_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[b, pos, vocab]``."""
        return self.unembed(self.residual(input_ids, attention_mask, position_ids))

    def answer_logits(self, input_ids: torch.Tensor, p: int = P) -> torch.Tensor:
        """Logits ``[b, p]`` for the answer, read at the last position (``=``).

        Training only needs these; with one layer the last position's output depends on
        the earlier positions only through its keys and values, so the query, the MLP
        and the unembedding run for the last position alone (about 3x less work than
        ``forward``, and equal to ``forward(input_ids)[:, -1, :p]``).
        """
        if len(self.blocks) != 1:
            return self.forward(input_ids)[:, -1, :p]
        block = self.blocks[0]
        attn = block.attn
        n = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos_embed.weight[:n]
        last = x[:, -1:]
        q = attn._heads(attn.q(last))  # [b, head, 1, d_head]
        k, v = attn._heads(attn.k(x)), attn._heads(attn.v(x))
        pattern = (q @ k.transpose(-1, -2) / math.sqrt(attn.d_head)).softmax(dim=-1)
        z = (pattern @ v).transpose(1, 2).reshape(x.shape[0], 1, -1)
        resid = last + attn.o(z)
        resid = resid + block.mlp(resid)
        return nn.functional.linear(resid[:, 0], self.unembed.weight[:p])


def build(
    p: int = P,
    d_model: int = 128,
    n_heads: int = 4,
    d_head: int = 32,
    d_mlp: int = 512,
    n_layers: int = 1,
    n_positions: int = 3,
):
    """The factory the pipeline names (``arrakis_ray.studies.grokking.model:build``).

    Returns a ``TorchModel`` (module, adapter, head counts) for the custom backend.
    """
    from arrakis_ray.models.adapters import Adapter
    from arrakis_ray.models.custom import TorchModel

    module = GrokkingTransformer(p + 1, d_model, n_heads, d_head, d_mlp, n_layers, n_positions)
    adapter = Adapter(
        arch="grokking",
        model_types=(),
        embed="embed",
        pos_embed="pos_embed",
        layers="blocks",
        final_norm=None,
        lm_head="unembed",
        attn="attn",
        ln1=None,
        ln2=None,
        q="attn.q",
        k="attn.k",
        v="attn.v",
        o_proj="attn.o",
        pattern="attn.hook_pattern",
        mlp="mlp",
        mlp_in="mlp.w_in",
        mlp_down="mlp.w_out",
        norm=None,
    )
    return TorchModel(module=module, adapter=adapter, n_heads=n_heads, max_positions=n_positions)


def load(path: str, **config) -> GrokkingTransformer:
    """A ``GrokkingTransformer`` (float32, eval mode) with a shipped ``.safetensors`` state."""
    from safetensors.torch import load_file

    model = GrokkingTransformer(**config)
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()
