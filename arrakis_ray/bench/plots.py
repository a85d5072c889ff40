"""The bench's ``plot_results``: run the model on one sequence and chart what it computed.

A ``PlotSpec`` names a plot type and the hooks it reads (``data_keys``: TransformerLens
hook names or globs). ``build_chart`` runs ``model.run_with_cache`` on the first
sequence of ``input_ids`` and returns an Altair chart (offline-renderable Vega-Lite,
data inlined so it has no row limit); ``plot_data`` returns the frame behind it.

The original Arrakis README passed ``h.1.attn.c_attn``: the *module* name of GPT-2's
fused q/k/v projection in HuggingFace, not a hook. Module names are accepted (whole,
``transformer.h.1.attn.c_attn``, or below the base model, ``h.1.attn.c_attn``; globs
too) and mapped to the hook that plot type reads in the part of the model the module
sits in, found through the model's adapter, so every family maps the same way:

=================== ========================== ======================== ========================
module inside       attention                  logit_lens, residual_norms neuron_activations,
                                                                        activations
=================== ========================== ======================== ========================
block L's attention blocks.L.attn.hook_pattern blocks.L.hook_resid_post blocks.L.hook_attn_out
block L's mlp       (none: an error)           blocks.L.hook_resid_post blocks.L.mlp.hook_post
block L (its norms) blocks.L.attn.hook_pattern blocks.L.hook_resid_post blocks.L.hook_resid_post
the embeddings      (none)                     blocks.0.hook_resid_pre  hook_embed
the final norm      (none)                     (none)                   ln_final.hook_normalized
=================== ========================== ======================== ========================

Each mapping is logged and shown under the chart's title.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ConfigError, ToolError, UnknownHookError

if TYPE_CHECKING:
    import altair as alt
    import polars as pl
    import torch

    from arrakis_ray.models.hooked import HookedModel

log = logging.getLogger(__name__)

PLOT_TYPES = ("attention", "logit_lens", "residual_norms", "neuron_activations", "activations")

_NEEDS = {
    "attention": "attention patterns (blocks.L.attn.hook_pattern)",
    "logit_lens": "residual stream states (blocks.L.hook_resid_pre or blocks.L.hook_resid_post)",
    "residual_norms": "d_model-wide dense hooks (resid_pre/mid/post, attn_out, mlp_out, embed)",
    "neuron_activations": "dense hooks, one vector per token (e.g. blocks.L.mlp.hook_post)",
    "activations": "dense hooks, one vector per token (e.g. blocks.L.hook_resid_post)",
}

_RESID = {
    "embed": "blocks.0.hook_resid_pre",
    **dict.fromkeys(("attn", "mlp", "block"), "blocks.{L}.hook_resid_post"),
}
_DENSE = {
    "embed": "hook_embed",
    "attn": "blocks.{L}.hook_attn_out",
    "mlp": "blocks.{L}.mlp.hook_post",
    "block": "blocks.{L}.hook_resid_post",
    "final_norm": "ln_final.hook_normalized",
}
MODULE_HOOKS: dict[str, dict[str, str]] = {
    "attention": dict.fromkeys(("attn", "block"), "blocks.{L}.attn.hook_pattern"),
    "logit_lens": _RESID,
    "residual_norms": _RESID,
    "neuron_activations": _DENSE,
    "activations": _DENSE,
}
"""Plot type -> part of the model an HF module sits in -> the hook read ({L}: its block)."""


@dataclass(frozen=True)
class PlotSpec:
    """What ``plot_results`` draws."""

    plot_type: str
    """One of ``PLOT_TYPES``."""
    data_keys: str | tuple[str, ...] = ()
    """TransformerLens hook names or globs (or HF module names, mapped; see the module
    docstring); empty: the plot type's default (``default_keys``)."""
    title: str | None = None
    """Chart title; None: one naming the plot and its hooks."""
    top_k: int = 16
    """Neurons (neuron_activations) or dimensions (activations) shown per hook."""

    def __post_init__(self) -> None:
        if self.plot_type not in PLOT_TYPES:
            close = difflib.get_close_matches(str(self.plot_type), PLOT_TYPES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"PlotSpec.plot_type {self.plot_type!r}{hint}: use one of {', '.join(PLOT_TYPES)}"
            )
        keys = (self.data_keys,) if isinstance(self.data_keys, str) else tuple(self.data_keys)
        if not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"PlotSpec.data_keys: expected hook names, got {self.data_keys!r}")
        object.__setattr__(self, "data_keys", keys)  # one spelling: a tuple
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"PlotSpec.top_k must be a positive integer, got {self.top_k!r}")


