"""Sparsity analyzer: streamed statistics equal a direct computation on all values at once.

The direct side loads every stored value of the run into one array (test-side only) and
computes each statistic with plain numpy formulas (pairwise-difference Gini, two-pass
moments, histograms by explicit comparisons); the tool only ever sees one shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from runs import shard_plan, synthetic_manifest, synthetic_shape
from support import family_table

from arrakis_ray.errors import ToolError
from arrakis_ray.reports.sparsity_charts import (
    firing_frequency_chart,
    histogram_chart,
    kurtosis_chart,
)
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import ShardInputs
from arrakis_ray.tools.runner import analyze, make_tool
from arrakis_ray.tools.sparsity_analyzer import gini_index


def reduce_over(tool, shards: list[ShardInputs], manifest) -> dict[str, pd.DataFrame]:
    partials: dict[str, list] = {}
    for inputs in shards:
        for name, table in tool.compute_shard(inputs, None).items():
            partials.setdefault(name, []).append(table)
    return {k: v.to_pandas() for k, v in tool.reduce(partials, manifest).items()}


def run_tool(run_dir, params: dict | None = None) -> dict[str, pd.DataFrame]:
    """compute_shard on every stored shard, then reduce: the runner's path, without Ray."""
    layout = store_layout.RunLayout(run_dir.parents[1], run_dir.name)
    manifest = store_manifest.read_manifest(layout)
    reader = RunReader(layout, manifest)
    tool = make_tool("sparsity_analyzer", params)
    families = sorted({store_layout.hook_family(h) for h in tool.required_hooks(manifest)})
    shards = [
        ShardInputs(
            layout.run_id, s, manifest, {f: reader.activations(f, s) for f in families}, None, None
        )
        for s in reader.shards
    ]
    return reduce_over(tool, shards, manifest)


def all_values(run_dir, family: str, layer: int) -> np.ndarray:
    """[tokens, width] of one layer over the whole run, in float64."""
    df = family_table(run_dir, family).to_pandas()
    df = df[df.layer == layer].sort_values(["seq_id", "pos"])
    return df[[c for c in df.columns if c[0] == "d" and c[1:].isdigit()]].to_numpy(np.float64)


def direct_kurtosis(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0)
    return (centred**4).mean(0) / (centred**2).mean(0) ** 2 - 3.0


def pairwise_gini(row: np.ndarray) -> float:
    a = np.abs(row)
    return np.abs(a[:, None] - a[None, :]).sum() / (2 * len(a) * a.sum())


