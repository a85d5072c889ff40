"""Pipeline stages of a model: one contiguous range of blocks per stage.

A model too large for one device is split into stages, each holding the blocks
``[start, stop)`` on its own device. The blocks outside the range are replaced by
pass-through modules, so their weights are freed, and the model's own forward still
computes the attention mask, the position ids and the rotary tables. This is cheap, and
no architecture needs stage-specific code. A stage after the first receives the
residual stream from the previous stage and injects it as
``blocks.{start}.hook_resid_pre``. Then it runs its blocks, and the forward stops after
its last block unless it is the final stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel, Intervention


class _PassThrough(nn.Module):
    """Stands in for a block another stage owns: returns the hidden states unchanged."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        # keep plain attributes (attention_type, layer_idx ...) that model forwards read
        for key, value in vars(replaced).items():
            if not key.startswith("_") and isinstance(value, str | int | float | bool | None):
                setattr(self, key, value)

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


def stage_owns(start: int, stop: int, n_layers: int, layer: int) -> bool:
    """True if the stage holding blocks ``[start, stop)`` runs a hook at ``layer`` (-1:
    the embeddings, on the first stage; n_layers: the final norm, on the last)."""
    if layer < 0:
        return start == 0
    if layer >= n_layers:
        return stop == n_layers
    return start <= layer < stop


def even_ranges(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split ``n_layers`` blocks into ``n_stages`` contiguous ranges, sizes differing by <= 1."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for i in range(n_stages):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


class StageModel:
    """Blocks ``[start, stop)`` of a HookedModel: a pipeline stage.

    ``hooked`` is modified in place (its other blocks become pass-throughs), so build a
    stage from a model loaded for it alone.
    """

    def __init__(self, hooked: HookedModel, start: int, stop: int):
        if not 0 <= start < stop <= hooked.n_layers:
            raise ValueError(f"stage [{start}, {stop}) outside 0..{hooked.n_layers}")
        self.hooked = hooked
        self.start, self.stop = start, stop
        self.first = start == 0
        self.last = stop == hooked.n_layers
        layers = hooked.adapter.layer_modules(hooked.model)
        module_list = _parent_list(hooked.model, layers[0])
        for i, layer in enumerate(layers):
            if not start <= i < stop:
                module_list[i] = _PassThrough(layer)

    def owns(self, hook: str, layer_of) -> bool:
        """True if ``hook`` (a concrete name) is captured by this stage."""
        return stage_owns(self.start, self.stop, self.hooked.n_layers, layer_of(hook))

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        hooks: Sequence[str],
        resid_in: Tensor | None,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Capture ``hooks`` (this stage's own) and return (cache, residual for the next stage)."""
        cache, resid_out, _ = self.forward(input_ids, attention_mask, hooks, resid_in)
        return cache, resid_out

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        hooks: Sequence[str],
        resid_in: Tensor | None,
        *,
        interventions: Mapping[str, Intervention] | None = None,
        grad: bool = False,
        logits: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """Run this stage: (cache of ``hooks``, residual for the next stage, logits).

        ``hooks`` and ``interventions`` are concrete hook names this stage owns (the
        caller filters with ``owns``). The last stage returns the logits when asked
        (``logits``; otherwise its forward stops after the last hook it caches, as a
        harvest wants), the others the residual stream after their last block; with
        ``grad`` both stay in the graph.
        """
        handoff = None if self.last else f"blocks.{self.stop - 1}.hook_resid_post"
        wanted = list(hooks) + ([handoff] if handoff and handoff not in hooks else [])
        if self.last and logits and "logits" not in wanted:
            wanted.append("logits")
        fns = dict(interventions or {})
        handed: list[Tensor] = []
        if handoff:
            # the residual handed on is taken live from the forward (in the graph when
            # grad is on), after any intervention on that hook
            fns[handoff] = chained(fns.get(handoff), lambda x, _name: handed.append(x))
        if not self.first:
            if resid_in is None:
                raise ValueError(f"stage starting at block {self.start} needs the residual stream")
            resid = resid_in.to(self.hooked.device, self.hooked.dtype)
            entry = f"blocks.{self.start}.hook_resid_pre"
            fns[entry] = chained(lambda _x, _name: resid, fns.get(entry))
        out, cache = self.hooked.run_with_cache(
            input_ids, attention_mask, wanted, interventions=fns, grad=grad
        )
        for name in (handoff, "logits"):
            if name and name not in hooks:
                cache.pop(name, None)
        return cache, (handed[-1] if handed else None), (out if self.last and logits else None)


def chained(first: Intervention | None, second: Intervention | None) -> Intervention:
    """One intervention doing ``first`` then ``second`` (None: that step keeps the value)."""

    def both(value: Tensor, name: str) -> Tensor | None:
        changed = None
        for fn in (first, second):
            if fn is not None and (new := fn(value, name)) is not None:
                value = changed = new
        return changed

    return both


def _parent_list(root: nn.Module, layer: nn.Module) -> nn.ModuleList:
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and any(m is layer for m in module):
            return module
    raise ValueError("the model's blocks are not held in an nn.ModuleList")


@torch.inference_mode()
def run_stages(
    stages: Sequence[StageModel],
    input_ids: Tensor,
    attention_mask: Tensor | None,
    hooks: Sequence[str],
) -> dict[str, Tensor]:
    """All stages in one process, in order (for tests: equals the whole model's cache)."""
    cache: dict[str, Tensor] = {}
    resid = None
    for stage in stages:
        own = [h for h in hooks if stage.owns(h, stage.hooked.layer_of)]
        part, resid = stage.run(input_ids, attention_mask, own, resid)
        cache.update(part)
    return cache
