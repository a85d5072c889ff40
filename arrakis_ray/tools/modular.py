"""Checks shared by the modular-arithmetic tools (the grokking study).

Those tools read a model trained on ``a + b mod p`` whose token ids ``0..p-1`` are the
numbers and, when it has one more, ``p`` is ``=``. Any other vocabulary (a language
model, another modulus) would give tables that look plausible and mean nothing, so the
tools refuse it in one line before anything runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest


def check_modulus(p: int) -> None:
    """ValueError unless ``p`` is an odd modulus >= 3 (the Fourier basis over 0..p-1 then
    has the constant and (p - 1) / 2 cos/sin pairs, with no lone Nyquist row)."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 3 or p % 2 == 0:
        raise ValueError(f"p must be an odd modulus >= 3, not {p!r}")


def check_vocab(tool: str, manifest: RunManifest, p: int, equals: bool = False) -> None:
    """ToolError unless the model's vocabulary is the numbers 0..p-1, optionally followed
    by ``=`` (id p); with ``equals`` (the tool feeds ``a b =`` itself) the ``=`` must be
    there."""
    allowed = (p + 1,) if equals else (p, p + 1)
    d_vocab = manifest.shape.d_vocab
    if d_vocab not in allowed:
        tokens = f"the numbers 0..{p - 1}" + (f" and '=' (id {p})" if equals else " (and '=')")
        raise ToolError(
            f"{tool}: needs a modular-arithmetic model whose tokens are {tokens}, "
            f"{' or '.join(map(str, allowed))} in all; this model's vocabulary has "
            f"{d_vocab} tokens"
        )


def check_one_layer_without_norms(tool: str, manifest: RunManifest) -> None:
    """ToolError unless the model has one block and no norms: then the MLP neurons at
    ``=`` reach the logits only through W_U W_out, which the measures rely on."""
    shape = manifest.shape
    if shape.n_layers != 1 or shape.norm != "none":
        raise ToolError(
            f"{tool}: needs a one-layer model without norms (the grokking transformer); "
            f"this model has {shape.n_layers} layers and norm {shape.norm!r}"
        )
