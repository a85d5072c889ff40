"""``HookedAutoConfig`` and ``HookedAutoModel``: the original Arrakis' way to make a model.

Arrakis built a hooked HuggingFace model from a config naming the architecture and its
sizes. Here the same two calls give a :class:`~arrakis_ray.models.hooked.HookedModel`
(TransformerLens hook names, verified against TransformerLens), randomly initialised
from a fixed seed, so the same config gives the same weights in every process, and
with it the same experiment versions (``bench/versions.py``). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arrakis_ray.models.hooked import HookedModel


@dataclass(frozen=True, init=False)
class HookedAutoConfig:
    """An architecture by name (``gpt2``, ``gpt-neo``, ``gpt-neox``, ``llama``, ``gemma``,
    ``phi3``, ``qwen2``, ``mistral``, ``stablelm``; HF spellings such as ``stable-lm`` or
    ``gpt_neox`` work too) and HuggingFace config fields (``hidden_size``,
    ``num_hidden_layers``, ``vocab_size``, ...), checked when the model is built."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"

    def __init__(self, name: str, *, seed: int = 0, dtype: str = "float32", **fields: Any):
        from arrakis_ray.models.tiny import canonical_arch

        # "stable-lm" is how the original's README spelled it
        arch = canonical_arch("stablelm" if str(name).lower() == "stable-lm" else name)
        object.__setattr__(self, "name", arch)
        object.__setattr__(self, "fields", dict(fields))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "dtype", dtype)


def HookedAutoModel(config: HookedAutoConfig, *, device: str = "cpu") -> HookedModel:  # noqa: N802
    """A HookedModel of ``config``'s architecture, randomly initialised from its seed.

    A function named like the original's class, since what it returns is the project's
    one hooked model type: every tool, the harvest and the bench take it."""
    from arrakis_ray.models.load import build_model

    if not isinstance(config, HookedAutoConfig):
        raise TypeError(f"HookedAutoModel takes a HookedAutoConfig, not {type(config).__name__}")
    return build_model(
        config.name, seed=config.seed, dtype=config.dtype, device=device, **config.fields
    )
