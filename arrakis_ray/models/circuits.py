"""Attention heads' QK and OV circuits in factored form, with ln1 optionally folded in.

In TransformerLens shapes (row vectors, ``x @ W``) a head's circuits are
``W_OV = W_V[h] @ W_O[h]`` and ``W_QK = W_Q[h] @ W_K[h]^T``, both ``d_model x d_model``
of rank ``<= d_head``. They are never materialised: every circuit is ``L @ R`` with
``L [d_model, d_head]`` and ``R [d_head, d_model]``, and with thin QRs ``L = Q1 T1``,
``R^T = Q2 T2`` (``Q`` with orthonormal columns) a Frobenius norm ignores ``Q1``/``Q2``:
``||L M R|| = ||T1 M T2^T||`` for any ``M``, a ``d_head``-sized product. ``HeadFactors``
keeps each layer's weights with those R factors (``T_Q``, ``T_K``, ``T_V``, ``T_O``).

Folding ln1 (``fold_ln``, TransformerLens' ``fold_ln`` + ``center_writing_weights``):
a head reads the residual stream through its layer's ln1, whose gain (read by
``models/norms.py``: ``1 + weight`` for gemma) multiplies the rows of W_Q, W_K, W_V;
for LayerNorm families ln1 also removes the mean over d_model, so readers and W_O
writers are projected onto the zero-mean subspace. The per-token 1/rms factor and the
norm's bias are ignored, as are rotary embeddings, the attention scale and all biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.models.norms import ln1_norm

if TYPE_CHECKING:  # torch is imported where used: tool modules import this one
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel


@dataclass(frozen=True)
class Writer:
    """The writing side of a layer's heads: W_OV = W_V W_O, as W_O and two R factors."""

    W_O: Tensor  # [n_heads, d_head, d_model]
    T_V: Tensor  # [n_heads, r, d_head]
    T_O: Tensor


@dataclass(frozen=True)
class HeadFactors:
    """One layer's heads as factors: the weights plus the R factors of their thin QRs.

    ``T_X[h]`` is upper triangular with ``X[h] = Q T_X[h]`` (``Q`` orthonormal), for
    ``X`` in W_Q, W_K, W_V and W_O^T: it carries every Frobenius norm of products.
    """

    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor  # [n_heads, d_head, d_model]
    T_Q: Tensor  # [n_heads, r, d_head], r = min(d_model, d_head)
    T_K: Tensor
    T_V: Tensor
    T_O: Tensor  # R factor of W_O[h]^T

    @classmethod
    def of(cls, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> HeadFactors:
        """Factor raw per-head weights (TransformerLens shapes)."""
        import torch

        def r(x: Tensor) -> Tensor:
            return torch.linalg.qr(x, mode="r").R

        return cls(W_Q, W_K, W_V, W_O, r(W_Q), r(W_K), r(W_V), r(W_O.transpose(1, 2)))

    def writer(self) -> Writer:
        """What composition needs of this layer as the writing side."""
        return Writer(self.W_O, self.T_V, self.T_O)

    def qk_norm(self) -> Tensor:
        """``[n_heads]``: ``||W_QK||_F`` of every head."""
        return frob(self.T_Q @ self.T_K.transpose(1, 2))

    def ov_norm(self) -> Tensor:
        """``[n_heads]``: ``||W_OV||_F`` of every head."""
        return frob(self.T_V @ self.T_O.transpose(1, 2))


def norm_fold(model: HookedModel, layer: int) -> tuple[Tensor, bool]:
    """``(gain [d_model] float32, centres)`` of ``layer``'s ln1 (see ``models/norms.py``).

    ``ln1(x) = gain * P x / rms(P x) + bias`` where ``P`` removes the mean over d_model
    when ``centres`` (LayerNorm) and is the identity for RMSNorm.
    """
    norm = ln1_norm(model, layer)
    return norm.gain, norm.centred


def layer_factors(model: HookedModel, layer: int, fold_ln: bool) -> HeadFactors:
    """``layer``'s heads as ``HeadFactors``, with ln1 folded in when ``fold_ln``."""
    from arrakis_ray.models.weights import attention_weights

    w = attention_weights(model, layer)
    W_Q, W_K, W_V, W_O = w.W_Q, w.W_K, w.W_V, w.W_O
    if fold_ln:
        gain, centres = norm_fold(model, layer)
        gain = gain.to(W_Q.device)
        W_Q, W_K, W_V = (gain[:, None] * x for x in (W_Q, W_K, W_V))
        if centres:
            # P = I - 11^T/d: readers P @ W (mean over d_model rows), writers W_O @ P
            W_Q, W_K, W_V = (x - x.mean(dim=1, keepdim=True) for x in (W_Q, W_K, W_V))
            W_O = W_O - W_O.mean(dim=2, keepdim=True)
    return HeadFactors.of(W_Q, W_K, W_V, W_O)


def frob(x: Tensor) -> Tensor:
    """Frobenius norm over the last two dims."""
    return x.flatten(-2).norm(dim=-1)
