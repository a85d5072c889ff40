"""What ``HookedModel`` needs of the model it wraps, for HF models and plain torch ones.

Hook points are found through the ``Adapter``'s module paths whatever the model. The
rest differs: how to call the forward and get logits, where the sizes come from, how
attention patterns are made available, what describes the model for its fingerprint.
A backend answers exactly those questions, so ``HookedModel`` never asks the model
itself.

- ``HFBackend``: an HF ``*ForCausalLM``. Sizes come from ``model.config``; the forward
  takes ``use_cache=False`` and returns ``.logits``; patterns need eager attention,
  switched on for the call.
- ``TorchBackend``: any ``nn.Module`` described by a ``TorchModel`` (``models/custom``).
  Its forward returns the logits tensor; its attention passes the pattern through a
  module the adapter names (or returns it second), so nothing needs switching.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import UnknownHookError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from arrakis_ray.models.adapters import Adapter
    from arrakis_ray.models.custom import TorchModel

log = logging.getLogger(__name__)


class HFBackend:
    """An HF causal LM: today's behaviour, unchanged."""

    kind = "hf"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def adapter(self) -> Adapter:
        from arrakis_ray.models.adapters import adapter_for

        return adapter_for(self.config)

    def d_model(self) -> int:
        return int(self.config.hidden_size)

    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads())

    def parallel(self, adapter: Adapter) -> bool:
        return adapter.is_parallel(self.config)

    def position_limit(self) -> int | None:
        from arrakis_ray.harvest.checks import position_limit

        return position_limit(self.config)

    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None) or None

    def special_ids(self) -> dict[str, int | None]:
        """BOS/EOS/PAD ids the config declares (for a model without a tokenizer)."""
        names = ("bos_token_id", "eos_token_id", "pad_token_id")
        return {n: getattr(self.config, n, None) for n in names}

    def describe(self) -> dict[str, Any]:
        """The config as a dict (the fingerprint leaves out how it was saved or run)."""
        return self.config.to_dict()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids) -> Tensor:
        kwargs: dict[str, Any] = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = position_ids
        return self.model(input_ids, **kwargs).logits

    def patterns_on(self, arch: str) -> Callable[[], None] | None:
        """Switch to eager attention (the only one returning weights); return the undo."""
        current = self.config._attn_implementation
        if current == "eager":
            return None
        if not self.model._can_set_attn_implementation():
            raise UnknownHookError(
                f"this {arch} model runs {current!r} attention and cannot switch to eager, "
                "so attention patterns are unavailable"
            )
        log.debug("switching %s attention from %s to eager for patterns", arch, current)
        self.model.set_attn_implementation("eager")
        return lambda: self.model.set_attn_implementation(current)


class TorchBackend:
    """A plain ``nn.Module`` described by a ``TorchModel``."""

    kind = "torch"

    def __init__(self, spec: TorchModel):
        self.spec = spec
        self.model = spec.module

    def adapter(self) -> Adapter:
        return self.spec.adapter

    def d_model(self) -> int:
        from arrakis_ray.models.adapters import get_module

        weight = get_module(self.model, self.spec.adapter.embed).weight
        return int(weight.shape[-1])

    def n_heads(self) -> int:
        return int(self.spec.n_heads)

    def n_kv_heads(self) -> int:
        return int(self.spec.n_kv_heads or self.spec.n_heads)

    def parallel(self, adapter: Adapter) -> bool:
        return False  # the contract: attention, then the mlp

    def position_limit(self) -> int | None:
        return self.spec.max_positions

    def logit_softcap(self) -> float | None:
        return None

    def special_ids(self) -> dict[str, int | None]:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

    def describe(self) -> dict[str, Any]:
        return {"factory": self.spec.factory, "config": dict(self.spec.config)}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids) -> Tensor:
        if attention_mask is None:
            return self.model(input_ids)
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def patterns_on(self, arch: str) -> Callable[[], None] | None:
        return None  # the pattern module (or attn's second output) always holds it
