"""HookedModel: an HF causal LM or a custom torch model, with TransformerLens hook points.

Hook points are PyTorch forward hooks / forward pre-hooks on the model's real modules,
located through a per-architecture ``Adapter``. They are registered for one call and
removed in ``finally``; the model's weights are never touched.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from arrakis_ray.errors import UnknownHookError
from arrakis_ray.hooks import HOOK_SPECS, REQUIREMENTS, HookSpec, find_spec
from arrakis_ray.models.adapters import Adapter, get_module, linear_params
from arrakis_ray.models.backends import HFBackend, TorchBackend
from arrakis_ray.models.norms import norm_eps
from arrakis_ray.models.points import Point, build_point

if TYPE_CHECKING:
    from torch import Tensor, nn

    from arrakis_ray.models.custom import TorchModel

log = logging.getLogger(__name__)

Intervention = Callable[["Tensor", str], "Tensor | None"]
"""``fn(activation, hook_name)``: return a tensor (same shape) to replace it, or None."""


class _StopForward(Exception):
    """Raised from a hook once every requested activation is cached (no logits wanted)."""


class HookedModel:
    """An HF ``*ForCausalLM`` or a custom torch model (eval mode) with TransformerLens
    hook names. What differs between the two is the ``backend`` (``models/backends.py``).

    Hook names: ``hook_embed``, ``hook_pos_embed`` (learned positions only),
    ``blocks.{L}.hook_resid_pre|mid|post`` (no ``resid_mid`` in parallel blocks),
    ``blocks.{L}.attn.hook_q|k|v|z|pattern``, ``blocks.{L}.hook_attn_out``,
    ``blocks.{L}.mlp.hook_pre|post``, ``blocks.{L}.hook_mlp_out``,
    ``ln_final.hook_scale`` (final norms with an eps), ``ln_final.hook_normalized``
    and ``logits``. q/k/v are the projections before rotary (and before stablelm's
    optional qk-norm). Each hook's family, width and writability come from
    ``arrakis_ray.hooks``. Not thread-safe: a call may switch the attention
    implementation of the wrapped model for its duration.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter | None = None,
        tokenizer: Any = None,
        backend: HFBackend | TorchBackend | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = backend or HFBackend(model)
        self.adapter = adapter or self.backend.adapter()
        self.arch: str = self.adapter.arch
        self.n_layers: int = len(self.adapter.layer_modules(model))
        self.d_model: int = self.backend.d_model()
        self.n_heads: int = self.backend.n_heads()
        self.n_kv_heads: int = self.backend.n_kv_heads()
        # Read widths off the weights rather than the config: head_dim conventions
        # differ per family (some ignore config.head_dim, some default it).
        w_o, _ = linear_params(self.adapter.sub(model, 0, self.adapter.o_proj))
        self.d_head: int = int(w_o.shape[1]) // self.n_heads
        w_down, _ = linear_params(self.adapter.sub(model, 0, self.adapter.mlp_down))
        self.d_mlp: int = int(w_down.shape[1])
        w_u, _ = linear_params(get_module(model, self.adapter.lm_head))
        self.vocab_size: int = int(w_u.shape[0])
        param = next(model.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        self.parallel_residual: bool = self.backend.parallel(self.adapter)
        self.max_positions: int | None = self.backend.position_limit()
        """The longest sequence the model takes (None: no declared limit)."""
        # what the optional hook specs need (HookSpec.requires) that this model has
        final = self.adapter.final_norm
        has = {
            "learned_pos": self.adapter.pos_embed is not None,
            "sequential_block": not self.parallel_residual,
            "final_norm": final is not None,
            "norm_scale": final is not None and norm_eps(get_module(model, final)) is not None,
        }
        self._has = frozenset(req for req, present in has.items() if present)
        self._dims = {
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_head": self.d_head,
            "d_vocab": self.vocab_size,
        }
        self._names = self._all_hook_names()
        self._order = {name: i for i, name in enumerate(self._names)}

    @classmethod
    def from_torch(cls, built: TorchModel, tokenizer: Any = None) -> HookedModel:
        """Hook a plain torch model (``models/custom.py``) through its own adapter."""
        return cls(built.module, built.adapter, tokenizer, TorchBackend(built))

    @property
    def positional(self) -> str:
        """``learned`` (hook_pos_embed exists), ``rotary`` or ``none``."""
        if self.adapter.pos_embed is not None:
            return "learned"
        if isinstance(self.backend, TorchBackend):
            return self.backend.spec.positional or "none"
        return "rotary"  # every supported HF family without learned positions

    def describe(self) -> dict[str, Any]:
        """What the model is, for its fingerprint: the HF config, or factory and config."""
        return self.backend.describe()

    def __repr__(self) -> str:
        return (
            f"HookedModel(arch={self.arch!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ hook names

    def _present(self, spec: HookSpec) -> bool:
        return spec.requires is None or spec.requires in self._has

    def _all_hook_names(self) -> list[str]:
        specs = [spec for spec in HOOK_SPECS if self._present(spec)]
        names = [spec.hook() for spec in specs if spec.where == "before"]
        for layer in range(self.n_layers):
            names += [spec.hook(layer) for spec in specs if spec.in_block]
        names += [spec.hook() for spec in specs if spec.where == "after"]
        return names

    def hook_names(self) -> list[str]:
        """Every concrete hook point of this model, in forward order."""
        return list(self._names)

    def _unknown(self, what: str) -> UnknownHookError:
        hint = ""
        for spec in HOOK_SPECS:  # a hook other models have, this one lacks
            if not self._present(spec):
                layers = range(self.n_layers) if spec.in_block else [None]
                if fnmatch.filter([spec.hook(layer) for layer in layers], what):
                    hint = f" ({spec.glob} exists only in {REQUIREMENTS[spec.requires]})"
                    break
        close = difflib.get_close_matches(what, self._names, n=3, cutoff=0.6)
        suggestion = f"; did you mean {', '.join(close)}?" if close else ""
        return UnknownHookError(
            f"hook {what!r} matches no hook point of this {self.arch} model "
            f"({self.n_layers} layers){hint}{suggestion}"
        )

    def resolve_hooks(self, patterns: Sequence[str]) -> list[str]:
        """Expand names / fnmatch globs into concrete hook names (deduped, forward order)."""
        if isinstance(patterns, str):
            patterns = [patterns]
        found: set[str] = set()
        for pattern in patterns:
            if pattern in self._order:
                found.add(pattern)
                continue
            matches = fnmatch.filter(self._names, pattern)
            if not matches:
                raise self._unknown(pattern)
            found.update(matches)
        return sorted(found, key=self._order.__getitem__)

    def _spec(self, name: str) -> HookSpec:
        if name not in self._order:
            raise self._unknown(name)
        spec = find_spec(name)
        assert spec is not None, name  # every hook name is built from a spec
        return spec

    def layer_of(self, name: str) -> int:
        """L for ``blocks.L.*``, -1 for the embeddings, n_layers for ln_final/logits."""
        return self._spec(name).layer(name, self.n_layers)

    def hook_shape(self, name: str) -> tuple[str, int | None]:
        """``("dense", width)``, ``("head", d_head)`` or ``("pattern", None)``."""
        spec = self._spec(name)
        return spec.kind, spec.width_in(self._dims)

    def n_heads_of(self, name: str) -> int:
        """Heads in a per-head hook: n_kv_heads for k/v, n_heads for q/z/pattern."""
        spec = self._spec(name)
        if spec.heads is None:
            raise UnknownHookError(f"hook {name!r} is not a per-head hook point")
        return getattr(self, spec.heads)

    # ------------------------------------------------------------------ running

    def _register(
        self,
        name: str,
        point: Point,
        cache: dict[str, Tensor],
        want: set[str],
        fn: Intervention | None,
        stop_when_complete: bool,
    ) -> Any:
        def record(value: Tensor) -> None:
            if name in want:
                cache[name] = value.detach()
                if stop_when_complete and len(cache) == len(want):
                    raise _StopForward

        if point.pre:

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                value = point.read(args, kwargs, None)
                result = None
                if fn is not None and (new := fn(value, name)) is not None:
                    result = point.write(args, kwargs, None, new)  # type: ignore[misc]
                    value = new
                record(value)
                return result

            return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def fwd_hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            value = point.read(args, kwargs, out)
            result = None
            if fn is not None and (new := fn(value, name)) is not None:
                result = point.write(args, kwargs, out, new)  # type: ignore[misc]
                value = new
            record(value)
            return result

        return point.module.register_forward_hook(fwd_hook, with_kwargs=True)

    def run_with_cache(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        hooks: Sequence[str] = (),
        *,
        interventions: Mapping[str, Intervention] | None = None,
        grad: bool = False,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run the model on ``input_ids [batch, pos]`` and cache the requested hooks.

        ``hooks`` are names or globs. Returns ``(logits or None, cache)``: logits only
        when ``"logits"`` is requested (or when nothing is requested: a plain forward);
        otherwise the forward stops as soon as every requested activation is cached.
        Shapes follow TransformerLens: dense ``[batch, pos, d]``, q/k/v/z
        ``[batch, pos, head, d_head]``, pattern ``[batch, head, q_pos, k_pos]``.

        With an ``attention_mask``, position ids count only attended tokens (as HF
        ``generate`` does), so a real token's activations do not depend on padding side.

        ``interventions`` maps hook names/globs to ``fn(activation, name)``; a returned
        tensor replaces the activation downstream (and in the cache). ``hook_pattern``,
        ``hook_resid_mid`` and ``logits`` are read-only (named: an error; globs skip them).

        ``grad=True`` runs with autograd on: the logits (and whatever an intervention
        returns) stay in the graph, for gradients with respect to tensors an
        intervention added (``live/stage_worker.py``). Cached values are detached either
        way. No parameter's ``.grad`` is touched unless the caller backpropagates into it.
        """
        # inference mode by default: no graph, and tensors autograd cannot record later
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            return self._run(input_ids, attention_mask, hooks, interventions, grad)

    def _run(self, input_ids, attention_mask, hooks, interventions, grad: bool):
        names = self.resolve_hooks(hooks)
        want = set(names)
        want_logits = "logits" in want or not names
        want.discard("logits")
        fns: dict[str, Intervention] = {}
        for pattern, fn in (interventions or {}).items():
            if pattern in self._order and not self._spec(pattern).writable:
                raise UnknownHookError(f"hook {pattern!r} is read-only: it cannot be intervened on")
            # a glob skips the read-only points it matches
            for name in self.resolve_hooks([pattern]):
                if self._spec(name).writable:
                    fns[name] = fn
        batch = int(input_ids.shape[0])
        points = {name: build_point(self, name, batch) for name in sorted(want | set(fns))}

        input_ids = input_ids.to(self.device)
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        cache: dict[str, Tensor] = {}
        handles = []
        need_patterns = any(n.endswith("hook_pattern") for n in want)
        restore_attn = self.backend.patterns_on(self.arch) if need_patterns else None
        try:
            for name in sorted(points, key=self._order.__getitem__):
                handles.append(
                    self._register(name, points[name], cache, want, fns.get(name), not want_logits)
                )
            logits = None
            try:
                logits = self.backend.forward(input_ids, attention_mask, position_ids)
                logits = logits if grad else logits.detach()
            except _StopForward:
                pass
            if "logits" in names:
                cache["logits"] = logits
            missing = [n for n in names if n not in cache]
            if missing:  # an adapter pointing at a module the forward never calls
                raise RuntimeError(f"{self.arch} hook points never fired: {missing}")
            # hooks fire in module order (z before pattern): hand back hook_names() order
            return (logits if want_logits else None), {n: cache[n] for n in names}
        finally:
            for handle in handles:
                handle.remove()
            if restore_attn is not None:
                restore_attn()

    # ------------------------------------------------------------------ pieces

    # Cached activations are inference tensors, which autograd refuses to record;
    # with one of those as input these run in inference mode, otherwise they keep grad.

    def ln_final(self, resid: Tensor) -> Tensor:
        """Apply the model's final norm to a residual-stream tensor ``[..., d_model]``
        (the identity for a model without one)."""
        if self.adapter.final_norm is None:
            return resid
        with torch.inference_mode(resid.is_inference()):
            return get_module(self.model, self.adapter.final_norm)(resid)

    def unembed(self, normed: Tensor) -> Tensor:
        """Logits from final-normed residuals: lm_head (with any bias) and softcapping."""
        with torch.inference_mode(normed.is_inference()):
            logits = get_module(self.model, self.adapter.lm_head)(normed)
            cap = self.backend.logit_softcap()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return logits