@dataclass
class PlotData:
    """The frame a chart draws, with its title and the notes shown under it."""

    spec: PlotSpec
    hooks: list[str]
    frame: pl.DataFrame
    title: str
    notes: list[str] = field(default_factory=list)


def default_keys(model: HookedModel, plot_type: str) -> list[str]:
    """The hooks a plot reads when ``data_keys`` is empty."""
    middle = model.n_layers // 2
    return {
        "attention": ["blocks.*.attn.hook_pattern"],
        "logit_lens": ["blocks.*.hook_resid_post"],
        "residual_norms": ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"],
        "neuron_activations": [f"blocks.{middle}.mlp.hook_post"],
        "activations": [f"blocks.{middle}.hook_resid_post"],
    }[plot_type]


def resolve_data_keys(model: HookedModel, spec: PlotSpec) -> list[str]:
    """Concrete hook names (forward order) of ``spec.data_keys`` for its plot type."""
    return _resolve(model, spec)[0]


def _resolve(model: HookedModel, spec: PlotSpec) -> tuple[list[str], list[str]]:
    """(hooks, notes on the HF module names mapped to them)."""
    keys = list(spec.data_keys) or default_keys(model, spec.plot_type)
    hooks: list[str] = []
    notes: list[str] = []
    for key in keys:
        try:
            found = model.resolve_hooks([key])
        except UnknownHookError:
            found = _module_hooks(model, spec.plot_type, key, notes)
            hooks += found
            continue
        suited = [h for h in found if _suits(model, spec.plot_type, h)]
        if not suited:
            raise ToolError(
                f"data_keys {key!r}: the {spec.plot_type} plot reads "
                f"{_NEEDS[spec.plot_type]}; {found[0]} is not one"
            )
        hooks += suited  # a glob keeps the hooks this plot can read
    return model.resolve_hooks(hooks), notes


def _suits(model: HookedModel, plot_type: str, hook: str) -> bool:
    kind, width = model.hook_shape(hook)
    if plot_type == "attention":
        return kind == "pattern"
    if plot_type == "logit_lens":
        return hook.endswith(("hook_resid_pre", "hook_resid_post"))
    if plot_type == "residual_norms":
        return kind == "dense" and width == model.d_model
    return kind == "dense"


# ---------------------------------------------------------------------- HF module names


def _module_hooks(model: HookedModel, plot_type: str, key: str, notes: list[str]) -> list[str]:
    """The hooks behind an HF module name or glob (see the module docstring's table)."""
    a = model.adapter
    names = [name for name, _ in model.model.named_modules() if name]
    base = a.layers.rpartition(".")[0]  # "transformer", "model", "gpt_neox"
    patterns = [key, f"{base}.{key}"] if base else [key]
    matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not matched:
        raise _unknown_key(model, key, names)
    hooks: list[str] = []
    for name in matched:
        part, layer = _module_part(model, name)
        where = _describe(part, layer)
        template = MODULE_HOOKS[plot_type].get(part) if part else None
        if template is None:
            example = default_keys(model, plot_type)[0]
            raise ToolError(
                f"data_keys {key!r}: HF module {name} is {where}, where the {plot_type} "
                f"plot reads no hook; name a hook such as {example}"
            )
        hook = template.format(L=layer)
        if hook not in hooks:
            hooks.append(hook)
            note = f"{key} → {hook} (HF module {name}: {where})"
            if note not in notes:
                notes.append(note)
                log.info("data_keys %s", note)
    return hooks


def _module_part(model: HookedModel, name: str) -> tuple[str | None, int | None]:
    """(part, block) of a module: attn/mlp/block with its block, embed, final_norm,
    unembed; (None, None) for a module outside all of these (the base model)."""
    a = model.adapter

    def inside(path: str, prefix: str | None) -> bool:
        return prefix is not None and (path == prefix or path.startswith(prefix + "."))

    if inside(name, a.embed) or inside(name, a.pos_embed):
        return "embed", None
    if inside(name, a.final_norm):
        return "final_norm", None
    if inside(name, a.lm_head):
        return "unembed", None
    match = re.fullmatch(re.escape(a.layers) + r"\.(\d+)(?:\.(.+))?", name)
    if match is None:
        return None, None
    layer, rest = int(match.group(1)), match.group(2) or ""
    if inside(rest, a.attn):
        return "attn", layer
    if inside(rest, a.mlp):
        return "mlp", layer
    return "block", layer  # the block itself or its norms


