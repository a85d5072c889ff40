"""Per-head weights in TransformerLens conventions, for every supported architecture.

Weights are read through the model's ``Adapter`` (module paths) and ``linear_params``
(which un-transposes gpt2's Conv1D), then split per head:

- ``W_Q/W_K/W_V [n_heads, d_model, d_head]``: ``x_normed @ W_Q[h] + b_Q[h]`` is the
  pre-rotary ``hook_q[..., h, :]``, where ``x_normed`` is the ln1 output (the
  attention's input). Fused projections are split the way the family's forward does:
  gpt2 ``c_attn`` and phi3 ``qkv_proj`` are ``[q | k | v]`` along the output, gpt-neox
  ``query_key_value`` is interleaved per head (``[q_h | k_h | v_h]`` for each head h).
- grouped-query attention: ``W_K``/``W_V`` (and biases) are expanded to ``n_heads`` by
  repeating each kv head, so query head h uses kv head ``h // (n_heads // n_kv_heads)``
  (HF's ``repeat_kv`` order).
- ``W_O [n_heads, d_head, d_model]``: ``sum_h z[..., h, :] @ W_O[h] + b_O`` is
  ``hook_attn_out``.

What the weights do not carry: rotary position embeddings (applied to q/k after the
projection), the attention scale (1/sqrt(d_head) almost everywhere; gpt-neo applies
*no* scaling, so its QK logits are ``q . k`` unscaled), stablelm's optional qk-norm,
and gemma's embedding scale. Tensors are float32 copies on the model's device, detached
(no autograd graph), so callers may modify them freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from arrakis_ray.errors import ToolError
from arrakis_ray.models.adapters import get_module, linear_params

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention weights, per head (TransformerLens shapes)."""

    W_Q: Tensor
    """``[n_heads, d_model, d_head]``: ``x_normed @ W_Q[h] + b_Q[h]`` = pre-rotary q of head h."""
    b_Q: Tensor | None
    """``[n_heads, d_head]`` or None when the projection has no bias."""
    W_K: Tensor
    """``[n_heads, d_model, d_head]``, kv heads repeated to n_heads under grouped-query."""
    b_K: Tensor | None
    """``[n_heads, d_head]`` or None."""
    W_V: Tensor
    """``[n_heads, d_model, d_head]``, kv heads repeated to n_heads under grouped-query."""
    b_V: Tensor | None
    """``[n_heads, d_head]`` or None."""
    W_O: Tensor
    """``[n_heads, d_head, d_model]``: ``sum_h z[..., h, :] @ W_O[h] + b_O`` = attn_out."""
    b_O: Tensor | None
    """``[d_model]`` or None."""


def _f32(t: Tensor | None) -> Tensor | None:
    # a copy (never a view of a parameter), float32, outside autograd
    return None if t is None else t.detach().to(dtype=torch.float32, copy=True)


def _check_layer(model: HookedModel, layer: int) -> None:
    if not 0 <= layer < model.n_layers:
        raise ToolError(
            f"layer {layer} is out of range for this {model.arch} model "
            f"({model.n_layers} layers: 0..{model.n_layers - 1})"
        )


def _split_heads(weight: Tensor, bias: Tensor | None, n: int, d_head: int):
    """``[n * d_head, d_model]`` (out, in) -> ``W [n, d_model, d_head]``, ``b [n, d_head]``."""
    w = weight.reshape(n, d_head, weight.shape[-1]).transpose(1, 2)
    b = None if bias is None else bias.reshape(n, d_head)
    return w, b


def _qkv_rows(model: HookedModel, layer: int) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{"q"|"k"|"v": (weight [n * d_head, d_model], bias | None)}`` in ``[out, in]`` form."""
    a, nh, nkv, dh = model.adapter, model.n_heads, model.n_kv_heads, model.d_head
    if a.qkv is None:
        return {w: linear_params(a.sub(model.model, layer, getattr(a, w))) for w in "qkv"}
    weight, bias = linear_params(a.sub(model.model, layer, a.qkv))
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    if a.qkv_layout == "per_head":
        # gpt-neox: rows are [head, (q | k | v), d_head]
        w = weight.reshape(nh, 3, dh, -1)
        b = None if bias is None else bias.reshape(nh, 3, dh)
        for i, which in enumerate("qkv"):
            out[which] = (
                w[:, i].reshape(nh * dh, -1),
                None if b is None else b[:, i].reshape(nh * dh),
            )
        return out
    # gpt2 / phi3: [q (n_heads) | k (n_kv) | v (n_kv)] along the output
    start = 0
    for which, n in (("q", nh), ("k", nkv), ("v", nkv)):
        rows = slice(start, start + n * dh)
        out[which] = (weight[rows], None if bias is None else bias[rows])
        start += n * dh
    return out


def attention_weights(model: HookedModel, layer: int) -> AttentionWeights:
    """Per-head Q/K/V/O weights of ``layer`` (see the module docstring for conventions)."""
    _check_layer(model, layer)
    nh, nkv, dh = model.n_heads, model.n_kv_heads, model.d_head
    rows = _qkv_rows(model, layer)
    split = {}
    for which, n in (("q", nh), ("k", nkv), ("v", nkv)):
        w, b = _split_heads(*rows[which], n, dh)
        if n != nh:
            # grouped-query: query head h reads kv head h // group (HF repeat_kv)
            group = nh // n
            w = w.repeat_interleave(group, dim=0)
            b = None if b is None else b.repeat_interleave(group, dim=0)
        split[which] = (_f32(w), _f32(b))
    w_o, b_o = linear_params(model.adapter.sub(model.model, layer, model.adapter.o_proj))
    # o_proj weight is [d_model, n_heads * d_head]; its input columns are head-major
    W_O = w_o.T.reshape(nh, dh, w_o.shape[0])
    return AttentionWeights(
        W_Q=split["q"][0],
        b_Q=split["q"][1],
        W_K=split["k"][0],
        b_K=split["k"][1],
        W_V=split["v"][0],
        b_V=split["v"][1],
        W_O=_f32(W_O),
        b_O=_f32(b_o),
    )


def unembed_weights(model: HookedModel) -> tuple[Tensor, Tensor | None]:
    """``(W_U [d_model, vocab], b_U [vocab] | None)``: ``ln_final_out @ W_U + b_U`` = logits.

    Read from the lm_head (tied to the embedding in some families; that is fine).
    """
    weight, bias = linear_params(get_module(model.model, model.adapter.lm_head))
    return _f32(weight.T), _f32(bias)


def mlp_out_weights(model: HookedModel, layer: int) -> tuple[Tensor, Tensor | None]:
    """``(W_out [d_mlp, d_model], b_out [d_model] | None)`` of ``layer``'s mlp.

    ``mlp_post @ W_out + b_out`` = ``hook_mlp_out``.
    """
    _check_layer(model, layer)
    weight, bias = linear_params(model.adapter.sub(model.model, layer, model.adapter.mlp_down))
    return _f32(weight.T), _f32(bias)
