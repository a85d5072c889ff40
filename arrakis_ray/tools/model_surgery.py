"""Model surgery: run the blocks in another order (delete, repeat, permute, replace) for one run.

A plan is a named list of block indices, the order the residual stream goes through
them: ``[0, 2, 3]`` deletes block 1 of a 4-block model, ``[0, 1, 2, 2, 3]`` runs block
2 twice, ``[0, 2, 1, 3]`` swaps 1 and 2, ``[0, 1, 2, 2]`` replaces block 3 by block 2.
The embeddings go in first and the final norm and unembedding read what comes out,
as in the real model.

It is a forward plan, not an edit of the module list: the weights and the model are
never touched, and it runs through ``LiveModel`` only, so identically on a model split
over stages. A plan is cut into runs of strictly increasing blocks (``[0, 1, 2, 2, 3]``
-> ``[0, 1, 2]``, ``[2, 3]``), and each run is one ordinary forward in which

- every block outside the run is skipped: its ``hook_resid_post`` is set to its own
  ``hook_resid_pre`` (captured in the same forward), so it passes the stream on as is;
- the residual the previous run ended with is set as the run's first block's
  ``hook_resid_pre`` (the first run starts from the embeddings);
- the run's last block's ``hook_resid_post`` is read off, or, for the last run, the
  logits. Positions and the attention mask are the real forward's.

Cost: one full forward per run: a deletion or the identity plan is one, a repeat or a
swap two. A plan equal to ``range(n_layers)`` is a plain forward, bit for bit.

Per (prompt, plan) the row records the loss (mean next-token cross-entropy over the
``text``), the unmodified model's loss, and agreement with it over the same positions:
top-1 agreement and KL(base || plan). They are computed where the logits are
(``live_metrics.Agreement``): the unmodified forward's next-token log-probs go to the
plan's last forward, and only four figures per text come back.

Texts longer than the model's positions are refused, naming the row, unless
``max_tokens`` cuts them (the run's own data file holds whole documents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError
from arrakis_ray.tools import live_metrics
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.live.model import LiveModel, LiveRun
    from arrakis_ray.live.stage_worker import Metric
    from arrakis_ray.store.manifest import RunManifest


@dataclass(frozen=True)
class ModelSurgeryParams:
    """Parameters of model surgery."""

    prompts: str | None = None
    """Text file (JSONL or Parquet) with a column text (default: the run's data file)."""
    plans: dict[str, list[int]] = field(default_factory=dict)
    """Named block orders, e.g. {skip_1: [0, 2, 3], repeat_2: [0, 1, 2, 2, 3]}; empty:
    every single-block deletion (skip_0, skip_1, ...)."""
    batch_size: int = 32
    """Texts per forward. Each holds the unmodified model's next-token log-probs,
    batch_size x tokens x vocab float32: lower it for long texts or a large vocabulary."""
    max_tokens: int | None = None
    """Cut each text to this many tokens (BOS included); null: no cut, and a text longer
    than the model's positions is refused."""

    def __post_init__(self) -> None:
        for name, layers in self.plans.items():
            if not isinstance(layers, list | tuple) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in layers
            ):
                raise ValueError(f"plans.{name}: give a list of block indices, got {layers!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(
                f"max_tokens must be at least 2 (BOS and a token), got {self.max_tokens}"
            )


def increasing_runs(plan: list[int]) -> list[list[int]]:
    """``plan`` cut into maximal runs of strictly increasing blocks (one run if empty)."""
    runs: list[list[int]] = [[]]
    for layer in plan:
        if runs[-1] and layer <= runs[-1][-1]:
            runs.append([])
        runs[-1].append(layer)
    return runs


def run_plan(
    model: LiveModel, ids: Tensor, mask: Tensor, plan: list[int], metric: Metric | None = None
) -> LiveRun:
    """The last forward of the model with its blocks applied in the order ``plan``: its
    logits, or with ``metric`` only the metric's values (the logits stay where they are)."""
    runs = increasing_runs(plan)
    resid = None
    for k, run in enumerate(runs):
        last = k == len(runs) - 1
        fns = _skipping([layer for layer in range(model.n_layers) if layer not in run])
        if resid is not None:
            fns[f"blocks.{run[0]}.hook_resid_pre"] = _setting(resid)
        if last:
            return model.run(
                ids, mask, interventions=fns, metric=metric, keep_logits=metric is None
            )
        hook = f"blocks.{run[-1]}.hook_resid_post"
        resid = model.run(ids, mask, hooks=[hook], interventions=fns, keep_logits=False).cache[hook]
    raise AssertionError("increasing_runs returns at least one run")


