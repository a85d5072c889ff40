"""The hook vocabulary: every hook point, the table its values are stored in, its shape.

One word per concept, used the same way everywhere in arrakis-ray:

- **hook**: a concrete hook name of a model, spelt as TransformerLens spells it:
  ``blocks.3.hook_resid_post``, ``blocks.0.attn.hook_q``, ``hook_embed``,
  ``ln_final.hook_normalized``, ``logits``.
- **spec** (``HookSpec``): what all hooks of one family have in common. ``spec.name`` is
  the hook without its ``blocks.{L}.`` prefix (``hook_resid_post``, ``attn.hook_q``);
  a hook outside the blocks is its own name (``hook_embed``).
- **family**: the stored table a hook's values go to, one per spec (``resid_post``):
  ``activations/<family>/`` in a run, view ``act_<family>`` in SQL. Every layer of a
  family shares it; the ``layer`` column tells them apart.
- **kind**: the storage schema of a family (``activation.<kind>``): ``dense`` (one
  vector per token), ``head`` (one vector per head and token) or ``pattern`` (one
  attention weight per head, query and key).
- **layer**: where a hook sits: -1 before the blocks (embeddings), ``L`` in block L,
  ``n_layers`` after the last block (final norm, logits).
- **width**: the length of one stored vector, named by the model dimension it is
  (``d_model``, ``d_mlp``, ``d_head``, ``d_vocab``) or a number (``1`` for a scale).
- **glob**: an fnmatch pattern over hooks (``blocks.*.hook_resid_post``), as a pipeline's
  ``harvest.hooks`` takes them; ``harvest_glob(family)`` gives the one that harvests
  every layer of a family.

``HOOK_SPECS`` is in TransformerLens order (the order the hooks fire in a forward pass):
the hooks before the blocks, one block's hooks, then the hooks after the blocks.
Everything else here, and the hook tables of ``models/`` and ``store/layout.py``, is
derived from it. This module imports nothing heavy (no torch, no pyarrow).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from arrakis_ray.errors import UnknownHookError

Kind = Literal["dense", "head", "pattern"]
Where = Literal["before", "block", "after"]
Requirement = Literal["learned_pos", "sequential_block", "norm_scale", "final_norm"]

KINDS: tuple[Kind, ...] = ("dense", "head", "pattern")
DIMS: tuple[str, ...] = ("d_model", "d_mlp", "d_head", "d_vocab")
"""Model dimensions a spec's width may name."""

REQUIREMENTS: dict[Requirement, str] = {
    "learned_pos": "models with learned position embeddings",
    "sequential_block": "sequential blocks (not parallel attn+mlp ones)",
    "norm_scale": "models whose final norm has an eps attribute (eps, variance_epsilon)",
    "final_norm": "models with a final norm (a custom model may have none)",
}
"""What a model needs to have the hooks of a spec with ``requires`` set, in words."""

BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
"""``blocks.{L}.{name}``: group 1 is the layer, group 2 the spec name."""


