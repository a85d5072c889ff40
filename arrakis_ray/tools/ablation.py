"""Ablation: knock out one head or one neuron at a time and measure what the model loses.

A component is an attention head (``L1H2``: head 2 of ``blocks.1.attn.hook_z``, at
every position) or an MLP neuron (``L0N17``: unit 17 of ``blocks.0.mlp.hook_post``).
Its activation is replaced, at every position, by

- ``zero``: zeros;
- ``mean``: its mean over the whole prompt dataset at the same position (prompts of
  different lengths: over those long enough to reach it), computed once by
  ``prepare`` before the slices fan out;
- ``resample``: its value in another prompt of the dataset, at the same position (a
  source shorter than the prompt gives its last token's value beyond its end). Each
  prompt's source is fixed by ``seed``: a random cyclic order of the whole dataset,
  each prompt taking the next one's activations, so no prompt is its own source.

Each prompt is read as ``prompt + " " + answer`` (BOS first). Per (prompt, component)
the row records the ``loss`` (mean next-token cross-entropy over every token of that
text) and the ``answer_logprob`` (log P(answer | prompt), the sum over the answer's
tokens), each with the unablated value and the change. Rows are per prompt, so
``avg(loss_delta) ... group by component`` in SQL is the dataset's figure.

Batched: every (prompt, component) pair is one row of a forward, up to ``batch_size``
rows at once, each row ablating its own component; rows never interact. Each ablated
hook gets its own intervention carrying only its rows, units and replacement values,
so a stage in another actor receives only what its own hooks need. The loss and the
log-prob are computed where the logits are (``live_metrics.LossAndSpan``): only two
figures per row come back. A prompt longer than the model's positions is refused with
its row (cutting it would cut off the answer).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from arrakis_ray.errors import ToolError
from arrakis_ray.tools import live_metrics
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.store.manifest import RunManifest

COMPONENT_RE = re.compile(r"^L(\d+)([HN])(\d+)$")
ALL_HEADS = "heads"


@dataclass(frozen=True)
class AblationParams:
    """Parameters of the ablation."""

    prompts: str | None = None
    """Prompt file (JSONL or Parquet) with columns prompt and answer (default: the run's
    data file)."""
    components: tuple[str, ...] = (ALL_HEADS,)
    """What to ablate, one at a time: "heads" (every head), L<layer>H<head> (a head) or
    L<layer>N<neuron> (a neuron of mlp.hook_post)."""
    method: Literal["zero", "mean", "resample"] = "zero"
    """Replace by zeros, by the dataset mean (per position), or by another prompt's value."""
    seed: int = 0
    """Seed of the resampling order."""
    batch_size: int = 64
    """Ablated rows per forward (lower it when a forward runs out of memory)."""

    def __post_init__(self) -> None:
        bad = [c for c in self.components if c != ALL_HEADS and not COMPONENT_RE.match(c)]
        if bad or not self.components:
            raise ValueError(
                f"components {bad or '[]'}: give 'heads', L<layer>H<head> or L<layer>N<neuron>"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass(frozen=True)
class Component:
    """One head (unit = head) of ``attn.hook_z`` or one neuron of ``mlp.hook_post``."""

    name: str
    kind: Literal["head", "neuron"]
    layer: int
    unit: int

    @property
    def hook(self) -> str:
        part = "attn.hook_z" if self.kind == "head" else "mlp.hook_post"
        return f"blocks.{self.layer}.{part}"


class Shape(Protocol):
    """What components are checked against: a LiveModel, or a run's ModelShape."""

    n_layers: int
    n_heads: int
    d_mlp: int


def parse_components(specs: tuple[str, ...], model: Shape, tool: str) -> list[Component]:
    """The components named by ``specs`` (deduplicated, in the order given), checked
    against the model's shape."""
    found: dict[str, Component] = {}
    for spec in specs:
        if spec == ALL_HEADS:
            for layer in range(model.n_layers):
                for head in range(model.n_heads):
                    name = f"L{layer}H{head}"
                    found.setdefault(name, Component(name, "head", layer, head))
            continue
        match = COMPONENT_RE.match(spec)
        if match is None:
            raise ToolError(f"{tool}: component {spec!r}: give L<layer>H<head> or L<layer>N<n>")
        layer, letter, unit = int(match.group(1)), match.group(2), int(match.group(3))
        kind, size = ("head", model.n_heads) if letter == "H" else ("neuron", model.d_mlp)
        if layer >= model.n_layers:
            raise ToolError(
                f"{tool}: component {spec}: layer {layer} out of range "
                f"(the model has {model.n_layers} layers)"
            )
        if unit >= size:
            raise ToolError(f"{tool}: component {spec}: {kind} {unit} out of range (0..{size - 1})")
        found.setdefault(spec, Component(spec, kind, layer, unit))
    return list(found.values())


@dataclass
class _Prompts:
    """A slice's prompts, tokenized and padded: the answer spans ``[start, stop)``."""

    items: list[int]
    ids: Tensor
    mask: Tensor
    starts: Tensor
    stops: Tensor
    lengths: list[int]


class Ablation(Tool):
    """Loss and answer log-prob change of ablating each component, per prompt."""

    name = "ablation"
    summary = "zero, mean or resample ablation per head/neuron: change in loss and answer log-prob"
    reference = "Olsson et al. 2022; Wang et al. 2022 (IOI, mean ablation); Chan et al. 2022"
    Params = AblationParams
    scope = "live"
    prompt_columns = ("prompt", "answer")
    items_per_task = 16

    def check(self, manifest: RunManifest) -> None:
        parse_components(self.params.components, manifest.shape, self.name)

    # ---------------------------------------------------------------- the dataset pass

    def prepare(self, items: pa.Table, model: LiveModel) -> dict | None:
        """What the method needs of the whole dataset: the per-position means of each
        ablated hook (``mean``), each prompt's resampling source (``resample``)."""
        method = self.params.method
        if method == "zero":
            return None
        prompts = self._tokenize(items, model)
        if method == "resample":
            if len(prompts.items) < 2:
                raise ToolError(f"{self.name}: resample ablation needs at least 2 prompts")
            return {"sources": _resample_sources(prompts, self.params.seed)}
        hooks = sorted({c.hook for c in parse_components(self.params.components, model, self.name)})
        return {"means": self._position_means(prompts, model, hooks)}

    def _position_means(self, prompts: _Prompts, model: LiveModel, hooks: list[str]) -> dict:
        """hook -> ``[pos, *unit dims]`` float32: the mean over prompts at each position."""
        sums: dict[str, Tensor] = {}
        counts = prompts.mask.sum(0).float()  # prompts reaching each position
        for lo in range(0, len(prompts.items), self.params.batch_size):
            rows = slice(lo, lo + self.params.batch_size)
            # each stage sums its own hooks over the batch: [pos, ...] comes back, not
            # [batch, pos, ...]
            probe = MaskedSum(prompts.mask[rows])
            run = model.run(
                prompts.ids[rows],
                prompts.mask[rows],
                probes=dict.fromkeys(hooks, probe),
                keep_logits=False,
            )
            for hook in hooks:
                part = run.probes[hook].cpu()
                sums[hook] = part if hook not in sums else sums[hook] + part
        return {
            hook: total / counts.reshape(-1, *[1] * (total.ndim - 1))
            for hook, total in sums.items()
        }

    # ---------------------------------------------------------------- one slice

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import torch

        comps = parse_components(self.params.components, model, self.name)
        if prepared is None and self.params.method != "zero":
            prepared = self.prepare(items, model)  # alone: the slice is the dataset
        prompts = self._tokenize(items, model)
        size, n = self.params.batch_size, len(prompts.items)
        base = torch.cat(
            [self._scores(model, prompts, rows) for rows in torch.arange(n).split(size)]
        )
        source = self._source(prompts, comps, model, prepared)

        pairs = [(i, c) for c in range(len(comps)) for i in range(n)]
        ablated = []
        for lo in range(0, len(pairs), size):
            chunk = pairs[lo : lo + size]
            rows = torch.tensor([i for i, _ in chunk])
            ablated.append(self._scores(model, prompts, rows, _ablations(chunk, comps, source)))
        scores = torch.cat(ablated)
        measured = {
            "loss": (scores[:, 0], base[:, 0]),
            "answer_logprob": (scores[:, 1], base[:, 1]),
        }
        return self._table(items, prompts, comps, pairs, measured)

    def _scores(self, model: LiveModel, prompts: _Prompts, rows: Tensor, interventions=None):
        """``[len(rows), 2]`` on the CPU: (loss, answer log-prob) of one forward over
        the slice's prompts ``rows`` (row r of the forward is prompt ``rows[r]``)."""
        ids, mask = prompts.ids[rows], prompts.mask[rows]
        metric = live_metrics.LossAndSpan(ids, mask, prompts.starts[rows], prompts.stops[rows])
        run = model.run(ids, mask, interventions=interventions, metric=metric, keep_logits=False)
        return run.values.float().cpu()

    def _tokenize(self, items: pa.Table, model: LiveModel) -> _Prompts:
        import torch

        limit = model.max_positions
        seqs, starts, item_ids = [], [], []
        for row in items.select(["item", "prompt", "answer"]).to_pylist():
            where = f"{self.name}: prompts row {row['item'] + 1}: "
            ids, start = live_metrics.encode_with_answer(model, row["prompt"], row["answer"], where)
            live_metrics.refuse_longer(ids, limit, where)
            seqs.append(ids)
            starts.append(start)
            item_ids.append(int(row["item"]))
        ids, mask = live_metrics.pad_right(seqs, model.tokenizer.pad_token_id)
        lengths = [len(s) for s in seqs]
        return _Prompts(item_ids, ids, mask, torch.tensor(starts), torch.tensor(lengths), lengths)

    def _source(self, prompts: _Prompts, comps: list[Component], model, prepared) -> dict:
        """hook -> what replaces its components: ``("zero", None)``, ``("mean",
        [pos, *unit dims])`` or ``("resample", [prompt, pos, *unit dims])``, aligned to
        the slice's padded positions."""
        import torch

        hooks = sorted({c.hook for c in comps})
        n_pos = prompts.ids.shape[1]
        method = self.params.method
        if method == "zero":
            return {hook: ("zero", None) for hook in hooks}
        if method == "mean":
            means = prepared["means"]
            missing = [h for h in hooks if h not in means]
            if missing:
                raise ToolError(f"{self.name}: no dataset mean prepared for {missing[0]}")
            out = {}
            for hook in hooks:
                pos = torch.arange(n_pos).clamp(max=means[hook].shape[0] - 1)
                out[hook] = ("mean", means[hook][pos])
            return out
        unknown = [item for item in prompts.items if item not in prepared["sources"]]
        if unknown:
            raise ToolError(f"{self.name}: prompt row {unknown[0] + 1} has no prepared source")
        sources = [prepared["sources"][item] for item in prompts.items]
        ids, mask = live_metrics.pad_right(sources, model.tokenizer.pad_token_id)
        # each position reads the source's value there, or its last token's beyond its end
        last = torch.tensor([len(s) - 1 for s in sources])[:, None]
        pos = torch.minimum(torch.arange(n_pos)[None, :], last)
        parts: dict[str, list[Tensor]] = {hook: [] for hook in hooks}
        for rows in torch.arange(len(sources)).split(self.params.batch_size):
            run = model.run(ids[rows], mask[rows], hooks=hooks, keep_logits=False)
            for hook in hooks:
                parts[hook].append(
                    run.cache[hook].cpu()[torch.arange(len(rows))[:, None], pos[rows]]
                )
        return {hook: ("resample", torch.cat(parts[hook])) for hook in hooks}

    def _table(self, items, prompts, comps, pairs, measured: dict) -> pa.Table:
        """One row per (prompt, component); ``measured``: name -> (ablated, base)."""
        import pyarrow as pa

        run_id = items.column("run_id")[0].as_py()
        comp = [comps[c] for _, c in pairs]
        columns = {
            "run_id": [run_id] * len(pairs),
            "item": [prompts.items[i] for i, _ in pairs],
            "component": [c.name for c in comp],
            "kind": [c.kind for c in comp],
            "layer": [c.layer for c in comp],
            "head": [c.unit if c.kind == "head" else None for c in comp],
            "neuron": [c.unit if c.kind == "neuron" else None for c in comp],
            "method": [self.params.method] * len(pairs),
        }
        for name, (ablated, base) in measured.items():
            ablated, base = ablated.double(), base.double()[[i for i, _ in pairs]]
            columns[name] = ablated.tolist()
            columns[f"base_{name}"] = base.tolist()
            columns[f"{name}_delta"] = (ablated - base).tolist()
        return pa.table(columns, schema=self.result_schema())


class MaskedSum:
    """A probe: an activation summed over a batch's rows at each position, padding left
    out (``[pos, *unit dims]`` float32)."""

    def __init__(self, mask: Tensor):
        self.mask = mask

    def __call__(self, value: Tensor, _hook: str) -> Tensor:
        import torch

        shape = (*value.shape[:2], *[1] * (value.ndim - 2))
        mask = self.mask.to(value.device, torch.float32).reshape(shape)
        return (value.float() * mask).sum(0)


class Ablate:
    """One hook's ablation: row ``rows[i]`` of the forward gets unit ``units[i]``
    replaced at every position by ``new[i]`` (``[pos, *unit dims]``), or by zeros when
    ``new`` is None. It carries only this hook's rows and values: a stage in another
    actor receives only what its own hooks need."""

    def __init__(self, rows: Tensor, units: Tensor, new: Tensor | None):
        self.rows, self.units, self.new = rows, units, new

    def __call__(self, value: Tensor, _hook: str) -> Tensor:
        rows, units = self.rows.to(value.device), self.units.to(value.device)
        value = value.clone()
        value[rows, :, units] = 0 if self.new is None else self.new.to(value.device, value.dtype)
        return value


def _ablations(chunk: list[tuple[int, int]], comps: list[Component], source: dict) -> dict:
    """One ``Ablate`` per hook of one forward: row r ablates ``comps[chunk[r][1]]`` of
    prompt ``chunk[r][0]`` (its row in the slice, for a resampled source)."""
    import torch

    by_hook: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for row, (prompt, c) in enumerate(chunk):
        by_hook[comps[c].hook].append((row, comps[c].unit, prompt))
    fns = {}
    for hook, entries in by_hook.items():
        rows, units, prompts = (torch.tensor(column) for column in zip(*entries, strict=True))
        kind, data = source[hook]
        if kind == "zero":
            new = None
        elif kind == "mean":  # [pos, unit, ...] -> [row, pos, ...]
            new = data[:, units].movedim(1, 0).contiguous()
        else:  # [prompt, pos, unit, ...] -> [row, pos, ...]
            new = data[prompts, :, units]
        fns[hook] = Ablate(rows, units, new)
    return fns


def _resample_sources(prompts: _Prompts, seed: int) -> dict[int, list[int]]:
    """item -> the token ids its activations are resampled from: a seeded random cyclic
    order of every prompt, each taking the next one's (never itself)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(prompts.items))
    ids = prompts.ids.tolist()
    sources = {}
    for k, row in enumerate(order):
        src = order[(k + 1) % len(order)]
        sources[prompts.items[row]] = ids[src][: prompts.lengths[src]]
    return sources
