"""StageWorker: one pipeline stage (or a whole replica) running forwards and backwards.

A live tool's forward may be split over stages on different devices: each worker runs
its own blocks, applies the interventions on the hooks it owns and hands the residual
stream on. Gradients go the other way: the last worker computes the tool's metric and
its gradient with respect to what was added at the hooks (``grad_hooks``) and to the
residual it received; each earlier worker continues the backward from the gradient of
the residual it handed on. So attribution patching runs on a model split over devices
exactly as on one.

Gradients with respect to an activation are taken through a zero tensor added to it
(``x + 0``, the zero requiring grad): the gradient of the metric with respect to that
zero is the gradient with respect to the activation, for any hook that can be written,
without asking autograd about views the forward never used. No parameter's ``.grad``
is ever written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arrakis_ray.models.stage import chained

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.live.holder import ModelHolder
    from arrakis_ray.models.hooked import Intervention

Metric = Callable[["Tensor"], "Tensor"]
"""``metric(logits [batch, pos, vocab]) -> [batch]``: one value per row (gradients are
taken of their sum; rows are independent, so each row's gradient is its own)."""


Probe = Callable[["Tensor", str], Any]
"""``probe(activation, hook) -> value``: what to send back from a hook (a slice, a
norm, a timestamp), run where the activation is, without changing it."""


@dataclass
class StageRequest:
    """One forward's instructions for one stage: only the hooks that stage owns."""

    hooks: Sequence[str] = ()
    """Hooks to cache (and return, detached)."""
    interventions: Mapping[str, Intervention] = field(default_factory=dict)
    """Hook -> fn replacing its value downstream."""
    grad_hooks: Sequence[str] = ()
    """Hooks (of this stage) whose gradient is wanted."""
    grad: bool = False
    """Keep the graph: some stage has grad hooks. Every stage then runs with autograd,
    so a gradient can flow back through stages that own none of them."""
    probes: Mapping[str, Probe] = field(default_factory=dict)
    """Hook -> probe: its return values come back in ``StageOutput.probed``."""
    metric: Metric | None = None
    """The last stage: ``metric(logits) -> [rows]``."""
    keep_logits: bool = True
    """False: return no logits (with a metric, its values may be all a tool needs:
    [rows, pos, vocab] floats need not leave the device)."""


@dataclass
class StageOutput:
    """What one stage's forward gives back."""

    cache: dict[str, Tensor]
    """The requested hooks this stage owns (detached)."""
    resid: Tensor | None = None
    """The residual stream after this stage's last block (None for the last stage)."""
    logits: Tensor | None = None
    """The last stage's logits (detached), unless the caller asked not to keep them."""
    values: Tensor | None = None
    """With a metric (last stage): its value per row."""
    grads: dict[str, Tensor] = field(default_factory=dict)
    """With a metric: d(sum of values) / d(activation) per grad hook this stage owns."""
    grad_resid: Tensor | None = None
    """With a metric: the gradient with respect to the residual this stage received."""
    probed: dict[str, Any] = field(default_factory=dict)
    """Hook -> what its probe returned."""


class StageWorker:
    """Blocks ``[start, stop)`` of a model, ready for intervened forwards."""

    def __init__(self, holder: ModelHolder):
        self.holder = holder
        self.model = holder.model  # the HookedModel: hook names and shapes of the whole
        self.stage = holder.stage
        self._pending = None  # a grad forward's graph, awaiting backward()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, resid_in, request: StageRequest
    ) -> StageOutput:
        """Run this stage on ``request`` (the parts of a forward this stage owns).

        With grad hooks the graph is kept: the last stage computes the metric and the
        gradients at once; an earlier stage waits for ``backward``.
        """
        import torch

        self._pending = None  # a graph a failed call left is never backpropagated
        fns = dict(request.interventions)
        grad = request.grad
        deltas: dict[str, Tensor] = {}
        probed: dict[str, Any] = {}
        for hook in request.grad_hooks:
            fns[hook] = chained(fns.get(hook), _adding_zero(deltas))
        for hook, probe in request.probes.items():  # after any change: what flows on
            fns[hook] = chained(fns.get(hook), _recording(probe, probed))
        if grad and resid_in is not None:
            resid_in = resid_in.detach().to(self.holder.device).requires_grad_()
        with self.holder.lock:
            cache, resid, logits = self.stage.forward(
                input_ids.to(self.holder.device),
                None if attention_mask is None else attention_mask.to(self.holder.device),
                list(request.hooks),
                resid_in,
                interventions=fns,
                grad=grad,
                logits=request.keep_logits or request.metric is not None,
            )
            out = StageOutput(cache, probed=probed)
            if not self.stage.last:
                out.resid = resid.detach()
                if grad:
                    self._pending = (resid, deltas, resid_in)
                return out
            out.logits = logits.detach() if request.keep_logits else None
            if request.metric is None:
                return out
            with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
                values = request.metric(logits)
                if grad:
                    out.grads, out.grad_resid = _gradients(values.sum(), deltas, resid_in)
            out.values = values.detach()
            return out

    def backward(self, grad_resid_out: Tensor) -> StageOutput:
        """Continue the backward of the last grad forward from the residual's gradient."""
        if self._pending is None:
            where = f"stage {self.stage.start}-{self.stage.stop}"
            raise RuntimeError(f"{where}: backward() without a grad forward before it")
        resid, deltas, resid_in = self._pending
        self._pending = None
        with self.holder.lock:
            grads, grad_resid = _gradients(
                resid, deltas, resid_in, grad_resid_out.to(resid.device, resid.dtype)
            )
        return StageOutput({}, grads=grads, grad_resid=grad_resid)

    def final_logits(self, resid: Tensor) -> Tensor:
        """Logits read off a residual stream through the final norm (the logit lens);
        only the last stage holds the final norm and the unembedding."""
        import torch

        if not self.stage.last:
            raise RuntimeError("only the last stage holds the unembedding")
        with self.holder.lock, torch.inference_mode():
            resid = resid.to(self.holder.device, self.model.dtype)
            return self.model.unembed(self.model.ln_final(resid))


def _recording(probe: Probe, probed: dict) -> Intervention:
    """An intervention that stores ``probe``'s value and changes nothing."""

    def record(value: Tensor, name: str) -> None:
        probed[name] = probe(value, name)

    return record


def _adding_zero(deltas: dict) -> Intervention:
    """An intervention adding a zero that requires grad (remembered in ``deltas``)."""
    import torch

    def add(value: Tensor, name: str) -> Tensor:
        zero = torch.zeros_like(value, requires_grad=True)
        deltas[name] = zero
        return value + zero

    return add


def _gradients(output, deltas: dict, resid_in, grad_output=None):
    """(gradient per delta's hook, gradient of the received residual or None)."""
    import torch

    targets = list(deltas.values()) + ([resid_in] if resid_in is not None else [])
    if not targets:
        return {}, None
    found = torch.autograd.grad(output, targets, grad_outputs=grad_output, allow_unused=True)
    of_deltas = found[: len(deltas)]
    grads = {
        name: (g if g is not None else torch.zeros_like(d)).detach()
        for (name, d), g in zip(deltas.items(), of_deltas, strict=True)
    }
    grad_resid = None
    if resid_in is not None:  # the last target
        g = found[len(deltas)]
        grad_resid = (g if g is not None else torch.zeros_like(resid_in)).detach()
    return grads, grad_resid