@dataclass(frozen=True)
class HookSpec:
    """What every hook of one family has in common (see the module docstring for words)."""

    name: str
    """Hook without ``blocks.{L}.`` (``attn.hook_q``); outside the blocks, the hook."""
    family: str
    """Stored table of its values (``attn_q``)."""
    kind: Kind
    """Storage schema: ``dense``, ``head`` or ``pattern``."""
    where: Where
    """``before`` the blocks (layer -1), in a ``block`` (layer L), ``after`` (n_layers)."""
    width: str | int | None
    """Vector length: a name from ``DIMS`` or a number; None for ``pattern`` (no vector)."""
    writable: bool
    """An intervention may replace the value (a hook function's return is used)."""
    doc: str
    """What the value is, in a few words (with its TransformerLens shape)."""
    heads: Literal["n_heads", "n_kv_heads"] | None = None
    """Per-head hooks: how many heads the value has."""
    requires: Requirement | None = None
    """Present only in models that have this (see ``REQUIREMENTS``); None: always."""

    @property
    def in_block(self) -> bool:
        """True for hooks inside the blocks (``blocks.{L}.{name}``)."""
        return self.where == "block"

    def hook(self, layer: int | None = None) -> str:
        """The hook of this spec at ``layer`` (needed inside the blocks, ignored outside)."""
        if not self.in_block:
            return self.name
        if layer is None or isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{self.family} hooks sit in a block: give a layer, got {layer!r}")
        return f"blocks.{layer}.{self.name}"

    @property
    def glob(self) -> str:
        """The glob that matches this spec's hook in every layer."""
        return f"blocks.*.{self.name}" if self.in_block else self.name

    def layer(self, hook: str, n_layers: int) -> int:
        """Value of the ``layer`` column for ``hook`` (a hook of this spec)."""
        if self.where == "before":
            return -1
        if self.where == "after":
            return n_layers
        match = BLOCK_RE.match(hook)
        assert match, hook  # callers pass hooks that resolved to this spec
        return int(match.group(1))

    def width_in(self, dims: Mapping[str, int]) -> int | None:
        """The width as a number, given the model's ``DIMS`` (``{"d_model": 768, ...}``)."""
        if self.width is None or isinstance(self.width, int):
            return self.width
        return int(dims[self.width])


def _dense(
    name: str,
    family: str,
    where: Where,
    width: str | int,
    doc: str,
    *,
    writable: bool = True,
    requires: Requirement | None = None,
) -> HookSpec:
    return HookSpec(name, family, "dense", where, width, writable, doc, requires=requires)


def _head(name: str, family: str, heads: Literal["n_heads", "n_kv_heads"], doc: str) -> HookSpec:
    return HookSpec(name, family, "head", "block", "d_head", True, doc, heads=heads)


HOOK_SPECS: tuple[HookSpec, ...] = (
    _dense("hook_embed", "embed", "before", "d_model", "token embeddings [batch, pos, d_model]"),
    _dense(
        "hook_pos_embed",
        "pos_embed",
        "before",
        "d_model",
        "learned position embeddings [batch, pos, d_model]",
        requires="learned_pos",
    ),
    _dense(
        "hook_resid_pre",
        "resid_pre",
        "block",
        "d_model",
        "residual stream into block L [batch, pos, d_model]",
    ),
    _head("attn.hook_q", "attn_q", "n_heads", "queries before rotary [batch, pos, head, d_head]"),
    _head("attn.hook_k", "attn_k", "n_kv_heads", "keys before rotary [batch, pos, head, d_head]"),
    _head("attn.hook_v", "attn_v", "n_kv_heads", "values [batch, pos, head, d_head]"),
    HookSpec(
        "attn.hook_pattern",
        "attn_pattern",
        "pattern",
        "block",
        None,
        # returned with the attention output, after it was used
        writable=False,
        doc="attention weights after softmax [batch, head, q_pos, k_pos]",
        heads="n_heads",
    ),
    _head("attn.hook_z", "attn_z", "n_heads", "weighted values [batch, pos, head, d_head]"),
    _dense(
        "hook_attn_out", "attn_out", "block", "d_model", "attention output [batch, pos, d_model]"
    ),
    _dense(
        "hook_resid_mid",
        "resid_mid",
        "block",
        "d_model",
        "residual stream between attn and mlp [batch, pos, d_model]",
        # read as the input of the pre-mlp norm: the residual flows around that module
        writable=False,
        requires="sequential_block",
    ),
    _dense(
        "mlp.hook_pre",
        "mlp_pre",
        "block",
        "d_mlp",
        "mlp pre-activation, the gate of gated mlps [batch, pos, d_mlp]",
    ),
    _dense("mlp.hook_post", "mlp_post", "block", "d_mlp", "mlp activation [batch, pos, d_mlp]"),
    _dense("hook_mlp_out", "mlp_out", "block", "d_model", "mlp output [batch, pos, d_model]"),
    _dense(
        "hook_resid_post",
        "resid_post",
        "block",
        "d_model",
        "residual stream out of block L [batch, pos, d_model]",
    ),
    _dense(
        "ln_final.hook_scale",
        "ln_final_scale",
        "after",
        1,
        "final norm's scale sqrt(var + eps) or sqrt(mean(x^2) + eps) [batch, pos, 1]",
        requires="norm_scale",
    ),
    _dense(
        "ln_final.hook_normalized",
        "ln_final",
        "after",
        "d_model",
        "final norm output, weight (and bias) applied [batch, pos, d_model]",
        requires="final_norm",
    ),
    # not a TransformerLens hook point (TL returns logits), read-only: the forward's result
    _dense("logits", "logits", "after", "d_vocab", "logits [batch, pos, d_vocab]", writable=False),
)