def test_statistics_match_direct_computation(harvested):
    _, _, result = harvested
    params = {"threshold": 0.05, "hist_bins": 12, "hist_range": [-0.5, 2.5]}
    got = run_tool(result.run_dir, params)
    for layer in range(4):
        x = all_values(result.run_dir, "mlp_post", layer)
        neurons = got["sparsity_neurons"].query("layer == @layer").sort_values("neuron")
        active = x > 0.05
        np.testing.assert_array_equal(neurons["n_tokens"], len(x))
        np.testing.assert_allclose(neurons["freq"], active.mean(0), rtol=1e-12)
        np.testing.assert_array_equal(neurons["dead"], ~active.any(0))
        np.testing.assert_allclose(neurons["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(neurons["std"], x.std(0), rtol=1e-9)
        np.testing.assert_array_equal(neurons["max"], x.max(0))
        np.testing.assert_array_equal(neurons["min"], x.min(0))

        summary = got["sparsity_layers"].query("layer == @layer").iloc[0]
        l0 = active.sum(1)
        assert summary["n_tokens"] == len(x) and summary["n_neurons"] == x.shape[1]
        assert summary["dead_neurons"] == (~active.any(0)).sum()
        np.testing.assert_allclose(
            [summary["l0_mean"], summary["l0_std"]], [l0.mean(), l0.std()], rtol=1e-9
        )
        assert (summary["l0_min"], summary["l0_max"]) == (l0.min(), l0.max())
        gini = np.array([pairwise_gini(row) for row in x])
        np.testing.assert_allclose(
            [summary["gini_mean"], summary["gini_std"]], [gini.mean(), gini.std()], rtol=1e-9
        )

        hist = got["sparsity_histograms"].query(
            "layer == @layer and family == 'mlp_post' and quantity == 'activation'"
        )
        edges = np.linspace(-0.5, 2.5, 13)
        want = [(x < -0.5).sum()]
        want += [
            ((x >= lo) & (x < hi)).sum() for lo, hi in zip(edges[:-2], edges[1:-1], strict=True)
        ]
        want += [((x >= edges[-2]) & (x <= 2.5)).sum(), (x > 2.5).sum()]
        np.testing.assert_array_equal(hist.sort_values("bin")["count"], want)
        assert hist["count"].sum() == x.size

        resid = all_values(result.run_dir, "resid_post", layer)
        kurt = got["sparsity_kurtosis"].query("layer == @layer").sort_values("dim")
        np.testing.assert_allclose(kurt["kurtosis"], direct_kurtosis(resid), rtol=1e-9)
        np.testing.assert_allclose(kurt["std"], resid.std(0), rtol=1e-9)
        skew = ((resid - resid.mean(0)) ** 3).mean(0) / resid.std(0) ** 3
        np.testing.assert_allclose(kurt["skewness"], skew, rtol=1e-8, atol=1e-12)


def dense_shard(values: np.ndarray, shard: int, first_seq: int = 0) -> ShardInputs:
    """A one-layer shard of a dense family, one sequence per row (position 0)."""
    n = len(values)
    columns = {
        "run_id": pa.array(["synthetic"] * n),
        "layer": pa.array(np.zeros(n, np.int16)),
        "seq_id": pa.array(np.arange(first_seq, first_seq + n, dtype=np.int64)),
        "pos": pa.array(np.zeros(n, np.int32)),
        **{f"d{i}": pa.array(values[:, i].astype(np.float32)) for i in range(values.shape[1])},
    }
    manifest = synthetic_manifest(
        "synthetic", ["blocks.0.mlp.hook_post"], synthetic_shape(n_layers=1), shard_plan(1, 1)
    )
    table = pa.table(columns)
    return ShardInputs(
        "synthetic", shard, manifest, {"mlp_post": table, "resid_post": table}, None, None
    )


def test_streaming_kurtosis_is_exact_with_large_offsets():
    # a dimension with mean 1e4 and spread 1e-2: raw power sums lose every digit here
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [
            1e4 + 1e-2 * rng.standard_normal(600),
            rng.standard_t(df=5, size=600),  # heavy tails
            rng.uniform(-1, 1, 600),  # excess kurtosis -1.2
        ]
    ).astype(np.float32)
    sizes = [1, 7, 250, 342]  # uneven shards, one of a single token
    starts = np.cumsum([0, *sizes])
    shards = [
        dense_shard(x[a:b], i, a)
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True))
    ]
    manifest = shards[0].manifest
    got = reduce_over(make_tool("sparsity_analyzer"), shards, manifest)["sparsity_kurtosis"]
    want = direct_kurtosis(x.astype(np.float64))
    np.testing.assert_allclose(got["kurtosis"], want, rtol=1e-7)
    np.testing.assert_allclose(got["mean"], x.astype(np.float64).mean(0), rtol=1e-12)
    assert abs(want[2] + 1.2) < 0.1
    # the formula from raw power sums, for contrast, is far off on the offset dimension
    s = [(x[:, 0].astype(np.float64) ** p).sum() / len(x) for p in range(5)]
    raw_m2 = s[2] - s[1] ** 2
    raw_m4 = s[4] - 4 * s[1] * s[3] + 6 * s[1] ** 2 * s[2] - 3 * s[1] ** 4
    assert not np.isclose(raw_m4 / raw_m2**2 - 3, want[0], rtol=0.1)


def test_dead_neurons_on_a_hand_made_case():
    x = np.zeros((10, 4))
    x[:, 0] = -np.arange(1, 11)  # always negative: dead
    x[:, 1] = 0.0  # always exactly at the threshold: dead (active means strictly above)
    x[7, 2] = 0.5  # fires once, in the second shard
    x[:, 3] = np.arange(10)  # fires on 9 of 10 tokens
    shards = [dense_shard(x[:5], 0), dense_shard(x[5:], 1, 5)]
    tool = make_tool("sparsity_analyzer", {"kurtosis_family": None})
    got = reduce_over(tool, shards, shards[0].manifest)
    neurons = got["sparsity_neurons"].sort_values("neuron")
    assert neurons["dead"].tolist() == [True, True, False, False]
    np.testing.assert_allclose(neurons["freq"], [0, 0, 0.1, 0.9])
    assert neurons["n_active"].tolist() == [0, 0, 1, 9]
    summary = got["sparsity_layers"].iloc[0]
    assert summary["dead_neurons"] == 2
    assert (summary["l0_min"], summary["l0_max"]) == (0, 2)  # token 0: only neuron 0 nonzero
    assert "sparsity_kurtosis" not in got
    l0 = got["sparsity_histograms"].query("quantity == 'l0'")
    assert l0["count"].sum() == 10
    # a constant dimension has no kurtosis (null), not a division by ~0
    kurt = reduce_over(make_tool("sparsity_analyzer"), shards, shards[0].manifest)
    assert kurt["sparsity_kurtosis"].sort_values("dim")["kurtosis"].isna().tolist() == [
        False,
        True,
        False,
        False,
    ]


def test_gini_closed_forms():
    x = np.array([[0, 0, 3.0, 0], [1, 1, 1, 1], [-2, 2, -2, 2], [0, 0, 0, 0], [1, 2, 3, 4]])
    g = gini_index(x)
    np.testing.assert_allclose(g[:3], [0.75, 0.0, 0.0])  # one-hot: 1 - 1/n
    assert np.isnan(g[3])
    np.testing.assert_allclose(g[4], pairwise_gini(x[4]))


