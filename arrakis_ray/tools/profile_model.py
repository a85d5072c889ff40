"""Profile a model per module: parameters, FLOPs and activation memory per token, and
the measured time of each module in a forward.

Modules, in forward order: ``embed`` (layer -1), ``blocks.L.attn`` and ``blocks.L.mlp``
for each layer L, ``ln_final`` and ``unembed`` (layer n_layers).

- **params**: counted on the model's own modules, found through its adapter. Blocks
  have one structure in every supported architecture, and block 0 is always held by
  the first (local) worker, so each block's counts are block 0's: a stage's other
  blocks are pass-throughs here. ``attn`` is ``ln1`` and the attention; ``mlp`` the rest
  of the block (``ln2`` and the mlp). A tied unembedding counts 0: its weight is the
  embedding's, counted once.
- **flops_per_token**: forward matrix multiplications only, 2 FLOPs per multiply-add
  (norms, activations, softmax and biases are not counted), ``S`` = ``seq_len``::

      attn    = 2 d_model (n_heads + 2 n_kv_heads) d_head     q, k, v projections
              + 2 n_heads d_head d_model                      output projection
              + 4 n_heads d_head S                            scores q.k and the
                                                              weighted sum of values:
                                                              each query against all S
                                                              keys, as the attention
                                                              kernels compute them
      mlp     = 2 d_model d_mlp (2 if gated else 1)           in (and gate) projection
              + 2 d_mlp d_model                               out projection
      unembed = 2 d_model d_vocab
      embed, ln_final = 0                                     lookups and norms

- **activation_bytes_per_token**: the bytes of the hook activations a module produces
  per token (every hook point of the module, at the model's dtype): dense hooks their
  width, q/k/v/z their heads x d_head, the attention pattern n_heads x S.
- **seconds_per_forward**: the median over ``repeats`` forwards of ``batch_size`` x
  ``seq_len`` random tokens (after ``warmup`` forwards) of the time between the hook
  points that bound the module. Probes stamp ``time.perf_counter()`` at those hook
  points (after a CUDA synchronize on a GPU), each in the process of the stage that
  runs the hook, and change nothing: ``embed`` from ``hook_embed`` to
  ``blocks.0.hook_resid_pre`` (position embeddings, masks, rotary tables: the token
  lookup itself precedes every hook point and is not timed), ``blocks.L.attn`` from the
  block's input to ``blocks.L.hook_attn_out``, ``blocks.L.mlp`` from there to
  ``blocks.L.hook_resid_post``, ``ln_final`` from the last block's output to
  ``ln_final.hook_normalized`` and ``unembed`` from there until the logits exist (a
  metric stamps that moment where the logits are). A block's input is the previous
  block's ``hook_resid_post``, or its own ``hook_resid_pre`` when the block starts a
  stage: there the residual arrives from the stage before.

On a model split into stages (in other actors, on other devices), every module is still
timed on its own: both stamps of a module are taken by the one stage that runs it, as
clocks of two processes cannot be compared. What lies between stages is in no module's
time: handing the residual on (and a later stage's own pass over the embeddings and
the blocks it does not hold, before the residual arrives). The modules' times then add
up to about a forward of the whole model in one place.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError
from arrakis_ray.models.adapters import get_module
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import nn

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.models.hooked import HookedModel


@dataclass(frozen=True)
class ProfileParams:
    """Parameters of the model profile."""

    batch_size: int = 8
    """Sequences per timed forward."""
    seq_len: int = 32
    """Tokens per sequence: the timed forward's length, and S in the attention's FLOPs
    and pattern bytes."""
    repeats: int = 10
    """Timed forwards; each module's time is their median."""
    warmup: int = 2
    """Forwards run first and not timed (allocations, kernel selection, caches)."""

    def __post_init__(self) -> None:
        for name, least in (("batch_size", 1), ("seq_len", 1), ("repeats", 1), ("warmup", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")


@dataclass(frozen=True)
class Module:
    """One profiled module."""

    name: str
    kind: str  # embed, attn, mlp, norm, unembed
    layer: int


class ProfileModel(Tool):
    """Per module: parameters, FLOPs and activation bytes per token, time per forward."""

    name = "profile_model"
    summary = "per module: parameters, FLOPs and activation bytes per token, seconds per forward"
    Params = ProfileParams
    scope = "live"

    # no check(manifest): seq_len's limit, the model's positions, is not in the run's
    # ModelShape; compute_live refuses it in the actor, before any forward

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import pyarrow as pa

        p = self.params
        meta = model.meta
        _check_length(meta, p.seq_len, self.name)
        modules = modules_of(model.n_layers)
        params = parameter_counts(meta)
        flops = flops_per_token(model, p.seq_len)
        memory = activation_bytes_per_token(meta, p.seq_len)
        seconds = time_modules(model, p.batch_size, p.seq_len, p.repeats, p.warmup)
        run_id = items["run_id"][0].as_py()
        item = items["item"][0].as_py()
        rows = [
            (
                m.name,
                m.kind,
                m.layer,
                params[m.kind],
                flops[m.kind],
                memory[m.name],
                seconds.get(m.name, 0.0),  # no final norm: no time
            )
            for m in modules
        ]
        device = _device_name(meta)
        columns = list(zip(*rows, strict=True))
        n = len(rows)
        return pa.table(
            {
                "run_id": [run_id] * n,
                "item": [item] * n,
                "module": columns[0],
                "kind": columns[1],
                "layer": columns[2],
                "params": columns[3],
                "flops_per_token": columns[4],
                "activation_bytes_per_token": columns[5],
                "seconds_per_forward": columns[6],
                "batch_size": [p.batch_size] * n,
                "seq_len": [p.seq_len] * n,
                "device": [device] * n,
            },
            schema=self.result_schema(),
        )


def modules_of(n_layers: int) -> list[Module]:
    """The profiled modules in forward order."""
    modules = [Module("embed", "embed", -1)]
    for layer in range(n_layers):
        modules += [
            Module(f"blocks.{layer}.attn", "attn", layer),
            Module(f"blocks.{layer}.mlp", "mlp", layer),
        ]
    return modules + [Module("ln_final", "norm", n_layers), Module("unembed", "unembed", n_layers)]


# ---------------------------------------------------------------------- parameters


def parameter_counts(meta: HookedModel) -> dict[str, int]:
    """Parameters per module kind (a block's attn and mlp: block 0's, the same in every
    block); tied weights are counted once, with the module that comes first."""
    a, root = meta.adapter, meta.model
    seen: set[int] = set()

    def at(base: nn.Module, path: str | None) -> nn.Module | None:
        return None if path is None else get_module(base, path)  # a model without norms

    def count(*modules: nn.Module | None) -> int:
        total = 0
        for module in modules:
            for param in () if module is None else module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
        return total

    embed = count(get_module(root, a.embed), at(root, a.pos_embed))
    block = a.layer_modules(root)[0]
    attn = count(at(block, a.ln1), get_module(block, a.attn))
    mlp = count(block)  # what is left of the block: ln2, the mlp (and any other norm)
    return {
        "embed": embed,
        "attn": attn,
        "mlp": mlp,
        "norm": count(at(root, a.final_norm)),
        "unembed": count(get_module(root, a.lm_head)),
    }


# ---------------------------------------------------------------------- FLOPs


def attention_flops(d_model: int, n_heads: int, n_kv_heads: int, d_head: int, seq_len: int) -> int:
    """Forward FLOPs per token of one attention layer (see the module docstring)."""
    projections = 2 * d_model * (n_heads + 2 * n_kv_heads) * d_head
    output = 2 * n_heads * d_head * d_model
    mixing = 4 * n_heads * d_head * seq_len  # q.k over S keys, then S values weighted
    return projections + output + mixing


def mlp_flops(d_model: int, d_mlp: int, gated: bool) -> int:
    """Forward FLOPs per token of one mlp: in (and gate) projections, out projection."""
    return 2 * d_model * d_mlp * (2 if gated else 1) + 2 * d_mlp * d_model


def flops_per_token(model: LiveModel, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token per module kind."""
    a = model.meta.adapter
    gated = a.mlp_up is not None or a.mlp_in_first_half
    return {
        "embed": 0,
        "attn": attention_flops(
            model.d_model, model.n_heads, model.n_kv_heads, model.d_head, seq_len
        ),
        "mlp": mlp_flops(model.d_model, model.d_mlp, gated),
        "norm": 0,
        "unembed": 2 * model.d_model * model.vocab_size,
    }


# ---------------------------------------------------------------------- memory


def module_of_hook(hook: str, meta: HookedModel) -> str:
    """The profiled module producing a hook's activation."""
    layer = meta.layer_of(hook)
    if layer < 0:
        return "embed"
    if layer >= meta.n_layers:
        return "unembed" if hook == "logits" else "ln_final"
    name = hook.split(".", 2)[2]
    attn = name.startswith("attn.") or name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid")
    return f"blocks.{layer}.{'attn' if attn else 'mlp'}"


def activation_bytes_per_token(meta: HookedModel, seq_len: int) -> dict[str, int]:
    """Bytes of every hook activation per token, summed per module."""
    import torch

    itemsize = torch.empty((), dtype=meta.dtype).element_size()
    totals = {m.name: 0 for m in modules_of(meta.n_layers)}
    for hook in meta.hook_names():
        kind, width = meta.hook_shape(hook)
        if kind == "pattern":  # one weight per head and key
            values = meta.n_heads_of(hook) * seq_len
        elif kind == "head":
            values = meta.n_heads_of(hook) * width
        else:
            values = width
        totals[module_of_hook(hook, meta)] += values * itemsize
    return totals


# ---------------------------------------------------------------------- time


LOGITS_READY = "logits"
"""The stamp taken once the last stage has the logits (by a metric: the ``logits`` hook
is read-only, and a probe runs as an intervention)."""


def intervals(
    stages: list[tuple[int, int]], n_layers: int, final_norm: bool = True
) -> list[tuple[str, str, str]]:
    """(module, stamp where its time starts, stamp where it ends) in forward order; both
    stamps of a module are taken by the stage that runs it. Without a final norm (a
    custom model may have none) its time is nil and the unembedding starts at the last
    block's output."""
    starts = {start for start, _ in stages}
    spans = [("embed", "hook_embed", "blocks.0.hook_resid_pre")]
    for layer in range(n_layers):
        # a stage's first block starts where the residual arrives: its own resid_pre
        begin = (
            f"blocks.{layer}.hook_resid_pre"
            if layer in starts
            else f"blocks.{layer - 1}.hook_resid_post"
        )
        attn_out = f"blocks.{layer}.hook_attn_out"
        spans += [
            (f"blocks.{layer}.attn", begin, attn_out),
            (f"blocks.{layer}.mlp", attn_out, f"blocks.{layer}.hook_resid_post"),
        ]
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    if not final_norm:
        return spans + [("unembed", last, LOGITS_READY)]
    return spans + [
        ("ln_final", last, "ln_final.hook_normalized"),
        ("unembed", "ln_final.hook_normalized", LOGITS_READY),
    ]


def stamp(value, _hook: str) -> float:
    """A probe: the time its hook point is reached, once the kernels before it are done."""
    import torch

    if value.is_cuda:
        torch.cuda.synchronize(value.device)
    return time.perf_counter()


def stamp_logits(logits):
    """A metric: the time the logits exist, once per row (float64 keeps the
    microseconds of perf_counter)."""
    import torch

    return torch.full((logits.shape[0],), stamp(logits, LOGITS_READY), dtype=torch.float64)


def time_modules(
    model: LiveModel, batch_size: int, seq_len: int, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per module over ``repeats`` timed forwards, each measured on the
    stage that runs it."""
    import torch

    spans = intervals(model.stages, model.n_layers, model.meta.adapter.final_norm is not None)
    hooks = {hook for _, *bounds in spans for hook in bounds} - {LOGITS_READY}
    probes = {hook: stamp for hook in hooks}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (batch_size, seq_len), generator=generator)
    samples: dict[str, list[float]] = {module: [] for module, _, _ in spans}
    for i in range(warmup + repeats):
        run = model.run(ids, probes=probes, metric=stamp_logits, keep_logits=False)
        if i < warmup:
            continue
        stamps = {**run.probes, LOGITS_READY: float(run.values[0])}
        for module, begin, end in spans:
            samples[module].append(stamps[end] - stamps[begin])
    return {module: statistics.median(values) for module, values in samples.items()}


def _check_length(meta: HookedModel, seq_len: int, where: str) -> None:
    """Refuse a seq_len beyond the learned position embeddings."""
    if meta.adapter.pos_embed is None:
        return
    positions = get_module(meta.model, meta.adapter.pos_embed).weight.shape[0]
    if seq_len > positions:
        raise ToolError(
            f"tool {where}: seq_len {seq_len} exceeds the model's {positions} learned positions"
        )


def _device_name(meta: HookedModel) -> str:
    import torch

    if meta.device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(meta.device)})"
    return meta.device.type
