"""Tiny configs of every supported architecture, for random-init models in tests and demos.

2 layers, d_model 64, 4 heads of width 16 (2 key/value heads where the family has
grouped-query attention), vocab 128, context 64, d_mlp 128.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ARCHITECTURES: tuple[str, ...] = (
    "gpt2",
    "gpt-neo",
    "gpt-neox",
    "llama",
    "gemma",
    "phi3",
    "qwen2",
    "mistral",
    "stablelm",
)

_MODEL_TYPE = {arch: arch.replace("-", "_") for arch in ARCHITECTURES}
# Families whose attention reads config.num_key_value_heads (grouped-query attention).
_GQA = {"llama", "gemma", "phi3", "qwen2", "mistral", "stablelm"}
# Families whose default config.head_dim is a fixed number (256, 128) rather than
# d_model / n_heads, so a tiny config has to set it.
_FIXED_HEAD_DIM = {"gemma", "mistral"}

_BASE: dict[str, Any] = {
    "vocab_size": 128,  # token ids 0..127
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,  # context of up to 64 tokens
    # Special ids inside the tiny vocab (defaults like 50256 or 32000 are out of range,
    # and a pad id would zero an embedding row at init).
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}


def canonical_arch(arch: str) -> str:
    """``arch`` as one of ``ARCHITECTURES`` (accepts HF spellings like ``gpt_neox``)."""
    name = str(arch).strip().lower().replace("_", "-")
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"unknown architecture {arch!r}{hint} (known: {', '.join(ARCHITECTURES)})"
        )
    return name


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A tiny HF config of ``arch``; ``overrides`` are HF config fields and win.

    Generic names (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``) work for every family.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    arch = canonical_arch(arch)
    kwargs = {**_BASE}
    if arch in _GQA:
        kwargs["num_key_value_heads"] = 2
    # a family's own names (gpt2's n_layer, n_embd ...) are aliases of the generic ones:
    # rename them, or the generic defaults above would silently win over the override
    aliases = getattr(CONFIG_MAPPING[_MODEL_TYPE[arch]], "attribute_map", {})
    native_to_generic = {native: generic for generic, native in aliases.items()}
    kwargs.update({native_to_generic.get(k, k): v for k, v in overrides.items()})
    if arch in _FIXED_HEAD_DIM and "head_dim" not in overrides:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if arch == "gpt2":
        # GPT2Config calls the mlp width n_inner and has no intermediate_size.
        kwargs["n_inner"] = kwargs.pop("intermediate_size")
    if arch == "gpt-neo" and "attention_types" not in overrides:
        # Alternate global/local attention as the real models do; the list must have
        # exactly one entry per layer.
        n = kwargs["num_hidden_layers"]
        types: list[list[Any]] = [[["global", "local"], n // 2]] if n >= 2 else []
        if n % 2:
            types.append([["global"], 1])
        kwargs["attention_types"] = types
    try:
        return AutoConfig.for_model(_MODEL_TYPE[arch], **kwargs)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"invalid tiny {arch} config overrides {overrides}: {err}") from err
