"""A model's LayerNorm / RMSNorm modules as ``gain * centre(x) / scale(x) + bias``.

What a norm computes is declared by the model's adapter (``Adapter.norm``): LayerNorm
centres and divides by ``sqrt(var(x) + eps)``, RMSNorm divides by
``sqrt(mean(x^2) + eps)``, and gemma's RMSNorm multiplies by ``1 + weight`` instead of
``weight``. ``read_norm`` is the one place that turns a norm module into that form;
folding a norm into weights (``models/circuits.py``) and freezing the final norm for
direct logit attribution both go through it. The declaration is checked on a probe
input against the module's own forward, so a custom adapter that declares the wrong
kind fails loudly instead of folding the wrong gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from arrakis_ray.errors import ToolError
from arrakis_ray.models.adapters import NormKind, get_module

if TYPE_CHECKING:  # torch is imported where used: tool modules import this one
    import torch
    from torch import Tensor, nn

    from arrakis_ray.models.hooked import HookedModel

PROBE_ROWS = 8  # random inputs the declared kind must reproduce
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


@dataclass(frozen=True)
class Norm:
    """A norm as ``gain * centre(x) / scale(x) + bias`` (float32 tensors).

    LayerNorm: centre subtracts the mean, ``scale = sqrt(var(x) + eps)``. RMSNorm: no
    centring, ``scale = sqrt(mean(x^2) + eps)``; gemma's gain is ``1 + weight``.
    """

    kind: NormKind | Literal["none"]
    """``none``: a model without this norm; it is the identity (gain 1, scale 1)."""
    eps: float
    gain: Tensor
    """``[d_model]``: what multiplies the normalised input (``1 + weight`` for gemma)."""
    bias: Tensor | None

    @property
    def centred(self) -> bool:
        """True when the norm removes the mean over d_model first (LayerNorm)."""
        return self.kind == "layernorm"

    def centre(self, x: Tensor) -> Tensor:
        """``x`` minus its mean over the last axis (LayerNorm), else ``x``."""
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: Tensor) -> Tensor:
        """The denominator for each vector of ``x [..., d]``."""
        if self.kind == "none":
            return x.new_ones(x.shape[:-1])
        c = self.centre(x)
        return (c.pow(2).mean(-1) + self.eps).sqrt()

    def __call__(self, x: Tensor) -> Tensor:
        out = self.gain * self.centre(x) / self.scale(x)[..., None]
        return out if self.bias is None else out + self.bias

    def to(self, device: torch.device | str) -> Norm:
        """The same norm with its tensors on ``device``."""
        bias = None if self.bias is None else self.bias.to(device)
        return Norm(self.kind, self.eps, self.gain.to(device), bias)


def norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a norm module, None if it has none (then it has no hook_scale)."""
    eps = next((getattr(module, a) for a in EPS_ATTRIBUTES if hasattr(module, a)), None)
    return None if isinstance(eps, bool) or not isinstance(eps, float | int) else float(eps)


def read_norm(model: HookedModel, module: nn.Module, where: str) -> Norm:
    """``module`` (one of ``model``'s norms) as its adapter declares it, probe-checked.

    ``where`` names the norm in error messages (``"final norm"``, ``"layer 3 ln1"``).
    Tensors are float32 copies on the model's device.
    """
    import torch

    kind = model.adapter.norm
    if kind is None:
        raise ToolError(f"this {model.arch} model declares no norm kind (adapter.norm)")
    name = f"{where} {type(module).__name__} of this {model.arch} model"
    eps = norm_eps(module)
    if eps is None:
        raise ToolError(f"{name} has no eps attribute ({', '.join(EPS_ATTRIBUTES)})")
    d = model.d_model
    weight = getattr(module, "weight", None)
    gain = torch.ones(d) if weight is None else weight.detach().to("cpu", torch.float32)
    if kind == "rmsnorm_one_plus":
        gain = gain + 1.0
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().to("cpu", torch.float32)
    norm = Norm(kind, float(eps), gain.clone(), bias)
    _check(norm, module, model, name)
    return norm.to(model.device)


def _check(norm: Norm, module: nn.Module, model: HookedModel, name: str) -> None:
    """Raise unless ``norm`` reproduces ``module`` on a random probe input."""
    import torch

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(PROBE_ROWS, model.d_model, generator=generator) * 3.0 + 0.5
    with torch.inference_mode():
        want = module(probe.to(model.device, model.dtype)).float().cpu()
        error = float((norm(probe) - want).abs().max() / want.abs().max().clamp(min=1e-12))
    tolerance = 1e-4 if model.dtype == torch.float32 else 3e-2
    if not error <= tolerance:  # NaN fails too
        raise ToolError(
            f"{name} does not compute what its adapter declares (norm={norm.kind!r}; "
            f"relative error {error:.2g} on a probe input)"
        )


def identity_norm(model: HookedModel) -> Norm:
    """What a model without a norm has in its place: ``x`` itself."""
    import torch

    return Norm("none", 0.0, torch.ones(model.d_model), None).to(model.device)


def final_norm(model: HookedModel) -> Norm:
    """The norm in front of the unembedding (``ln_final``; the identity without one)."""
    if model.adapter.final_norm is None:
        return identity_norm(model)
    return read_norm(model, get_module(model.model, model.adapter.final_norm), "final norm")


def ln1_norm(model: HookedModel, layer: int) -> Norm:
    """The norm in front of ``layer``'s attention (ln1): what the heads read through (the
    identity in a model without norms)."""
    if model.adapter.ln1 is None:
        return identity_norm(model)
    module = model.adapter.sub(model.model, layer, model.adapter.ln1)
    return read_norm(model, module, f"layer {layer} ln1")