def _describe(part: str | None, layer: int | None) -> str:
    return {
        "attn": f"inside block {layer}'s attention",
        "mlp": f"inside block {layer}'s mlp",
        "block": f"block {layer} (or one of its norms)",
        "embed": "an embedding",
        "final_norm": "the final norm",
        "unembed": "the unembedding",
        None: "outside every block, embedding and norm",
    }[part]


def _unknown_key(model: HookedModel, key: str, names: list[str]) -> ToolError:
    """One line: a layer out of range, else the closest hook and module names."""
    last = model.adapter.layers.rpartition(".")[2]  # "h", "layers"
    match = re.search(rf"(?:^|\.)(?:blocks|{re.escape(last)})\.(\d+)(?:\.|$)", key)
    if match and int(match.group(1)) >= model.n_layers:
        return ToolError(
            f"data_keys {key!r}: the model has {model.n_layers} layers "
            f"(blocks 0..{model.n_layers - 1})"
        )
    base = model.adapter.layers.rpartition(".")[0]
    short = [n.removeprefix(base + ".") for n in names]
    close = difflib.get_close_matches(key, model.hook_names() + short, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ToolError(
        f"data_keys {key!r}: neither a hook nor a module of this {model.arch} model{hint}"
    )


# ---------------------------------------------------------------------- input ids


def first_sequence(model: HookedModel, input_ids: Any) -> tuple[torch.Tensor, int]:
    """The first sequence of ``input_ids`` as a ``[1, pos]`` long tensor, and the batch size.

    ``input_ids``: a tensor, array or list, ``(batch, pos)`` or ``(pos,)``."""
    import torch

    if input_ids is None:
        raise ToolError("plot_results: input_ids is required (a (batch, pos) list or tensor)")
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"input_ids: not a rectangular list of token ids ({exc})") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ToolError(f"input_ids: expected (batch, pos) token ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ToolError(f"input_ids: token ids must be integers, got {ids.dtype}")
    first = ids[:1].long()
    low, high = int(first.min()), int(first.max())
    if low < 0 or high >= model.vocab_size:
        bad = low if low < 0 else high
        raise ToolError(
            f"input_ids: token id {bad} is outside the model's vocabulary "
            f"(0..{model.vocab_size - 1})"
        )
    limit = model.max_positions
    if model.adapter.pos_embed is not None and limit is not None and first.shape[1] > limit:
        raise ToolError(
            f"input_ids: {first.shape[1]} tokens exceed the model's {limit} learned positions"
        )
    return first, int(ids.shape[0])


def token_texts(model: HookedModel, ids: list[int]) -> list[str]:
    """Each token's text (escaped newlines and tabs), or its id without a tokenizer."""
    if model.tokenizer is None:
        return [str(i) for i in ids]
    texts = [model.tokenizer.decode([i]) for i in ids]
    return [t.replace("\n", "\\n").replace("\t", "\\t") for t in texts]


# ---------------------------------------------------------------------- running


def plot_data(model: HookedModel, spec: PlotSpec, input_ids: Any) -> PlotData:
    """Run the model on the first sequence of ``input_ids`` and build the plot's frame."""
    from arrakis_ray.bench import plot_charts  # it imports this module

    hooks, notes = _resolve(model, spec)
    ids, batch = first_sequence(model, input_ids)
    _, cache = model.run_with_cache(ids, hooks=hooks)
    tokens = ids[0].tolist()
    frame = plot_charts.FRAMES[spec.plot_type](model, spec, cache, tokens)
    if batch > 1:
        notes.append(f"first of {batch} sequences")
    title = spec.title or f"{spec.plot_type.replace('_', ' ')}: {_hooks_summary(hooks)}"
    return PlotData(spec, hooks, frame, title, notes)


def _hooks_summary(hooks: list[str]) -> str:
    return ", ".join(hooks) if len(hooks) <= 3 else f"{hooks[0]} … {hooks[-1]} ({len(hooks)} hooks)"


def build_chart(model: HookedModel, spec: PlotSpec, input_ids: Any) -> alt.TopLevelMixin:
    """The Altair chart of ``spec`` on the first sequence of ``input_ids``."""
    from arrakis_ray.bench import plot_charts

    data = plot_data(model, spec, input_ids)
    return plot_charts.chart_of(data)
