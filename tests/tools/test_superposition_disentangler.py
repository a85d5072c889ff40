"""The SAE recovers known sparse directions, and its metrics equal a numpy recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from support import family_table

from arrakis_ray.errors import ToolError
from arrakis_ray.reports.dictionary_charts import (
    FEATURE_FREQUENCY_SQL,
    feature_frequency_histogram,
)
from arrakis_ray.store.catalog import Store
from arrakis_ray.tools.runner import analyze, make_tool

from .synthetic_run import run_inputs, write_synthetic_run

HOOK = "blocks.0.hook_resid_post"


def _superposed(seed: int, d: int, n_true: int, n_seq: int, n_pos: int, p_on: float):
    """(true unit directions [n_true, d], activations [n_seq, n_pos, d]): sparse sums."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n_true, d))
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    on = rng.random((n_seq, n_pos, n_true)) < p_on
    magnitude = rng.uniform(0.5, 2.0, size=on.shape)
    return true, (on * magnitude) @ true


def _decoder(table, d: int) -> np.ndarray:
    """[n_features, d] decoder matrix rebuilt from the long sae_directions table."""
    rows = table.sort_by([("feature", "ascending"), ("dim", "ascending")])
    n_features = rows.num_rows // d
    return rows.column("value").to_numpy().reshape(n_features, d)


@pytest.mark.parametrize(("kind", "extra"), [("topk", {"k": 4}), ("l1", {"l1_coeff": 2.0})])
def test_recovers_directions_in_superposition(tmp_path, kind, extra):
    """64 unit directions in 32 dimensions, each active with p=0.04: most are found."""
    torch.set_num_threads(1)
    d = 32
    true, acts = _superposed(seed=1, d=d, n_true=2 * d, n_seq=200, n_pos=50, p_on=0.04)
    layout = write_synthetic_run(tmp_path, "blocks.{layer}.hook_resid_post", {0: acts})
    tool = make_tool(
        "superposition_disentangler",
        {"hook": HOOK, "kind": kind, "epochs": 20, "lr": 3e-3, "batch_size": 128, **extra},
    )
    out = tool.compute_run(run_inputs(layout), None)
    decoder = _decoder(out["sae_directions"], d)
    assert decoder.shape == (4 * d, d)  # default dictionary: 4 x width
    np.testing.assert_allclose(np.linalg.norm(decoder, axis=1), 1.0, rtol=1e-5)
    best = (true @ decoder.T).max(axis=1)
    assert (best > 0.9).mean() >= 0.9, np.sort(best)[:8]
    (metrics,) = out["sae_metrics"].to_pylist()
    assert metrics["fraction_of_variance_explained"] > 0.8
    if kind == "topk":
        assert metrics["l0"] <= 4


def test_outputs_equal_a_numpy_recomputation_from_saved_weights(tmp_path):
    """Features, MSE, FVE, L0 and dead features, recomputed from the stored float16
    activations and the saved safetensors weights with plain numpy."""
    d = 8
    _, acts = _superposed(seed=2, d=d, n_true=16, n_seq=24, n_pos=10, p_on=0.1)
    layout = write_synthetic_run(
        tmp_path, "blocks.{layer}.hook_resid_post", {0: acts}, shard_size=10, dtype="float16"
    )
    k = 3
    params = {"hook": HOOK, "k": k, "n_features": 40, "epochs": 3, "batch_size": 32}
    out = make_tool("superposition_disentangler", params).compute_run(run_inputs(layout), None)
    (metrics,) = out["sae_metrics"].to_pylist()
    w = load_file(layout.root / metrics["weights_path"])

    stored = family_table(layout.root, "resid_post").sort_by(
        [("seq_id", "ascending"), ("pos", "ascending")]
    )
    x = np.stack([stored.column(f"d{i}").to_numpy() for i in range(d)], 1).astype(np.float64)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    kth = np.sort(pre, axis=1)[:, -k][:, None]
    f = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    x_hat = f @ w["W_dec"] + w["b_dec"]
    sse = ((x - x_hat) ** 2).sum()
    assert metrics["n_tokens"] == len(x) == 24 * 10
    assert metrics["mse"] == pytest.approx(sse / x.size, rel=1e-4)
    sst = ((x - x.mean(0)) ** 2).sum()
    assert metrics["fraction_of_variance_explained"] == pytest.approx(1 - sse / sst, rel=1e-4)
    assert metrics["l0"] == pytest.approx((f > 0).sum(1).mean())
    assert metrics["dead_features"] == int(((f > 0).sum(0) == 0).sum())

    feats = out["sae_features"].sort_by(
        [("seq_id", "ascending"), ("pos", "ascending"), ("feature", "ascending")]
    )
    seq = stored.column("seq_id").to_numpy()
    pos = stored.column("pos").to_numpy()
    rows, cols = np.nonzero(f)  # row-major: already sorted by (token, feature)
    np.testing.assert_array_equal(feats.column("seq_id").to_numpy(), seq[rows])
    np.testing.assert_array_equal(feats.column("pos").to_numpy(), pos[rows])
    np.testing.assert_array_equal(feats.column("feature").to_numpy(), cols)
    np.testing.assert_allclose(feats.column("activation").to_numpy(), f[rows, cols], rtol=1e-4)
    np.testing.assert_allclose(_decoder(out["sae_directions"], d), w["W_dec"], rtol=1e-6)