def _setting(value: Tensor):
    def replace(old: Tensor, _name: str) -> Tensor:
        return value.to(old.device, old.dtype)

    return replace


def _skipping(layers: list[int]) -> dict:
    """Interventions making each block of ``layers`` hand its input on unchanged."""
    seen: dict[int, Tensor] = {}  # block -> its input in this forward

    def remember(value: Tensor, name: str) -> None:
        seen[int(name.split(".")[1])] = value

    def pass_on(_value: Tensor, name: str) -> Tensor:
        return seen[int(name.split(".")[1])]

    fns = {}
    for layer in layers:
        fns[f"blocks.{layer}.hook_resid_pre"] = remember
        fns[f"blocks.{layer}.hook_resid_post"] = pass_on
    return fns


class ModelSurgery(Tool):
    """Loss, top-1 agreement and KL of the model with its blocks reordered, per plan."""

    name = "model_surgery"
    summary = "delete, repeat, permute or replace blocks for one run: loss, top-1 agreement, KL"
    reference = "Veit et al. 2016; Lad et al. 2024 (the remarkable robustness of LLMs)"
    Params = ModelSurgeryParams
    scope = "live"
    prompt_columns = ("text",)
    items_per_task = 32

    def check(self, manifest: RunManifest) -> None:
        self.plans(manifest.shape.n_layers)

    def plans(self, n: int) -> dict[str, list[int]]:
        """The plans to run, checked against the model's ``n`` blocks."""
        plans = dict(self.params.plans) or {
            f"skip_{i}": [j for j in range(n) if j != i] for i in range(n)
        }
        for name, layers in plans.items():
            bad = [layer for layer in layers if not 0 <= layer < n]
            if bad:
                raise ToolError(
                    f"{self.name}: plan {name}: blocks {bad} out of range (the model has {n})"
                )
        return {name: list(layers) for name, layers in plans.items()}

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import pyarrow as pa
        import torch

        plans = self.plans(model.n_layers)
        limit = model.max_positions
        self._check_cut(limit)
        rows = items.select(["item", "text"]).to_pylist()
        columns: dict[str, list] = {name: [] for name in self.result_schema().names}
        run_id = items.column("run_id")[0].as_py()
        for lo in range(0, len(rows), self.params.batch_size):
            batch = rows[lo : lo + self.params.batch_size]
            seqs = [self._encode(model, row, limit) for row in batch]
            ids, mask = live_metrics.pad_right(seqs, model.tokenizer.pad_token_id)
            base = live_metrics.NextTokenLogprobs()
            base_logprobs = model.run(ids, mask, metric=base, keep_logits=False).values
            agreement = live_metrics.Agreement(base_logprobs, ids, mask)
            for name, plan in plans.items():
                figures = run_plan(model, ids, mask, plan, agreement).values.cpu()
                loss, base_loss, top1, kl = figures.unbind(-1)
                n = len(batch)
                columns["run_id"] += [run_id] * n
                columns["item"] += [row["item"] for row in batch]
                columns["plan"] += [name] * n
                columns["layers"] += [",".join(map(str, plan))] * n
                columns["loss"] += loss.tolist()
                columns["base_loss"] += base_loss.tolist()
                columns["loss_delta"] += (loss.double() - base_loss.double()).tolist()
                columns["top1_agreement"] += top1.tolist()
                columns["kl"] += torch.clamp(kl, min=0).tolist()  # rounding: never below 0
        return pa.table(columns, schema=self.result_schema())

    def _check_cut(self, limit: int | None) -> None:
        cut = self.params.max_tokens
        if cut is not None and limit is not None and cut > limit:
            raise ToolError(f"{self.name}: max_tokens {cut} exceeds the model's {limit} positions")

    def _encode(self, model: LiveModel, row: dict, limit: int | None) -> list[int]:
        """A text's token ids (BOS first), cut to ``max_tokens``; with no cut, a text
        beyond the model's ``limit`` positions is refused with its row."""
        ids = model.encode(row["text"])
        if self.params.max_tokens is not None:
            return ids[: self.params.max_tokens]
        where = f"{self.name}: prompts row {row['item'] + 1}: "
        live_metrics.refuse_longer(ids, limit, where, "; set params.max_tokens to cut texts")
        return ids
