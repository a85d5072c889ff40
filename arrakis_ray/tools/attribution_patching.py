"""Attribution patching (AtP): activation patching's first-order estimate, all at once.

Patching component ``c`` changes the logit difference by about
``(a_clean(c) - a_corrupted(c)) . dLD/da(c)``, the gradient taken on the corrupted run
(Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*"). One clean forward, one
corrupted forward and one backward give that estimate for every component of every
family at once, where exact patching needs a forward per component. The rows have the
columns of ``activation_patching`` (``logit_diff`` is the estimated patched value), so a
SQL join on (item, family, layer, pos, head) compares them.

The estimate is linear: good for heads, whose effects are small and local, and worse
for the residual stream, where one patch changes everything after it (Kramár et al.
report the failure modes; benchmarks/BENCHMARKS.md gives the correlation measured here).
Pairs of the same length run together, one batch row each, up to ``max_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.tools import patching
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa

    from arrakis_ray.live.model import LiveModel


@dataclass(frozen=True)
class AttributionPatchingParams:
    """Parameters of attribution patching."""

    prompts: str | None = None
    """Pairs file (JSONL or Parquet) with columns clean, corrupted, answer, wrong."""
    families: tuple[str, ...] = patching.FAMILIES
    """Components to estimate, as for activation_patching."""
    max_batch: int = 64
    """Pairs per forward and backward (the graph of a batch is held for the backward)."""

    def __post_init__(self) -> None:
        patching.check_families(self.families, "attribution_patching")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")


class AttributionPatching(Tool):
    """The gradient estimate of activation patching for every component of every pair."""

    name = "attribution_patching"
    summary = "AtP: (clean - corrupted activation) . gradient, every component in 1 backward"
    reference = "Nanda 2023 'Attribution patching'; Kramar et al. 2024 'AtP*'"
    Params = AttributionPatchingParams
    scope = "live"
    prompt_columns = patching.PAIR_COLUMNS
    items_per_task = 32

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import torch

        run_id = items.column("run_id")[0].as_py()
        by_length = patching.pairs_by_length(items, model, self.name)
        rows = []
        size = self.params.max_batch
        batches = [
            (n_pos, same[start : start + size])
            for n_pos, same in by_length
            for start in range(0, len(same), size)
        ]
        for n_pos, pairs in batches:
            comps = patching.components(model, self.params.families, n_pos)
            hooks = sorted({c.hook for c in comps})
            metric = patching.logit_diff(
                torch.tensor([p.answer for p in pairs]), torch.tensor([p.wrong for p in pairs])
            )
            clean_ids = torch.tensor([p.clean for p in pairs])
            clean = model.run(clean_ids, hooks=hooks, metric=metric, keep_logits=False)
            corrupted = model.run_with_grads(
                torch.tensor([p.corrupted for p in pairs]),
                None,
                hooks,
                metric,
                hooks=hooks,
                keep_logits=False,
            )
            effects = {
                hook: _attribution(clean.cache[hook], corrupted.cache[hook], corrupted.grads[hook])
                for hook in hooks
            }
            for b, pair in enumerate(pairs):
                clean_ld, corrupted_ld = float(clean.values[b]), float(corrupted.values[b])
                for comp in comps:
                    where = comp.head if comp.head is not None else comp.pos
                    estimate = corrupted_ld + float(effects[comp.hook][b, where])
                    rows.append((pair, comp, estimate, clean_ld, corrupted_ld))
        return patching.table(rows, run_id, self.result_schema())


def _attribution(clean, corrupted, grad):
    """(clean - corrupted) . grad per row and position ``[batch, pos]`` (dense), or per
    row and head, summed over positions ``[batch, head]`` (``attn_z``)."""
    product = (clean.float() - corrupted.float()).to(grad.device) * grad.float()
    if product.dim() == 4:  # [batch, pos, head, d_head]
        return product.sum(dim=(1, 3)).cpu()
    return product.sum(dim=-1).cpu()