def test_same_seed_same_weights_and_bad_params_are_refused(tmp_path):
    _, acts = _superposed(seed=3, d=4, n_true=8, n_seq=8, n_pos=6, p_on=0.2)
    layout = write_synthetic_run(
        tmp_path, "blocks.{layer}.hook_resid_post", {0: acts}, shard_size=4
    )
    params = {"hook": HOOK, "k": 2, "epochs": 2, "batch_size": 8}

    def decoder(**over):
        tool = make_tool("superposition_disentangler", {**params, **over})
        return _decoder(tool.compute_run(run_inputs(layout), None)["sae_directions"], 4)

    np.testing.assert_array_equal(decoder(), decoder())
    assert not np.allclose(decoder(), decoder(seed=1))

    with pytest.raises(ToolError, match="k=20 exceeds n_features=16"):
        make_tool("superposition_disentangler", {**params, "k": 20}).compute_run(
            run_inputs(layout), None
        )
    with pytest.raises(ToolError, match="only dense hooks"):
        make_tool("superposition_disentangler", {"hook": "blocks.0.attn.hook_q"})
    with pytest.raises(ToolError, match="blocks.0.hook_resid_psot"):
        make_tool("superposition_disentangler", {"hook": "blocks.0.hook_resid_psot"})
    with pytest.raises(ToolError, match="hook: required field is missing"):
        make_tool("superposition_disentangler", {})
    with pytest.raises(ToolError, match="kind"):
        make_tool("superposition_disentangler", {"hook": HOOK, "kind": "relu"})


def test_runs_as_a_ray_task_on_the_demo_run(harvested):
    """Through the runner on the shared harvest: sane metrics, features join tokens."""
    _, store, result = harvested
    k = 8
    done = analyze(
        result.run_dir,
        "superposition_disentangler",
        {"hook": "blocks.2.hook_resid_post", "k": k, "epochs": 20, "batch_size": 64},
    )
    assert done.shards == 3
    s = Store(store)
    (m,) = s.sql("SELECT * FROM results_sae_metrics").to_dicts()
    assert m["run_id"] == result.run_id and m["width"] == 128 and m["n_features"] == 512
    assert m["n_tokens"] == result.tokens
    assert 0 < m["fraction_of_variance_explained"] <= 1
    assert 0 < m["l0"] <= k
    (joined,) = s.sql(
        """SELECT count(*) AS n, count(t.token_text) AS with_token,
                  count(DISTINCT (f.seq_id, f.pos)) AS tokens
           FROM results_sae_features f
           LEFT JOIN tokens t USING (run_id, seq_id, pos)"""
    ).rows()
    assert joined[0] == joined[1] == round(m["l0"] * m["n_tokens"])
    assert joined[2] <= m["n_tokens"]
    (norms,) = s.sql(
        """SELECT min(n), max(n), count(*) FROM (
             SELECT feature, sqrt(sum(value * value)) AS n FROM results_sae_directions
             GROUP BY feature)"""
    ).rows()
    assert norms[0] == pytest.approx(1, abs=1e-5) and norms[1] == pytest.approx(1, abs=1e-5)
    assert norms[2] == 512
    assert (result.run_dir / m["weights_path"]).is_file()
    # the chart's query: every live feature once, frequencies summing to L0
    freq = s.sql(FEATURE_FREQUENCY_SQL)
    assert freq.height == m["n_features"] - m["dead_features"]
    assert freq["frequency"].sum() == pytest.approx(m["l0"])
    assert feature_frequency_histogram(freq).to_dict()["mark"]["type"] == "bar"
    # a rerun replaces the weights with its own; the first call's are removed with it
    first = result.run_dir / m["weights_path"]
    analyze(result.run_dir, "superposition_disentangler", {"hook": HOOK, "k": k, "epochs": 1})
    (again,) = Store(store).sql("SELECT weights_path FROM results_sae_metrics").to_dicts()
    assert again["weights_path"] != m["weights_path"]
    assert (result.run_dir / again["weights_path"]).is_file() and not first.exists()
    assert not first.parent.exists()  # the first call's directory went with it
