"""Activation patching: patch a clean activation into the corrupted run, one place at a time.

For every pair (``tools/patching.py``) and every component of the families asked for
(a dense family at each (layer, position), or each head of ``attn_z`` at every
position), the corrupted prompt is run with that one activation replaced by its value
in the clean run, and the logit difference is read at the last position. The metric is
its normalised recovery: 0 = as corrupted, 1 = as clean (Meng et al. 2022; Wang et al.
2022; Heimersheim & Nanda 2024 on how to read it).

Batched: the clean and corrupted runs of a slice's pairs of one length are cached in
one forward; then corrupted prompts fill each forward, every row patched at its own
(pair, component), up to ``max_batch`` rows. Rows never interact, so each row equals
its own forward (the tests check this against one forward per intervention, which
``batched: false`` runs, for the benchmark).
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
        by_length = patching.pairs_by_length(items, model, self.name)
        rows = []
        for n_pos, group in by_length:  # pairs of one length share forwards
            comps = patching.components(model, self.params.families, n_pos)
            hooks = sorted({c.hook for c in comps})
            n = len(group)
            ids = torch.tensor([p.clean for p in group] + [p.corrupted for p in group])
            base = model.run(ids, hooks=hooks, metric=_metric(group + group), keep_logits=False)
            clean_lds, corrupted_lds = base.values[:n].tolist(), base.values[n:].tolist()
            clean = {hook: base.cache[hook][:n] for hook in hooks}  # [pair, pos, ...]
            jobs = [(i, comp) for i in range(n) for comp in comps]
            size = self.params.max_batch if self.params.batched else 1
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                patched = patch_run(model, group, chunk, clean)
                rows += [
                    (group[i], comp, ld, clean_lds[i], corrupted_lds[i])
                    for (i, comp), ld in zip(chunk, patched, strict=True)
                ]
        return patching.table(rows, run_id, self.result_schema())


def patch_run(model: LiveModel, group: list, chunk: list, clean: dict) -> list[float]:
    """One forward of corrupted prompts, row r being ``chunk[r] = (pair index,
    component)``: that pair's corrupted prompt with that one component's clean value
    patched in. Returns each row's logit difference."""
    import torch

    by_hook: dict[str, list[tuple[int, int, patching.Component]]] = defaultdict(list)
    for row, (i, comp) in enumerate(chunk):
        by_hook[comp.hook].append((row, i, comp))
    interventions = {hook: _Patch(targets, clean[hook]) for hook, targets in by_hook.items()}
    ids = torch.tensor([group[i].corrupted for i, _ in chunk])
    metric = _metric([group[i] for i, _ in chunk])
    out = model.run(ids, interventions=interventions, metric=metric, keep_logits=False)
    return out.values.tolist()


class _Patch:
    """An intervention writing clean values into target rows: at one position (dense
    hooks, ``clean [pair, pos, d]``) or one head at every position (``attn_z``,
    ``clean [pair, pos, head, d_head]``). It carries only its targets' clean values, so
    a remote stage receives what it patches and nothing more."""

    def __init__(self, targets: list, clean):
        import torch

        self.rows = torch.tensor([row for row, _, _ in targets])
        pairs = torch.tensor([i for _, i, _ in targets])
        self.heads = targets[0][2].head is not None
        if self.heads:
            self.index = torch.tensor([comp.head for _, _, comp in targets])
            self.values = clean[pairs, :, self.index]  # [target, pos, d_head]
        else:
            self.index = torch.tensor([comp.pos for _, _, comp in targets])
            self.values = clean[pairs, self.index]  # [target, d]

    def __call__(self, act, _name):
        act = act.clone()
        rows, index = self.rows.to(act.device), self.index.to(act.device)
        values = self.values.to(act.device, act.dtype)
        if self.heads:
            act[rows, :, index] = values
        else:
            act[rows, index] = values
        return act


def _metric(pairs: list):
    """The logit difference of each row, row r asking ``pairs[r]``'s question."""
    import torch

    if not pairs:
        raise ToolError("activation_patching: an empty batch")
    answer = torch.tensor([p.answer for p in pairs])
    return patching.logit_diff(answer, torch.tensor([p.wrong for p in pairs]))