def test_bad_params_are_refused(harvested):
    with pytest.raises(ToolError, match="family 'mlp_pots'"):
        make_tool("sparsity_analyzer", {"family": "mlp_pots"})
    with pytest.raises(ToolError, match="hist_range"):
        make_tool("sparsity_analyzer", {"hist_range": [2.0, 1.0]})
    _, _, result = harvested
    manifest = store_manifest.read_manifest(
        store_layout.RunLayout(result.run_dir.parents[1], result.run_id)
    )
    with pytest.raises(ToolError, match=r"layers \[9\]"):
        make_tool("sparsity_analyzer", {"layers": [9]}).required_hooks(manifest)


def test_runner_writes_queryable_tables(harvested):
    from arrakis_ray.store.catalog import Store

    _, store, result = harvested
    done = analyze(result.run_dir, "sparsity_analyzer", {"layers": [1, 2]})
    assert done.shards == 3
    with Store(store) as db:
        layers = db.sql(
            "SELECT l.layer, l.dead_neurons, l.n_tokens, "
            "  (SELECT count(*) FROM results_sparsity_neurons n "
            "   WHERE n.layer = l.layer AND n.dead) AS dead_rows, "
            "  (SELECT sum(count) FROM results_sparsity_histograms h WHERE h.layer = l.layer "
            "   AND h.family = 'mlp_post' AND h.quantity = 'activation') AS values, "
            "  (SELECT avg(kurtosis) FROM results_sparsity_kurtosis k "
            "   WHERE k.layer = l.layer) AS mean_kurtosis "
            "FROM results_sparsity_layers l ORDER BY layer"
        )
        hottest = db.sql("SELECT max(freq) AS top FROM results_sparsity_neurons WHERE layer = 2")[
            "top"
        ][0]
    assert layers["layer"].to_list() == [1, 2]
    assert layers["n_tokens"].to_list() == [result.tokens] * 2
    assert layers["dead_neurons"].to_list() == layers["dead_rows"].to_list()
    assert layers["values"].to_list() == [result.tokens * 512] * 2
    for layer, mean_kurtosis in zip(layers["layer"], layers["mean_kurtosis"], strict=True):
        want = direct_kurtosis(all_values(result.run_dir, "resid_post", layer)).mean()
        assert mean_kurtosis == pytest.approx(want, rel=1e-9)
    assert hottest == pytest.approx((all_values(result.run_dir, "mlp_post", 2) > 0).mean(0).max())


def test_sparsity_charts():
    hist = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1],
            "bin_lo": [-np.inf, 0.0, 0.5, 0.0],
            "bin_hi": [0.0, 0.5, 1.0, 0.5],
            "count": [4, 10, 3, 7],
        }
    )
    spec = histogram_chart(hist, title="mlp_post").to_dict()
    enc = spec["encoding"]
    assert spec["mark"]["type"] == "bar"
    assert (enc["x"]["field"], enc["x2"]["field"], enc["y"]["field"]) == (
        "bin_lo",
        "bin_hi",
        "count",
    )
    assert enc["row"]["field"] == "layer" and enc["y"]["scale"]["type"] == "symlog"
    assert [v["count"] for v in spec["data"]["values"]] == [10, 3, 7]  # underflow dropped

    freq = pd.DataFrame({"layer": [0, 0, 1], "freq": [0.0, 0.4, 0.9]})
    enc = firing_frequency_chart(freq).to_dict()["encoding"]
    assert enc["x"]["field"] == "freq" and enc["x"]["bin"]["extent"] == [0, 1]
    assert enc["y"]["aggregate"] == "count" and enc["row"]["field"] == "layer"

    kurt = pd.DataFrame({"layer": [0, 0, 1], "dim": [0, 1, 0], "kurtosis": [0.1, 30.0, -1.0]})
    ticks, mean = kurtosis_chart(kurt).to_dict()["layer"]
    assert ticks["mark"]["type"] == "tick" and ticks["encoding"]["y"]["field"] == "kurtosis"
    assert mean["encoding"]["y"]["aggregate"] == "mean"
    assert mean["encoding"]["x"]["field"] == "layer"


def test_all_zero_tokens_have_no_gini():
    one_hot = np.eye(4)[[0, 2, 3]]  # Gini of a one-hot row: 1 - 1/4
    tool = make_tool("sparsity_analyzer", {"kurtosis_family": None})
    shards = [dense_shard(np.zeros((3, 4)), 0), dense_shard(one_hot, 1, 3)]
    summary = reduce_over(tool, shards, shards[0].manifest)["sparsity_layers"].iloc[0]
    assert summary["n_tokens"] == 6 and summary["gini_tokens"] == 3
    assert summary["gini_mean"] == pytest.approx(0.75) and summary["gini_std"] == pytest.approx(0)
    only_zeros = reduce_over(tool, shards[:1], shards[0].manifest)["sparsity_layers"].iloc[0]
    assert only_zeros["gini_tokens"] == 0 and pd.isna(only_zeros["gini_mean"])
    assert only_zeros["dead_neurons"] == 4
