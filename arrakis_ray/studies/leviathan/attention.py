"""Correlation attention: the Leviathan score, defined precisely and computed batched.

The Leviathan blog post replaces the dot product ``q_i . k_j`` by a cross-correlation of
the two vectors ("dot product is cross correlation with zero lag"). Here, per head
``h`` with head width ``d`` and a window of lags ``l in [-L, L]``:

    corr_l(q_i, k_j) = sum_{c=0}^{d-1} q_i[c] * k_j[c + l]     (k_j[m] = 0 outside 0..d-1)

    score_h(i, j) = (1 / sqrt(d)) * sum_{l=-L}^{L} w_{h,l} * corr_l(q_i, k_j)

The correlation is **zero padded** (a lag slides the key past the ends of the head
dimension; nothing wraps around), ``w`` holds learnable lag weights per head, and the
score is causally masked (``j <= i``; padding keys from ``attention_mask`` are masked
too) and softmaxed over ``j``. With ``L = 0`` and ``w = 1`` it is scaled dot-product
attention exactly.

Batched computation: ``corr_l`` is linear in ``k_j``, so the weighted sum over lags is one
banded Toeplitz matrix per head, ``T_h[m, c] = w_{h, m - c}`` (zero where ``|m - c| > L``):

    mixed_j[c] = sum_l w_{h,l} * k_j[c + l] = sum_m T_h[m, c] * k_j[m]
    score_h(i, j) = q_i . mixed_j / sqrt(d)

i.e. the keys are mixed along the head dimension by ``T_h^T`` and then enter an ordinary
``Q K^T``. This is exact (not an approximation of the sum), runs on any device as two
matmuls, and is differentiable in Q, K and w. It also says what the variant can and
cannot do: ``T_h^T W_K`` is just another linear map, so the family of functions a
correlation-attention model can represent is contained in the dot-product family (the
difference lies in the parametrisation and so in the optimisation, plus ``H (2L + 1)``
parameters per layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from arrakis_ray.models.custom import causal_softmax


def lag_matrix(lag_weights: torch.Tensor, d_head: int) -> torch.Tensor:
    """The banded Toeplitz matrices ``T [H, d, d]``, ``T[h, m, c] = w[h, m - c + L]``.

    ``lag_weights`` is ``[H, 2L + 1]``, column ``L + l`` weighting lag ``l``. Lags with
    ``|l| >= d`` select no pair of positions and so contribute nothing.
    """
    n_heads, width = lag_weights.shape
    max_lag = (width - 1) // 2
    offsets = torch.arange(d_head, device=lag_weights.device)
    lag = offsets[:, None] - offsets[None, :]  # [m, c]: key index minus query index
    inside = lag.abs() <= max_lag
    picked = lag_weights[:, lag.clamp(-max_lag, max_lag) + max_lag]  # [H, m, c]
    return picked * inside.to(lag_weights.dtype)


def correlation_scores(q: torch.Tensor, k: torch.Tensor, lag_weights: torch.Tensor) -> torch.Tensor:
    """Unmasked scores ``[b, H, p_q, p_k]`` from ``q, k [b, H, p, d]`` and ``w [H, 2L+1]``."""
    d_head = q.shape[-1]
    mixed_k = torch.einsum("hmc,bhjm->bhjc", lag_matrix(lag_weights, d_head), k)
    return q @ mixed_k.transpose(-1, -2) / math.sqrt(d_head)


def dot_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Unmasked scaled dot-product scores ``[b, H, p_q, p_k]``."""
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a dot-product or a correlation score.

    Projections ``q, k, v`` (``d_model -> H * d_head``) and ``o`` are ``nn.Linear``; the
    softmaxed pattern ``[b, H, q_pos, k_pos]`` passes through ``hook_pattern`` (an
    ``nn.Identity``) before it weights the values, so hooking it sees the pattern used.
    The hook is read-only: ``HookedModel`` refuses an intervention on
    ``blocks.L.attn.hook_pattern`` (patch ``hook_q``/``hook_k``/``hook_z`` instead).
    Only the score differs between the two kinds, so two models built with the same
    seed share every other line and every other parameter.
    """

    def __init__(self, d_model: int, n_heads: int, kind: str = "dot", max_lag: int = 0):
        super().__init__()
        if kind not in ("dot", "correlation"):
            raise ValueError(f"attention must be 'dot' or 'correlation', not {kind!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.kind = kind
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.hook_pattern = nn.Identity()
        if kind == "correlation":
            # Start at lag 0 only (plain attention); built without the random generator,
            # so both kinds draw the same random numbers for every other weight.
            weights = torch.zeros(n_heads, 2 * max_lag + 1)
            weights[:, max_lag] = 1.0
            self.lag_weights = nn.Parameter(weights)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, p, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q, self.k, self.v))
        if self.kind == "correlation":
            scores = correlation_scores(q, k, self.lag_weights)
        else:
            scores = dot_scores(q, k)
        pattern = self.hook_pattern(causal_softmax(scores, attention_mask))
        z = pattern @ v  # [b, H, p, d_head]
        return self.o(z.transpose(1, 2).reshape(b, p, self.n_heads * self.d_head))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, p, _ = x.shape
        return x.view(b, p, self.n_heads, self.d_head).transpose(1, 2)
