"""Residual tools: norms, movement and cosines equal numpy on the stored vectors, and the
per-layer aggregate of ``reduce`` equals a direct computation over every shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from tools.decomp_support import stored_shard

from arrakis_ray.store.catalog import Store
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import NoParams
from arrakis_ray.tools.residual_tools import ResidualTools
from arrakis_ray.tools.runner import analyze


def _run(harvested):
    _, _, result = harvested
    reader = RunReader.open(result.run_dir)
    return result.run_dir, reader.manifest, reader.vocab


def _states(run_dir, shard=None):
    """layer -> (keys, float64 vectors) of the stored run (one shard, or every shard):
    -1 = resid_pre 0."""
    reader = RunReader.open(run_dir)
    shards = reader.shards if shard is None else [shard]

    def read(family, layer):
        table = pa.concat_tables(reader.activations(family, s, layer=layer) for s in shards)
        table = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        dims = [c for c in table.column_names if c[0] == "d" and c[1:].isdigit()]
        keys = list(zip(table["seq_id"].to_pylist(), table["pos"].to_pylist(), strict=True))
        return keys, np.column_stack([table[c].to_numpy() for c in dims]).astype(np.float64)

    states = {-1: read("resid_pre", 0)}
    for layer in range(4):
        states[layer] = read("resid_post", layer)
    return states


def _expected(states):
    """layer -> dict of numpy arrays: norm, movement, cosine (None for the first state)."""
    out = {}
    for layer, (keys, r) in states.items():
        row = {"keys": keys, "norm": np.sqrt((r * r).sum(1))}
        if layer > -1:
            prev_keys, prev = states[layer - 1]
            assert prev_keys == keys
            diff = r - prev
            prev_norm = np.sqrt((prev * prev).sum(1))
            row["movement"] = np.sqrt((diff * diff).sum(1)) / prev_norm
            row["cosine"] = (r * prev).sum(1) / (row["norm"] * prev_norm)
        out[layer] = row
    return out


def test_per_token_values_equal_numpy_on_the_stored_vectors(harvested):
    run_dir, manifest, vocab = _run(harvested)
    tool = ResidualTools(NoParams())
    result = tool.compute_shard(stored_shard(run_dir, 1, manifest, vocab), None)
    tokens = result["residual_tokens"].to_pandas()
    expected = _expected(_states(run_dir, shard=1))
    assert sorted(tokens.layer.unique()) == [-1, 0, 1, 2, 3]
    for layer, exp in expected.items():
        got = tokens[tokens.layer == layer].set_index(["seq_id", "pos"]).loc[exp["keys"]]
        np.testing.assert_allclose(got.norm, exp["norm"], rtol=1e-5)
        if layer == -1:
            assert got.movement.isna().all() and got.cosine.isna().all()
        else:
            np.testing.assert_allclose(got.movement, exp["movement"], rtol=1e-5)
            np.testing.assert_allclose(got.cosine, exp["cosine"], rtol=1e-5, atol=1e-6)


def test_without_resid_pre_the_first_state_is_layer_zero(harvested):
    run_dir, manifest, vocab = _run(harvested)
    manifest = manifest.with_changes(hooks=tuple(h for h in manifest.hooks if "resid_pre" not in h))
    tool = ResidualTools(NoParams())
    assert tool.required_hooks(manifest) == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    inputs = stored_shard(run_dir, 0, manifest, vocab)
    del inputs.activations["resid_pre"]
    tokens = tool.compute_shard(inputs, None)["residual_tokens"].to_pandas()
    assert sorted(tokens.layer.unique()) == [0, 1, 2, 3]
    assert tokens[tokens.layer == 0].movement.isna().all()
    assert tokens[tokens.layer == 1].movement.notna().all()


def test_reduce_equals_a_direct_computation_over_all_shards(harvested):
    run_dir, manifest, vocab = _run(harvested)
    tool = ResidualTools(NoParams())
    partials = {"residual_tokens": [], "residual_layers": []}
    for shard in range(3):
        out = tool.compute_shard(stored_shard(run_dir, shard, manifest, vocab), None)
        for name, table in out.items():
            partials[name].append(table)
    reduced = tool.reduce(partials, manifest, None)
    layers = reduced["residual_layers"].to_pandas().set_index("layer")
    assert set(reduced) == {"residual_layers"}  # per-token rows are written per shard
    assert sum(t.num_rows for t in partials["residual_tokens"]) == 5 * layers.n_tokens.iloc[0]
    for layer, exp in _expected(_states(run_dir)).items():
        row = layers.loc[layer]
        assert row.n_tokens == len(exp["norm"])
        for metric in ("norm", "movement", "cosine"):
            if metric not in exp:
                assert np.isnan(row[f"{metric}_mean"]) and np.isnan(row[f"{metric}_std"])
                continue
            assert row[f"{metric}_mean"] == pytest.approx(exp[metric].mean(), rel=1e-6)
            assert row[f"{metric}_std"] == pytest.approx(exp[metric].std(ddof=1), rel=1e-5)


def test_the_runner_writes_both_outputs(harvested):
    _, store, result = harvested
    analyze(result.run_dir, "residual_tools")
    with Store(store) as db:
        by_sql = db.sql(
            """
            SELECT layer, count(*) AS n, avg(norm) AS norm_mean, stddev_samp(norm) AS norm_std,
                   avg(movement) AS movement_mean, stddev_samp(cosine) AS cosine_std
            FROM results_residual_tokens GROUP BY layer ORDER BY layer
            """
        )
        reduced = db.sql("SELECT * FROM results_residual_layers ORDER BY layer")
        n_tokens = db.sql("SELECT count(*) AS n FROM tokens")["n"][0]
    assert list(reduced["layer"]) == [-1, 0, 1, 2, 3]
    assert set(by_sql["n"]) == {n_tokens} and set(reduced["n_tokens"]) == {n_tokens}
    for column in ("norm_mean", "norm_std", "movement_mean", "cosine_std"):
        np.testing.assert_allclose(
            reduced[column].to_numpy()[1:], by_sql[column].to_numpy()[1:], rtol=1e-5
        )
    assert reduced["movement_mean"][0] is None
