"""Custom torch models: any ``nn.Module`` plus an ``Adapter`` saying where its parts are.

A pipeline names one by its factory::

    model:
      factory: "arrakis_ray.studies.grokking.model:build"   # module:function
      checkpoint: checkpoints/final.safetensors              # optional: else random init
      config: {d_model: 128}                                  # the factory's keyword args
      tokenizer: checkpoints/tokenizer                        # an HF tokenizer directory

The factory returns a ``TorchModel``. Its module's forward is
``forward(input_ids, attention_mask=None, position_ids=None) -> logits [batch, pos,
vocab]``; it honours ``position_ids`` (positions from 0) and ``attention_mask`` (0 marks
a padding key) when they are given. Blocks are sequential (attention, then mlp), each
called with the residual stream first and returning it. The adapter's paths name the
embedding, blocks, attention projections, pattern, mlp, norms (or None) and unembedding
(see ``Adapter``); the hook points then carry TransformerLens names as for HF models.

The factory is called on torch's meta device to learn the shape (nothing allocated), and
on the target device under the pipeline's seed to build; a checkpoint (``.safetensors``,
or a ``.pt``/``.pth`` state dict read with ``weights_only=True``) is then loaded strictly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from arrakis_ray.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from arrakis_ray.models.adapters import Adapter
    from arrakis_ray.models.hooked import HookedModel

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class TorchModel:
    """A plain torch model and what ``HookedModel`` needs to know to hook it."""

    module: nn.Module
    """Its forward: ``(input_ids, attention_mask=None, position_ids=None) -> logits``."""
    adapter: Adapter
    """Module paths of the embedding, blocks, attention, mlp, norms and unembedding."""
    n_heads: int
    n_kv_heads: int | None = None
    """Key/value heads (None: n_heads)."""
    max_positions: int | None = None
    """The longest sequence the model takes (None: no limit)."""
    positional: Literal["learned", "rotary", "none"] | None = None
    """How positions enter (None: ``learned`` when the adapter has ``pos_embed``, else
    ``none``)."""
    factory: str = ""
    """``module:function`` that built it (set by ``build_custom``; the fingerprint reads it)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The factory's keyword arguments (set by ``build_custom``)."""


def resolve_factory(factory: str) -> Callable[..., TorchModel]:
    """The function a ``module:function`` string names, importing its module."""
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"model.factory {factory!r}: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model.factory {factory!r}: cannot import {module_name}: {exc}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelLoadError(f"model.factory {factory!r}: {module_name} has no function {attr}")
    return fn


def make_torch_model(factory: str, config: Mapping[str, Any]) -> TorchModel:
    """Call the factory with ``config``; check what it returns and its adapter's paths."""
    fn = resolve_factory(factory)
    try:
        built = fn(**config)
    except TypeError as exc:  # an unknown or missing keyword argument
        raise ModelLoadError(f"model.config for {factory}: {exc}") from None
    except ModelLoadError:
        raise
    except Exception as exc:  # a value the factory refuses (sizes that do not divide, ...)
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"model.factory {factory}: {type(exc).__name__}: {text}") from None
    if not isinstance(built, TorchModel):
        raise ModelLoadError(
            f"model.factory {factory!r} returned {type(built).__name__}, not a TorchModel"
        )
    built.factory, built.config = factory, dict(config)
    _check_paths(built, factory)
    return built


def _check_paths(built: TorchModel, factory: str) -> None:
    """Refuse an adapter path that names no submodule, with the path in the message."""
    a, root = built.adapter, built.module
    top = {"embed": a.embed, "pos_embed": a.pos_embed, "layers": a.layers}
    top.update({"final_norm": a.final_norm, "lm_head": a.lm_head})
    for field_name, path in top.items():
        if path is not None and not _has_module(root, path):
            raise ModelLoadError(
                f"model.factory {factory}: adapter.{field_name} {path!r} "
                "names no submodule of the model"
            )
    layers = list(root.get_submodule(a.layers))
    if not layers:
        raise ModelLoadError(f"model.factory {factory}: adapter.layers {a.layers!r} is empty")
    inner = (
        "attn",
        "ln1",
        "ln2",
        "q",
        "k",
        "v",
        "qkv",
        "o_proj",
        "mlp",
        "mlp_in",
        "mlp_up",
        "mlp_down",
        "pattern",
    )
    for field_name in inner:
        path = getattr(a, field_name)
        if path is not None and not _has_module(layers[0], path):
            raise ModelLoadError(
                f"model.factory {factory}: adapter.{field_name} {path!r} "
                "names no submodule of block 0"
            )
    if a.qkv is None and None in (a.q, a.k, a.v):
        raise ModelLoadError(f"model.factory {factory}: the adapter needs q, k and v or qkv")


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def causal_softmax(scores: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The attention pattern from raw scores ``[b, head, q_pos, k_pos]``: a softmax over
    the keys a query may see. Keys after the query are masked, and so are padding keys
    (``attention_mask [b, k_pos]``, 0 = padding). Queries and keys are aligned at the end
    (query ``i`` sits at position ``k_pos - q_pos + i``). A query that sees no key at all (a
    padding query in front) gets a row of zeros, not NaNs, which would otherwise reach real
    tokens through ``0 * NaN``. For custom models' attention (the contract asks them to
    honour the mask)."""
    import torch

    q_pos, k_pos = scores.shape[-2:]
    rows = torch.arange(q_pos, device=scores.device)[:, None] + (k_pos - q_pos)
    allowed = (torch.arange(k_pos, device=scores.device)[None, :] <= rows)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), pattern, torch.zeros_like(pattern))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch ``.pt`` state dict."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model.checkpoint: {path} is not a file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"model.checkpoint: {path} is not one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: one line naming it
        raise ModelLoadError(
            f"model.checkpoint: cannot read {path}: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"model.checkpoint: {path} does not hold a state dict of tensors")
    return state


def build_custom(
    factory: str,
    config: Mapping[str, Any],
    *,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tokenizer: Any = None,
) -> HookedModel:
    """The custom model, built under ``seed`` and loaded from ``checkpoint`` if given."""
    import torch

    from arrakis_ray.models.hooked import HookedModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = make_torch_model(factory, config)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        try:
            built.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            first = " ".join(str(exc).split())[:300]
            raise ModelLoadError(
                f"model.checkpoint: {checkpoint} does not fit {factory}: {first}"
            ) from None
    built.module.to(device=device, dtype=dtype)
    return HookedModel.from_torch(built, tokenizer=tokenizer)


def describe_custom(factory: str, config: Mapping[str, Any]) -> HookedModel:
    """The custom model's structure on the meta device (no weights allocated)."""
    import torch

    from arrakis_ray.models.hooked import HookedModel

    with torch.device("meta"):
        built = make_torch_model(factory, config)
    return HookedModel.from_torch(built)
