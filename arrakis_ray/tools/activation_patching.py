"""Activation patching: patch a clean activation into the corrupted run, one place at a time.

For every pair (``tools/patching.py``) and every component of the families asked for
(a dense family at each (layer, position), or each head of ``attn_z`` at every
position), the corrupted prompt is run with that one activation replaced by its value
in the clean run, and the logit difference is read at the last position. The metric is
its normalised recovery: 0 = as corrupted, 1 = as clean (Meng et al. 2022; Wang et al.
2022; Heimersheim & Nanda 2024 on how to read it).

Batched: the clean run is cached once per pair, then the corrupted prompt is repeated
along the batch, each row patched at its own component, up to ``max_batch`` rows per
forward. Rows never interact, so each row equals its own forward (the tests check this
against one forward per intervention, which ``batched: false`` runs, for the benchmark).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError
from arrakis_ray.tools import patching
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa

    from arrakis_ray.live.model import LiveModel


@dataclass(frozen=True)
class ActivationPatchingParams:
    """Parameters of activation patching."""

    prompts: str | None = None
    """Pairs file (JSONL or Parquet) with columns clean, corrupted, answer, wrong."""
    families: tuple[str, ...] = patching.FAMILIES
    """What to patch: resid_pre, resid_post, attn_out, mlp_out (per layer and position)
    and attn_z (per head, every position)."""
    max_batch: int = 256
    """Patched rows per forward (lower it when a forward runs out of memory)."""
    batched: bool = True
    """false: one forward per intervention (the naive sweep, for comparison)."""

    def __post_init__(self) -> None:
        patching.check_families(self.families, "activation_patching")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")


class ActivationPatching(Tool):
    """Normalised logit-difference recovery of every patched component of every pair."""

    name = "activation_patching"
    summary = "patch each clean activation into the corrupted run: logit-diff recovery"
    reference = "Meng et al. 2022 (ROME); Wang et al. 2022 (IOI); Heimersheim & Nanda 2024"
    Params = ActivationPatchingParams
    scope = "live"
    prompt_columns = patching.PAIR_COLUMNS
    items_per_task = 8

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import torch

        run_id = items.column("run_id")[0].as_py()
        rows = []
        for pair in patching.tokenize_pairs(items, model, self.name):
            comps = patching.components(model, self.params.families, len(pair.clean))
            hooks = sorted({c.hook for c in comps})
            both = torch.tensor([pair.clean, pair.corrupted])
            base = model.run(both, hooks=hooks, metric=_metric(pair, 2), keep_logits=False)
            clean_ld, corrupted_ld = (float(v) for v in base.values)
            clean = {hook: base.cache[hook][0] for hook in hooks}
            size = self.params.max_batch if self.params.batched else 1
            for start in range(0, len(comps), size):
                chunk = comps[start : start + size]
                patched = patch_run(model, pair, chunk, clean)
                rows += [
                    (pair, comp, ld, clean_ld, corrupted_ld)
                    for comp, ld in zip(chunk, patched, strict=True)
                ]
        return patching.table(rows, run_id, self.result_schema())


def patch_run(model: LiveModel, pair: patching.Pair, chunk: list, clean: dict) -> list[float]:
    """One forward of the corrupted prompt, row i patched at ``chunk[i]``; the logit
    difference of each row."""
    import torch

    by_hook: dict[str, list[tuple[int, patching.Component]]] = defaultdict(list)
    for row, comp in enumerate(chunk):
        by_hook[comp.hook].append((row, comp))
    interventions = {hook: _patcher(targets, clean[hook]) for hook, targets in by_hook.items()}
    ids = torch.tensor([pair.corrupted] * len(chunk))
    metric = _metric(pair, len(chunk))
    out = model.run(ids, interventions=interventions, metric=metric, keep_logits=False)
    return [float(v) for v in out.values]


def _patcher(targets: list, clean):
    """An intervention writing the clean value into each target row at its position
    (dense: ``clean [pos, d]``) or head (``attn_z``: ``clean [pos, head, d_head]``)."""
    import torch

    rows = torch.tensor([row for row, _ in targets])
    heads = [comp.head for _, comp in targets]
    if heads[0] is not None:
        index = torch.tensor(heads)

        def patch_heads(act, _name):
            act = act.clone()
            act[rows, :, index] = clean[:, index].transpose(0, 1).to(act.device, act.dtype)
            return act

        return patch_heads
    index = torch.tensor([comp.pos for _, comp in targets])

    def patch_positions(act, _name):
        act = act.clone()
        act[rows, index] = clean[index].to(act.device, act.dtype)
        return act

    return patch_positions


def _metric(pair: patching.Pair, rows: int):
    import torch

    if rows < 1:
        raise ToolError("activation_patching: an empty batch")
    return patching.logit_diff(torch.full((rows,), pair.answer), torch.full((rows,), pair.wrong))
