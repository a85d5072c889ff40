"""Correlation attention against its definition: a loop, plain attention, gradcheck, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arrakis_ray.models.custom import causal_softmax
from arrakis_ray.studies.leviathan.attention import (
    CausalSelfAttention,
    correlation_scores,
    lag_matrix,
)

B, H, P, D = 2, 3, 5, 6


def _qkv(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, P, D, generator=g, dtype=dtype) for _ in range(3)]


def _loop_scores(q, k, w):
    """The docstring's definition, one sum at a time (zero-padded lags)."""
    max_lag = (w.shape[1] - 1) // 2
    scores = torch.zeros(B, H, P, P, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(P):
                for j in range(P):
                    total = 0.0
                    for lag in range(-max_lag, max_lag + 1):
                        for c in range(D):
                            if 0 <= c + lag < D:
                                total += w[h, lag + max_lag] * q[b, h, i, c] * k[b, h, j, c + lag]
                    scores[b, h, i, j] = total / math.sqrt(D)
    return scores


@pytest.mark.parametrize("max_lag", [0, 2, 7])  # 7 > D - 1: the far lags select nothing
def test_batched_scores_equal_the_loop(max_lag):
    q, k, _ = _qkv()
    w = torch.randn(H, 2 * max_lag + 1, dtype=torch.float64)
    torch.testing.assert_close(
        correlation_scores(q, k, w), _loop_scores(q, k, w), rtol=0, atol=1e-12
    )


def test_lag_matrix_is_the_banded_toeplitz_of_the_weights():
    w = torch.arange(1.0, 1 + 2 * 5).reshape(2, 5)  # 2 heads, lags -2..2
    t = lag_matrix(w, 4)
    for m in range(4):
        for c in range(4):
            expected = w[1, m - c + 2] if abs(m - c) <= 2 else 0.0
            assert t[1, m, c] == expected


def test_lag_zero_is_scaled_dot_product_attention_exactly():
    q, k, v = _qkv(1)
    w = torch.ones(H, 1, dtype=torch.float64)
    ours = causal_softmax(correlation_scores(q, k, w)) @ v
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    manual = (
        torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -math.inf), -1)
        @ v
    )
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-12)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=1e-12)
    # a one-hot window on lag 0 among other lags is the same function
    w_wide = torch.zeros(H, 9, dtype=torch.float64)
    w_wide[:, 4] = 1.0
    torch.testing.assert_close(
        causal_softmax(correlation_scores(q, k, w_wide)) @ v, manual, rtol=0, atol=1e-12
    )


def test_gradcheck_in_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(2))
    w = torch.randn(H, 5, dtype=torch.float64, requires_grad=True)

    def attend(q, k, v, w):
        return causal_softmax(correlation_scores(q, k, w)) @ v

    assert torch.autograd.gradcheck(attend, (q, k, v, w))


def _layer(kind="correlation", max_lag=3):
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, kind, max_lag).double()
    if kind == "correlation":  # away from the lag-0 start, so every lag matters
        layer.lag_weights.data = torch.randn_like(layer.lag_weights)
    return layer


def test_gradients_reach_q_k_v_and_the_lag_weights():
    layer = _layer()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    for name in ("q", "k", "v", "o"):
        assert getattr(layer, name).weight.grad.abs().sum() > 0, name
    assert (layer.lag_weights.grad.abs() > 0).all()


@pytest.mark.parametrize("kind", ["dot", "correlation"])
def test_a_future_token_changes_nothing_before_it(kind):
    layer = _layer(kind)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5] += 10.0
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_the_pattern_passes_through_the_hook_and_is_causal_and_normalised():
    layer = _layer()
    seen = []
    layer.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o))
    layer(torch.randn(2, 6, 16, dtype=torch.float64))
    (pattern,) = seen
    assert pattern.shape == (2, 2, 6, 6)
    assert torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))


def test_padding_keys_are_ignored():
    layer = _layer()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    padded = layer(x, attention_mask=mask)[:, 2:]
    alone = layer(x[:, 2:])  # no positions in attention: the same suffix without its padding
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-12)


def test_the_dot_layer_is_the_correlation_layer_at_its_lag_zero_start():
    torch.manual_seed(5)
    dot = CausalSelfAttention(16, 4, "dot").double()
    torch.manual_seed(5)
    corr = CausalSelfAttention(16, 4, "correlation", max_lag=4).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(dot(x), corr(x), rtol=0, atol=1e-12)
