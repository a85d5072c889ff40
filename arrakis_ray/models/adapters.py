"""Per-architecture module maps: where each TransformerLens hook point lives in an HF model.

An adapter names real modules by their attribute paths (``"model.layers"``,
``"self_attn.q_proj"``); it never inspects ``repr()``. Paths in the "top" group are
relative to the ``*ForCausalLM`` root, the others to one decoder layer. Every path was
checked against the transformers 5.23 modeling source of its family:

- gpt2: ``c_attn`` is a fused Conv1D (weight stored ``[in, out]``), output ``[q | k | v]``.
- gpt-neo: no fused projections, attention lives one level down (``attn.attention``),
  blocks return ``(hidden, attn_weights)`` and the attention is always eager.
- gpt-neox: ``query_key_value`` output is viewed as ``[..., head, 3 * d_head]`` and then
  chunked, so q/k/v are interleaved *per head*; ``use_parallel_residual`` selects the
  parallel (attn and mlp both read resid_pre) or sequential block.
- phi3: fused ``qkv_proj`` ``[q (n_heads) | k (n_kv) | v (n_kv)]`` and fused
  ``gate_up_proj`` ``[gate | up]``.
- stablelm: ``use_parallel_residual`` (then ``post_attention_layernorm`` is None and the
  mlp reads the ``input_layernorm`` output); q/k hooks are before the optional qk-norm.
- gemma: the embedding module itself multiplies by sqrt(d_model)
  (``GemmaTextScaledWordEmbedding``), so its output is what enters the residual stream;
  its RMSNorms scale by ``1 + weight`` (``norm = "rmsnorm_one_plus"``).

``norm`` declares what every norm of the family computes (``models/norms.py`` reads
the norms through it and checks the declaration on a probe input).

A plain torch model (``models/custom.py``) brings its own ``Adapter`` with the same
paths. It may leave out the norms (``ln1``, ``ln2``, ``final_norm`` and ``norm`` None:
no LayerNorm at all, as in the grokking model) and names a ``pattern`` module instead of
returning attention weights from ``attn``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from arrakis_ray.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

QkvLayout = Literal["concat", "per_head"]
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_one_plus"]
"""``layernorm``: ``weight * (x - mean) / sqrt(var + eps) + bias``; ``rmsnorm``:
``weight * x / sqrt(mean(x^2) + eps)``; ``rmsnorm_one_plus``: the same with gain
``1 + weight`` (gemma)."""


@dataclass(frozen=True)
class Adapter:
    """Where the hook points of one model family live, as module attribute paths."""

    arch: str
    """Our architecture name (one of ``ARCHITECTURES`` for the built-in adapters)."""
    model_types: tuple[str, ...]
    """HF ``config.model_type`` values this adapter serves."""
    # --- paths relative to the *ForCausalLM root
    embed: str
    pos_embed: str | None
    layers: str
    final_norm: str | None
    """None: the model has no final norm (no ``ln_final.*`` hooks; ``ln_final`` is identity)."""
    lm_head: str
    # --- paths relative to one decoder layer
    attn: str
    """Module returning ``(attn_out, attn_weights)`` (HF: weights are the eager pattern),
    or only ``attn_out`` when ``pattern`` names where the pattern is."""
    ln1: str | None
    """Norm in front of the attention; None when the model has no norms."""
    ln2: str | None
    """Norm in front of the mlp in the sequential block; its input is resid_mid."""
    o_proj: str
    mlp: str
    mlp_in: str
    """Linear whose output is mlp.hook_pre (c_fc, gate_proj, gate_up_proj, dense_h_to_4h)."""
    mlp_down: str
    norm: NormKind | None
    """What the family's norms (ln1, ln2, final norm) compute; None: it has none."""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    """Fused q/k/v projection (with ``qkv_layout``) when the family has one."""
    qkv_layout: QkvLayout = "concat"
    mlp_in_first_half: bool = False
    """The mlp_in output is ``[gate | up]`` and hook_pre is the gate half (phi3)."""
    mlp_up: str | None = None
    """Separate up projection of a gated mlp (None for plain or fused-gate mlps)."""
    parallel_flag: str | None = None
    """Config attribute that switches the parallel attn+mlp block on."""
    pattern: str | None = None
    """Module (in a layer) whose output is the softmaxed pattern ``[batch, head, q, k]``,
    e.g. an ``nn.Identity`` a custom attention passes its pattern through. None: read the
    pattern from ``attn``'s second output (HF eager attention)."""

    def is_parallel(self, config: object) -> bool:
        """True when attention and mlp both read resid_pre (no resid_mid exists)."""
        return bool(self.parallel_flag and getattr(config, self.parallel_flag, False))

    def layer_modules(self, root: nn.Module) -> list[nn.Module]:
        """The decoder layers, in forward order."""
        return list(get_module(root, self.layers))

    def sub(self, root: nn.Module, layer: int, path: str) -> nn.Module:
        """The module at ``path`` inside decoder layer ``layer``."""
        return get_module(self.layer_modules(root)[layer], path)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias | None)`` of an ``nn.Linear`` or an HF ``Conv1D``.

    HF's Conv1D (gpt2) stores its weight transposed, as ``[in, out]``.
    """
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.T if isinstance(module, Conv1D) else module.weight
    return weight, module.bias


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    pos_embed=None,
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_in="mlp.gate_proj",
    mlp_up="mlp.up_proj",
    mlp_down="mlp.down_proj",
    norm="rmsnorm",
)

_GPT2_TOP = dict(
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    attn="attn",
    ln1="ln_1",
    ln2="ln_2",
    mlp="mlp",
    mlp_in="mlp.c_fc",
    mlp_down="mlp.c_proj",
    norm="layernorm",
)

ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        arch="gpt2",
        model_types=("gpt2",),
        qkv="attn.c_attn",
        qkv_layout="concat",
        o_proj="attn.c_proj",
        **_GPT2_TOP,
    ),
    "gpt-neo": Adapter(
        arch="gpt-neo",
        model_types=("gpt_neo",),
        q="attn.attention.q_proj",
        k="attn.attention.k_proj",
        v="attn.attention.v_proj",
        o_proj="attn.attention.out_proj",
        **_GPT2_TOP,
    ),
    "gpt-neox": Adapter(
        arch="gpt-neox",
        model_types=("gpt_neox",),
        embed="gpt_neox.embed_in",
        pos_embed=None,
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        attn="attention",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        qkv="attention.query_key_value",
        qkv_layout="per_head",
        o_proj="attention.dense",
        mlp="mlp",
        mlp_in="mlp.dense_h_to_4h",
        mlp_down="mlp.dense_4h_to_h",
        norm="layernorm",
        parallel_flag="use_parallel_residual",
    ),
    "llama": Adapter(arch="llama", model_types=("llama",), **_LLAMA_LIKE),
    "gemma": Adapter(
        arch="gemma", model_types=("gemma",), **{**_LLAMA_LIKE, "norm": "rmsnorm_one_plus"}
    ),
    "phi3": Adapter(
        arch="phi3",
        model_types=("phi3",),
        **{
            **_LLAMA_LIKE,
            "q": None,
            "k": None,
            "v": None,
            "qkv": "self_attn.qkv_proj",
            "mlp_in": "mlp.gate_up_proj",
            "mlp_up": None,
            "mlp_in_first_half": True,
        },
    ),
    "qwen2": Adapter(arch="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    "mistral": Adapter(arch="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    "stablelm": Adapter(
        arch="stablelm",
        model_types=("stablelm",),
        parallel_flag="use_parallel_residual",
        **{**_LLAMA_LIKE, "norm": "layernorm"},
    ),
}

MODEL_TYPE_TO_ARCH: dict[str, str] = {
    mt: arch for arch, adapter in ADAPTERS.items() for mt in adapter.model_types
}


def adapter_for(config: object, where: str = "") -> Adapter:
    """The built-in adapter for an HF config, by its ``model_type``.

    ``where`` (a path, a model name) goes into the error message.
    """
    model_type = getattr(config, "model_type", None)
    arch = MODEL_TYPE_TO_ARCH.get(str(model_type))
    if arch is None:
        close = difflib.get_close_matches(str(model_type), list(MODEL_TYPE_TO_ARCH), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        at = f" at {where}" if where else ""
        raise ModelLoadError(
            f"model{at} has model_type {model_type!r}, which has no hook adapter{hint}; "
            f"supported model types: {', '.join(sorted(MODEL_TYPE_TO_ARCH))}"
        )
    return ADAPTERS[arch]