FAMILIES: dict[str, HookSpec] = {spec.family: spec for spec in HOOK_SPECS}
"""Family -> its spec, in TransformerLens order."""
BLOCK_SPECS: dict[str, HookSpec] = {s.name: s for s in HOOK_SPECS if s.in_block}
"""Spec name (the hook after ``blocks.{L}.``) -> spec, for hooks inside the blocks."""
OUTER_SPECS: dict[str, HookSpec] = {s.name: s for s in HOOK_SPECS if not s.in_block}
"""Hook -> spec, for hooks outside the blocks."""
FAMILY_KIND: dict[str, Kind] = {spec.family: spec.kind for spec in HOOK_SPECS}
"""Family -> storage kind."""
DENSE_BLOCK_FAMILIES: tuple[str, ...] = tuple(
    s.family for s in HOOK_SPECS if s.in_block and s.kind == "dense"
)
"""Dense families with one row per (layer, token) inside the blocks: a neuron's home."""

assert len(FAMILIES) == len(HOOK_SPECS), "one family per spec"


def _families() -> str:
    return ", ".join(sorted(FAMILIES))


def find_spec(hook: str) -> HookSpec | None:
    """The spec of a hook, or None if it is no hook of any model."""
    match = BLOCK_RE.match(hook)
    if match:
        return BLOCK_SPECS.get(match.group(2))
    return OUTER_SPECS.get(hook)


def spec_of(hook: str) -> HookSpec:
    """The spec of a hook (``blocks.3.attn.hook_q`` -> the ``attn_q`` spec).

    Raises UnknownHookError for a name that maps to no stored family.
    """
    spec = find_spec(hook)
    if spec is None:
        raise UnknownHookError(f"hook {hook!r} maps to no stored family (families: {_families()})")
    return spec


def family_spec(family: str) -> HookSpec:
    """The spec of a family; UnknownHookError for an unknown one."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise UnknownHookError(
            f"unknown hook family {family!r} (families: {_families()})"
        ) from None


def hook_family(hook: str) -> str:
    """Family of a hook (``blocks.3.attn.hook_q`` -> ``attn_q``)."""
    return spec_of(hook).family


def family_kind(family: str) -> Kind:
    """Storage kind of a family: ``dense``, ``head`` or ``pattern``."""
    return family_spec(family).kind


def hook_layer(hook: str, n_layers: int) -> int:
    """Value of the ``layer`` column for a hook: its block, -1 before block 0, n_layers after."""
    return spec_of(hook).layer(hook, n_layers)


def family_hook(family: str, layer: int | None = None) -> str:
    """The hook of a family at a layer (``mlp_post``, 2 -> ``blocks.2.mlp.hook_post``).

    Outside the blocks the layer is ignored (``ln_final`` -> ``ln_final.hook_normalized``).
    """
    return family_spec(family).hook(layer)


def harvest_glob(family: str) -> str:
    """The hook or glob a pipeline's ``harvest.hooks`` names to store a whole family.

    ``resid_post`` -> ``blocks.*.hook_resid_post``, ``embed`` -> ``hook_embed``,
    ``ln_final`` -> ``ln_final.hook_normalized``.
    """
    return family_spec(family).glob
