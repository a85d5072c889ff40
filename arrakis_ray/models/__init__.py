"""Hooked HF causal LMs with TransformerLens-style hook names.

Re-exports are lazy: ``from arrakis_ray.models import ARCHITECTURES`` does not import
torch; touching ``HookedModel`` does.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arrakis_ray.models.hooked import HookedModel
    from arrakis_ray.models.load import build_model, load_pretrained, model_fingerprint
    from arrakis_ray.models.tiny import ARCHITECTURES, tiny_config

__all__ = [
    "ARCHITECTURES",
    "HookedModel",
    "build_model",
    "load_pretrained",
    "model_fingerprint",
    "tiny_config",
]

_WHERE = {
    "HookedModel": "hooked",
    "build_model": "load",
    "load_pretrained": "load",
    "model_fingerprint": "load",
    "ARCHITECTURES": "tiny",
    "tiny_config": "tiny",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
