"""LiveModel: what a live tool runs, a chain of stage workers seen as one model.

A tool calls ``run`` (a forward with interventions) and ``run_with_grads`` (a forward
and a backward, for gradients at hooks) and reads the model's shape, never knowing
whether the model is one replica on one device or stages on several, in this process
or in Ray actors. The first worker is always in the caller's process (the live actor
holds it), so hook names, shapes and the tokenizer are read locally.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import spec_of
from arrakis_ray.live.stage_worker import StageRequest
from arrakis_ray.models.stage import stage_owns

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.live.stage_worker import Metric, Probe
    from arrakis_ray.models.hooked import Intervention


@dataclass
class LiveRun:
    """One forward (and backward) through every stage."""

    logits: Tensor | None
    """None when run with ``keep_logits=False``."""
    cache: dict[str, Tensor]
    values: Tensor | None = None
    """The metric per row, when one was given."""
    grads: dict[str, Tensor] = field(default_factory=dict)
    """d(sum of the metric) / d(activation), per grad hook."""
    probes: dict[str, Any] = field(default_factory=dict)
    """Hook -> what its probe returned."""


class LiveModel:
    """Stage workers in order (one for a whole replica), as one model."""

    def __init__(self, workers: Sequence[Any]):
        if not workers:
            raise ValueError("a live model needs at least one stage worker")
        self.workers = list(workers)
        meta = self.workers[0].model  # a HookedModel: it knows every hook of the whole
        self.meta = meta
        self.tokenizer = meta.tokenizer
        self.arch = meta.arch
        self.n_layers, self.n_heads, self.n_kv_heads = meta.n_layers, meta.n_heads, meta.n_kv_heads
        self.d_model, self.d_head, self.d_mlp = meta.d_model, meta.d_head, meta.d_mlp
        self.vocab_size = meta.vocab_size
        self.dtype = meta.dtype
        self.max_positions: int | None = meta.max_positions
        """Tokens one sequence may hold (learned or declared positions); None: no limit."""
        self.stages = [(w.stage.start, w.stage.stop) for w in self.workers]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LiveModel({self.arch}, stages={self.stages})"

    # ------------------------------------------------------------------ names

    def resolve_hooks(self, patterns: Sequence[str] | str) -> list[str]:
        """Concrete hook names (forward order) of names or globs."""
        return self.meta.resolve_hooks(patterns)

    def layer_of(self, hook: str) -> int:
        return self.meta.layer_of(hook)

    def hook_shape(self, hook: str) -> tuple[str, int | None]:
        return self.meta.hook_shape(hook)

    def writable(self, patterns: Sequence[str] | str) -> list[str]:
        """Concrete writable hooks of names or globs; a read-only name is an error."""
        names = self.resolve_hooks(patterns)
        if isinstance(patterns, str):
            patterns = [patterns]
        named = [p for p in patterns if p in names and not spec_of(p).writable]
        if named:
            raise ToolError(f"hook {named[0]!r} is read-only: it cannot be intervened on")
        return [n for n in names if n != "logits" and spec_of(n).writable]

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, starting with BOS as every harvested sequence does."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def token_id(self, word: str, where: str = "") -> int:
        """The one token id of ``word`` (with a leading space when that is one token);
        a word the tokenizer only knows as its unknown token is refused."""
        unknown = self.tokenizer.unk_token_id
        for text in (word, " " + word):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and (ids[0] != unknown or word == self.tokenizer.unk_token):
                return int(ids[0])
        raise ToolError(f"{where}{word!r} is not a single token of this model's tokenizer")

    # ------------------------------------------------------------------ running

    def _concrete(self, by_pattern) -> dict:
        """Hook name or glob -> fn, as concrete writable hook -> fn."""
        return {
            name: fn
            for pattern, fn in (by_pattern or {}).items()
            for name in self.writable(pattern)
        }

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        hooks: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
        metric: Metric | None = None,
        keep_logits: bool = True,
        probes: Mapping[str, Probe] | None = None,
    ) -> LiveRun:
        """A forward with ``interventions`` (hook name or glob -> fn), caching ``hooks``.

        ``metric(logits) -> [rows]`` is computed where the logits are, and
        ``keep_logits=False`` leaves them there when its values are all you need.
        ``probes`` (hook or glob -> ``probe(activation, hook)``) run where each hook is,
        on any stage, and what they return comes back in ``LiveRun.probes``: a small
        value instead of a whole cached activation.
        """
        request = StageRequest(
            hooks=self.resolve_hooks(list(hooks)) if hooks else [],
            interventions=self._concrete(interventions),
            probes={n: fn for p, fn in (probes or {}).items() for n in self.resolve_hooks(p)},
            metric=metric,
            keep_logits=keep_logits,
        )
        return self._forward(input_ids, attention_mask, request)

    def run_with_grads(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        grad_hooks: Sequence[str],
        metric: Metric,
        hooks: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
        keep_logits: bool = True,
    ) -> LiveRun:
        """A forward and a backward: the gradient of ``metric`` (summed over rows) with
        respect to each of ``grad_hooks``' activations."""
        grad_hooks = self.writable(list(grad_hooks))
        if not grad_hooks:
            raise ToolError("run_with_grads needs at least one writable hook")
        request = StageRequest(
            hooks=self.resolve_hooks(list(hooks)) if hooks else [],
            interventions=self._concrete(interventions),
            grad_hooks=grad_hooks,
            grad=True,
            metric=metric,
            keep_logits=keep_logits,
        )
        return self._forward(input_ids, attention_mask, request)

    def _owned(self, worker, request: StageRequest) -> StageRequest:
        """The part of ``request`` on the hooks ``worker``'s stage owns: a stage is sent
        only its own interventions (and the clean values they carry)."""
        start, stop = worker.stage.start, worker.stage.stop

        def owns(hook: str) -> bool:
            return stage_owns(start, stop, self.n_layers, self.layer_of(hook))

        return StageRequest(
            hooks=[h for h in request.hooks if h != "logits" and owns(h)],
            interventions={h: f for h, f in request.interventions.items() if owns(h)},
            grad_hooks=[h for h in request.grad_hooks if owns(h)],
            grad=request.grad,
            probes={h: f for h, f in request.probes.items() if owns(h)},
            metric=request.metric if stop == self.n_layers else None,  # the last stage's
            keep_logits=request.keep_logits,
        )

    def _forward(self, input_ids, attention_mask, request: StageRequest) -> LiveRun:
        # one call at a time: a stage keeps a grad forward's graph for the backward that
        # follows, and two interleaved calls would backpropagate through the wrong one
        with self._lock:
            return self._forward_and_back(input_ids, attention_mask, request)

    def _forward_and_back(self, input_ids, attention_mask, request: StageRequest) -> LiveRun:
        cache: dict[str, Tensor] = {}
        probed: dict[str, Any] = {}
        resid = None
        for worker in self.workers:
            out = worker.forward(input_ids, attention_mask, resid, self._owned(worker, request))
            cache.update(out.cache)
            probed.update(out.probed)
            resid = out.resid
        grads = dict(out.grads)
        grad_resid = out.grad_resid
        if request.grad:
            for worker in reversed(self.workers[:-1]):  # the backward, last stage first
                if grad_resid is None:  # no grad hook before here: the backward ends
                    break
                back = worker.backward(grad_resid)
                grads.update(back.grads)
                grad_resid = back.grad_resid
        names = [n for n in request.hooks if n in cache]
        return LiveRun(out.logits, {n: cache[n] for n in names}, out.values, grads, probed)

    def final_logits(self, resid: Tensor) -> Tensor:
        """Logits of a residual stream through the final norm and unembedding."""
        return self.workers[-1].final_logits(resid)


def local_model(
    model_config, stages: Sequence[tuple[int, int]] | None = None, num_gpus: float = 0.0
) -> LiveModel:
    """A LiveModel in this process: one worker per stage, each loading its own blocks
    (on the GPU with ``num_gpus`` > 0 and CUDA present)."""
    from arrakis_ray.live.holder import ModelHolder
    from arrakis_ray.live.stage_worker import StageWorker

    ranges = [tuple(s) for s in stages] if stages else [None]
    return LiveModel(
        [StageWorker(ModelHolder(model_config, r, num_gpus, len(ranges))) for r in ranges]
    )


def live_model_of(hooked) -> LiveModel:
    """A one-stage LiveModel over a HookedModel of this process (the bench's model): the
    live tools run on it as on an actor's model, without Ray."""
    from arrakis_ray.live.holder import ModelHolder
    from arrakis_ray.live.stage_worker import StageWorker

    return LiveModel([StageWorker(ModelHolder.wrapping(hooked))])
