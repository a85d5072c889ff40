"""Hook points: which module a hook name attaches to, and how its value is read/written.

A point reads the TransformerLens-shaped value out of a module's input (forward
pre-hook) or output (forward hook), and for interventions writes a replacement back in
the module's own layout (flattened heads, a slice of a fused projection, ...). Which
hooks exist and what they hold (family, width, whether writable) is ``arrakis_ray.hooks``;
this module says where each one is in a torch model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from arrakis_ray.hooks import BLOCK_RE
from arrakis_ray.models.norms import norm_eps

if TYPE_CHECKING:
    from torch import Tensor, nn

    from arrakis_ray.models.adapters import NormKind
    from arrakis_ray.models.hooked import HookedModel


@dataclass
class Point:
    """One concrete hook point: where it hooks, how to read (and write) its value."""

    module: nn.Module
    pre: bool  # forward pre-hook (reads the module input) or forward hook (reads its output)
    read: Callable[[tuple, dict, Any], Tensor]  # (args, kwargs, output) -> TL-shaped value
    write: Callable[[tuple, dict, Any, Tensor], Any] | None  # -> new output / (args, kwargs)


def _first_input(args: tuple, kwargs: dict, _out: Any = None) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_first_input(args: tuple, kwargs: dict, _out: Any, new: Tensor) -> tuple:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _first_output(_args: tuple, _kwargs: dict, out: Any) -> Tensor:
    # Decoder layers return a tensor in transformers 5, gpt-neo blocks and attention
    # modules a tuple whose first element is the hidden state.
    return out[0] if isinstance(out, tuple) else out


def _replace_first_output(_args: tuple, _kwargs: dict, out: Any, new: Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _flat_output(_args: tuple, _kwargs: dict, _out: Any, new: Tensor) -> Tensor:
    return new.reshape(*new.shape[:-2], -1)


def _flat_input(args: tuple, kwargs: dict, out: Any, new: Tensor) -> tuple:
    return _replace_first_input(args, kwargs, out, new.reshape(*new.shape[:-2], -1))


def _heads(x: Tensor, n_heads: int, d_head: int) -> Tensor:
    return x.reshape(*x.shape[:-1], n_heads, d_head)


def _fused_qkv(hm: HookedModel, which: str) -> tuple[Callable, Callable]:
    """Read/write functions for q, k or v inside a fused projection output."""
    nh, nkv, dh = hm.n_heads, hm.n_kv_heads, hm.d_head
    idx = "qkv".index(which)
    n = nh if which == "q" else nkv
    if hm.adapter.qkv_layout == "per_head":
        # gpt-neox: output viewed as [..., head, 3 * d_head], then chunked q|k|v.
        def view(out: Tensor) -> Tensor:
            return out.view(*out.shape[:-1], nh, 3 * dh)[..., idx * dh : (idx + 1) * dh]
    else:
        # gpt2 / phi3: [q (n_heads) | k (n_kv) | v (n_kv)] along the last dim.
        start = (0, nh * dh, (nh + nkv) * dh)[idx]

        def view(out: Tensor) -> Tensor:
            return _heads(out[..., start : start + n * dh], n, dh)

    def read(_args: tuple, _kwargs: dict, out: Tensor) -> Tensor:
        return view(out).contiguous()

    def write(_args: tuple, _kwargs: dict, out: Tensor, new: Tensor) -> Tensor:
        out = out.clone()
        view(out).copy_(new.reshape(view(out).shape))
        return out

    return read, write


def _norm_scale(module: nn.Module, kind: NormKind) -> tuple[Callable, Callable]:
    """Read/write functions for ``hook_scale`` of a norm, as a forward hook on it.

    The scale ``s`` is ``sqrt(var(x) + eps)`` (LayerNorm) or ``sqrt(mean(x^2) + eps)``
    (RMSNorm) of the norm's input x, in float32 as HF computes it; the output is
    ``gain * f(x) / s + bias``, so a new scale ``s'`` gives ``(out - bias) * s / s' + bias``
    whatever the gain (``weight``, gemma's ``1 + weight``).
    """
    eps = norm_eps(module)
    assert eps is not None  # the hook exists only for norms with an eps
    centred = kind == "layernorm"

    def scale(args: tuple, kwargs: dict) -> Tensor:
        x = _first_input(args, kwargs).float()
        if centred:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    def read(args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        return scale(args, kwargs).to(out.dtype)

    def write(args: tuple, kwargs: dict, out: Tensor, new: Tensor) -> Tensor:
        bias = getattr(module, "bias", None)
        bias = 0.0 if bias is None else bias.float()
        ratio = scale(args, kwargs) / new.float()
        return ((out.float() - bias) * ratio + bias).to(out.dtype)

    return read, write


def build_point(hm: HookedModel, name: str, batch: int) -> Point:
    """The hook point behind one concrete (validated) hook name of ``hm``."""
    a, root = hm.adapter, hm.model
    if name == "hook_embed":
        return Point(root.get_submodule(a.embed), False, _first_output, _replace_first_output)
    if name == "hook_pos_embed":

        def read_pos(_args: tuple, _kwargs: dict, out: Tensor) -> Tensor:
            # position_ids are [1, pos] when no attention mask is given
            return out.expand(batch, -1, -1).contiguous()

        return Point(root.get_submodule(a.pos_embed), False, read_pos, _replace_first_output)
    if name == "ln_final.hook_scale":
        norm = root.get_submodule(a.final_norm)
        return Point(norm, False, *_norm_scale(norm, a.norm))
    if name == "ln_final.hook_normalized":
        return Point(root.get_submodule(a.final_norm), False, _first_output, _replace_first_output)

    match = BLOCK_RE.match(name)
    assert match, name  # names are validated by the caller
    layer, hook = int(match.group(1)), match.group(2)
    block = a.layer_modules(root)[layer]
    sub = block.get_submodule
    if hook == "hook_resid_pre":
        return Point(block, True, _first_input, _replace_first_input)
    if hook == "hook_resid_post":
        return Point(block, False, _first_output, _replace_first_output)
    if hook == "hook_resid_mid":
        # the input of the pre-mlp norm (sequential blocks only), or of the mlp without one
        return Point(sub(a.ln2 or a.mlp), True, _first_input, None)
    if hook in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        which = hook[-1]
        if a.qkv is not None:
            read, write = _fused_qkv(hm, which)
            return Point(sub(a.qkv), False, read, write)
        n = hm.n_heads if which == "q" else hm.n_kv_heads

        def read_heads(_args: tuple, _kwargs: dict, out: Tensor) -> Tensor:
            return _heads(out, n, hm.d_head)

        return Point(sub(getattr(a, which)), False, read_heads, _flat_output)
    if hook == "attn.hook_z":

        def read_z(args: tuple, kwargs: dict, _out: Any) -> Tensor:
            return _heads(_first_input(args, kwargs), hm.n_heads, hm.d_head)

        return Point(sub(a.o_proj), True, read_z, _flat_input)
    if hook == "attn.hook_pattern":
        if a.pattern is not None:  # a custom attention passes its pattern through a module
            return Point(sub(a.pattern), False, _first_output, None)
        return Point(sub(a.attn), False, lambda _a, _k, out: out[1], None)
    if hook == "hook_attn_out":
        return Point(sub(a.attn), False, _first_output, _replace_first_output)
    if hook == "mlp.hook_pre":
        if a.mlp_in_first_half:  # phi3: gate_up_proj output is [gate | up]

            def read_gate(_a: tuple, _k: dict, out: Tensor) -> Tensor:
                return out[..., : hm.d_mlp]

            def write_gate(_a: tuple, _k: dict, out: Tensor, new: Tensor) -> Tensor:
                return torch.cat([new, out[..., hm.d_mlp :]], dim=-1)

            return Point(sub(a.mlp_in), False, read_gate, write_gate)
        return Point(sub(a.mlp_in), False, _first_output, _replace_first_output)
    if hook == "mlp.hook_post":
        return Point(sub(a.mlp_down), True, _first_input, _replace_first_input)
    if hook == "hook_mlp_out":
        return Point(sub(a.mlp), False, _first_output, _replace_first_output)
    raise AssertionError(f"no hook point built for {name}")
