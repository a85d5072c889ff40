"""Composition scores equal dense computations in the paper's own (column) convention."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from runs import shard_plan, synthetic_manifest, synthetic_shape

from arrakis_ray.errors import ToolError
from arrakis_ray.models import build_model
from arrakis_ray.models.circuits import HeadFactors, norm_fold
from arrakis_ray.models.weights import attention_weights
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.attention_head_composition import (
    AttentionHeadComposition,
    CompositionParams,
    composition_scores,
    random_baseline,
)
from arrakis_ray.tools.runner import analyze, make_tool


def _run(model, **params) -> dict:
    tool = AttentionHeadComposition(CompositionParams(**params))
    manifest = synthetic_manifest("r", ["hook_embed"], synthetic_shape(), shard_plan(1, 1))
    inputs = RunReader(RunLayout("unused-store", "r"), manifest)
    return tool.compute_run(inputs, model).to_pydict()


def _dense_scores(mats_a: dict, mats_b: dict) -> dict[str, np.ndarray]:
    """The paper's formulas on dense d_model x d_model matrices (column-vector form).

    ``mats`` holds per-head TransformerLens weights (row-vector form) as float64 numpy;
    the paper's matrices are W_OV = W_O W_V = (W_V[h] @ W_O[h])^T and W_QK = W_Q^T W_K
    = W_Q[h] @ W_K[h]^T.
    """
    fro = np.linalg.norm
    n_a, n_b = len(mats_a["W_O"]), len(mats_b["W_Q"])
    out = {k: np.zeros((n_a, n_b)) for k in "qkv"}
    for i in range(n_a):
        ov_a = mats_a["W_O"][i].T @ mats_a["W_V"][i].T  # paper: W_O W_V
        for j in range(n_b):
            qk_b = mats_b["W_Q"][j] @ mats_b["W_K"][j].T  # paper: W_Q^T W_K
            ov_b = mats_b["W_O"][j].T @ mats_b["W_V"][j].T
            out["q"][i, j] = fro(qk_b.T @ ov_a) / (fro(qk_b) * fro(ov_a))
            out["k"][i, j] = fro(qk_b @ ov_a) / (fro(qk_b) * fro(ov_a))
            out["v"][i, j] = fro(ov_b @ ov_a) / (fro(ov_b) * fro(ov_a))
    return out


def _folded(model, layer: int) -> dict:
    """Per-head weights with ln1 folded in, by explicit dense matrices."""
    w = attention_weights(model, layer)
    gamma, centers = norm_fold(model, layer)
    d = model.d_model
    proj = np.eye(d) - (np.ones((d, d)) / d if centers else 0)  # P (identity for RMSNorm)
    read = proj @ np.diag(gamma.double().numpy())
    return {
        "W_Q": np.einsum("ij,hjk->hik", read, w.W_Q.double().numpy()),
        "W_K": np.einsum("ij,hjk->hik", read, w.W_K.double().numpy()),
        "W_V": np.einsum("ij,hjk->hik", read, w.W_V.double().numpy()),
        "W_O": w.W_O.double().numpy() @ proj,
    }


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox", "llama", "gemma", "phi3", "stablelm"])
@pytest.mark.parametrize("fold_ln", [True, False])
def test_matches_dense_paper_formulas(arch, fold_ln):
    model = build_model(arch, seed=3, num_hidden_layers=3)
    with torch.no_grad():  # non-trivial norm scales, so folding matters
        for name, p in model.model.named_parameters():
            if "norm" in name or "ln" in name:
                p.uniform_(0.5, 1.5)
    got = _run(model, fold_ln=fold_ln)
    nh = model.n_heads
    assert len(got["score"]) == 3 * nh * nh * 3  # 3 layer pairs, 3 kinds
    for layer_a, layer_b in [(0, 1), (0, 2), (1, 2)]:
        if fold_ln:
            a, b = _folded(model, layer_a), _folded(model, layer_b)
        else:
            a, b = (
                {
                    k: getattr(attention_weights(model, L), k).double().numpy()
                    for k in ("W_Q", "W_K", "W_V", "W_O")
                }
                for L in (layer_a, layer_b)
            )
        ref = _dense_scores(a, b)
        for kind in "qkv":
            rows = [
                i
                for i in range(len(got["score"]))
                if got["kind"][i] == kind
                and got["layer_a"][i] == layer_a
                and got["layer_b"][i] == layer_b
            ]
            table = np.zeros((nh, nh))
            for i in rows:
                table[got["head_a"][i], got["head_b"][i]] = got["score"][i]
            np.testing.assert_allclose(table, ref[kind], rtol=2e-4, atol=1e-6)


def test_norm_fold_reproduces_the_norm_module():
    for arch in ("gpt2", "gemma", "llama", "stablelm"):
        model = build_model(arch, seed=1)
        norm = model.adapter.sub(model.model, 0, model.adapter.ln1)
        with torch.no_grad():
            norm.weight.uniform_(-1, 1)
            x = torch.randn(5, model.d_model)
            gamma, centers = norm_fold(model, 0)
            px = x - x.mean(-1, keepdim=True) if centers else x
            beta = norm.bias if getattr(norm, "bias", None) is not None else 0
            eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 0))
            want = gamma * px / torch.sqrt(px.pow(2).mean(-1, keepdim=True) + eps) + beta
            torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)
            assert centers == (arch in ("gpt2", "stablelm"))


def _basis(d_model: int, d_head: int) -> list[torch.Tensor]:
    """Orthonormal d_model x d_head blocks E0, E1, ... (disjoint coordinate ranges, rotated)."""
    rot, _ = torch.linalg.qr(
        torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(0))
    )
    return [rot[:, i * d_head : (i + 1) * d_head] for i in range(d_model // d_head)]


def _heads(W_Q, W_K, W_V, W_O) -> HeadFactors:
    return HeadFactors.of(W_Q[None], W_K[None], W_V[None], W_O[None])


def test_hand_built_composition_known_values():
    d_model, d_head = 64, 8
    E = _basis(d_model, d_head)
    # head A: reads E0, writes into span(E1):  W_OV^A = E0 E1^T (row form)
    a = _heads(E[5], E[6], E[0], E[1].T)
    theta = 0.6
    # head B's query reads cos(theta) E1 + sin(theta) E4; its key reads E2, its value E3
    b = _heads(np.cos(theta) * E[1] + np.sin(theta) * E[4], E[2], E[3], E[7].T)
    s = {k: float(v) for k, v in composition_scores(a.writer(), b).items()}
    assert s["q"] == pytest.approx(np.cos(theta) / np.sqrt(d_head), rel=1e-5)
    assert s["k"] == pytest.approx(0.0, abs=1e-6)  # W_K^B reads E2, orthogonal to E1
    assert s["v"] == pytest.approx(0.0, abs=1e-6)
    # key side aligned (K-composition), value side too: rank-d_head isometries give 1/sqrt(d_head)
    b2 = _heads(E[2], E[1], E[1], E[7].T)
    s2 = {k: float(v) for k, v in composition_scores(a, b2).items()}
    assert s2["q"] == pytest.approx(0.0, abs=1e-6)
    assert s2["k"] == pytest.approx(1 / np.sqrt(d_head), rel=1e-5)
    assert s2["v"] == pytest.approx(1 / np.sqrt(d_head), rel=1e-5)
    # rank one everywhere and aligned: the maximum, 1
    e = E[0][:, :1]
    f = E[1][:, :1]
    one = composition_scores(_heads(e, e, e, f.T), _heads(f, f, f, e.T))
    for v in one.values():
        assert float(v) == pytest.approx(1.0, rel=1e-5)
    # a zero head scores 0, not NaN
    zero = composition_scores(_heads(e, e, 0 * e, f.T), _heads(f, f, f, e.T))
    assert all(float(v) == 0.0 for v in zero.values())


def test_d_model_8192_is_fast_and_matches_gram_formula():
    """d_model 8192, d_head 128: factored scores in seconds, equal to a Gram-matrix form.

    ||L M R||_F^2 = tr(M^T (L^T L) M (R R^T)) computed in float64 from d_head x d_head
    Gram matrices: an independent route to the same number.
    """
    d_model, d_head, n = 8192, 128, 2
    gen = torch.Generator().manual_seed(0)
    a = HeadFactors.of(
        *(torch.randn(n, d_model, d_head, generator=gen) for _ in range(3)),
        torch.randn(n, d_head, d_model, generator=gen),
    )
    b = HeadFactors.of(
        *(torch.randn(n, d_model, d_head, generator=gen) for _ in range(3)),
        torch.randn(n, d_head, d_model, generator=gen),
    )
    start = time.perf_counter()
    got = composition_scores(a.writer(), b)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed

    def gram_norm(L, M, R):
        L, M, R = L.double(), M.double(), R.double()
        return torch.sqrt(torch.trace(M.T @ (L.T @ L) @ M @ (R @ R.T)))

    for i in range(n):
        for j in range(n):
            ov_a = (a.W_V[i], torch.eye(d_head), a.W_O[i])
            for kind, (L, R) in {
                "q": (b.W_Q[j], b.W_K[j].T),
                "k": (b.W_K[j], b.W_Q[j].T),
                "v": (b.W_V[j], b.W_O[j]),
            }.items():
                num = gram_norm(ov_a[0], a.W_O[i] @ L, R)
                den = gram_norm(*ov_a) * gram_norm(L, torch.eye(d_head), R)
                assert float(got[kind][i, j]) == pytest.approx(float(num / den), rel=1e-4)


def test_random_baseline_is_about_one_over_sqrt_d_model():
    base = random_baseline(1024, 16, samples=32)
    for kind in "qkv":
        assert base[kind] == pytest.approx(1 / np.sqrt(1024), rel=0.1)


def test_baseline_columns_and_kinds_param():
    model = build_model("gpt2", seed=0)
    got = _run(model, kinds=("k",), baseline=True)
    assert set(got["kind"]) == {"k"}
    base = random_baseline(model.d_model, model.d_head)["k"]
    np.testing.assert_allclose(got["baseline"], base, rtol=1e-6)
    np.testing.assert_allclose(
        got["score_minus_baseline"], np.array(got["score"]) - base, rtol=1e-5, atol=1e-7
    )
    off = _run(model, baseline=False)
    assert set(off["baseline"]) == {None} and set(off["score_minus_baseline"]) == {None}
    with pytest.raises(ToolError, match="kinds"):
        make_tool("attention_head_composition", {"kinds": ["x"]})
    with pytest.raises(ToolError, match="kinds is empty"):
        make_tool("attention_head_composition", {"kinds": []})


def _hf_dense_layer(hf, layer: int) -> dict:
    """Per-head folded weights of the demo gpt2, sliced by hand from the HF modules."""
    block = hf.transformer.h[layer]
    d = hf.config.n_embd
    nh = hf.config.n_head
    dh = d // nh
    W = block.attn.c_attn.weight.detach().double().numpy()  # Conv1D: [in, out], out = q|k|v
    proj = np.eye(d) - np.ones((d, d)) / d
    read = proj @ np.diag(block.ln_1.weight.detach().double().numpy())
    W_o = block.attn.c_proj.weight.detach().double().numpy()  # [in = heads*dh, out = d]
    return {
        name: np.stack([read @ W[:, i * d + h * dh : i * d + (h + 1) * dh] for h in range(nh)])
        for i, name in enumerate(["W_Q", "W_K", "W_V"])
    } | {"W_O": np.stack([W_o[h * dh : (h + 1) * dh] @ proj for h in range(nh)])}


def test_runner_on_demo_run(harvested, hf_model):
    _, store, result = harvested
    analyze(result.run_dir, "attention_head_composition")
    with Store(store) as s:
        counts = s.sql(
            "SELECT kind, count(*) AS n, min(score) AS lo, max(score) AS hi "
            "FROM results_attention_head_composition GROUP BY kind ORDER BY kind"
        )
        rows = s.sql(
            "SELECT kind, head_a, head_b, score FROM results_attention_head_composition "
            "WHERE layer_a = 1 AND layer_b = 3 ORDER BY kind, head_a, head_b"
        )
    assert counts["kind"].to_list() == ["k", "q", "v"]
    assert counts["n"].to_list() == [6 * 16] * 3  # 6 layer pairs x 4 x 4 heads
    assert counts["lo"].min() >= 0 and counts["hi"].max() <= 1
    model, _ = hf_model
    ref = _dense_scores(_hf_dense_layer(model, 1), _hf_dense_layer(model, 3))
    for kind in "qkv":
        got = rows.filter(rows["kind"] == kind)["score"].to_numpy().reshape(4, 4)
        np.testing.assert_allclose(got, ref[kind], rtol=2e-4, atol=1e-6)
