"""Residual decomposition: the parts add up to the stored residual stream at every layer
(sequential and parallel blocks), and each part is the write computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from runs import shard_plan, synthetic_manifest, synthetic_shape
from tools.decomp_support import ARCH_CASES, batch, case_id, model_shard, stored_shard, tiny, wide

from arrakis_ray.errors import ToolError
from arrakis_ray.store.catalog import Store
from arrakis_ray.tools.decompose import RowIndex, ShardComponents, sorted_tokens
from arrakis_ray.tools.residual_decomposition import (
    ResidualDecomposition,
    ResidualDecompositionParams,
)
from arrakis_ray.tools.runner import analyze, make_tool


def _decompose(inputs, model, **params):
    tool = ResidualDecomposition(ResidualDecompositionParams(**params))
    return tool.compute_shard(inputs, model).to_pandas()


def _residual(inputs, model, layer):
    """The stored residual at ``layer``: resid_pre, or the last resid_post for n_layers."""
    if layer < model.n_layers:
        return wide(inputs.activations["resid_pre"], layer)
    return wide(inputs.activations["resid_post"], layer - 1)


@pytest.mark.parametrize("case", ARCH_CASES, ids=case_id)
def test_the_parts_sum_to_the_stored_residual(case):
    arch, overrides = case
    model = tiny(arch, **overrides)
    inputs, _ = model_shard(model, *batch(model.vocab_size, [6, 9, 3]))
    seq, pos, _ = sorted_tokens(inputs.tokens)
    for layer in range(model.n_layers + 1):
        parts = ShardComponents(inputs, model, RowIndex(seq, pos, 0), layer)
        total = sum(v.sum(0) for _, _, v in parts.groups(0, len(seq))).double().numpy()
        stored = _residual(inputs, model, layer)
        expected = np.stack([stored[(int(s), int(p))] for s, p in zip(seq, pos, strict=True)])
        np.testing.assert_allclose(total, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ARCH_CASES[2:6], ids=case_id)
def test_table_values_are_norms_and_projections_of_the_residual(case):
    arch, overrides = case
    model = tiny(arch, **overrides)
    inputs, _ = model_shard(model, *batch(model.vocab_size, [5, 7]))
    direction = np.random.default_rng(1).normal(size=model.d_model)
    unit = direction / np.linalg.norm(direction)
    rows = _decompose(inputs, model, direction=tuple(direction))
    assert sorted(rows.layer.unique()) == list(range(model.n_layers + 1))
    for layer in range(model.n_layers + 1):
        at = rows[rows.layer == layer]
        parts = at[at.component != "total"].groupby(["seq_id", "pos"])
        total = at[at.component == "total"].set_index(["seq_id", "pos"])
        for key, r in _residual(inputs, model, layer).items():
            length = np.linalg.norm(r)
            assert total.norm[key] == pytest.approx(length, rel=1e-5)
            assert parts.projection.sum()[key] == pytest.approx(r @ unit, abs=1e-5)
            assert total.projection[key] == pytest.approx(r @ unit, abs=1e-5)
            # projections on the residual's own direction add up to its length
            assert parts.resid_projection.sum()[key] == pytest.approx(length, rel=1e-5)
        # only the blocks before `layer` wrote into it
        assert (at.component_layer.dropna() < layer).all()


def test_each_part_is_the_write_computed_by_hand():
    """gpt2: a head from c_proj's rows, the bias, an mlp, the embeddings, from the cache."""
    model = tiny("gpt2", seed=2)
    ids, mask = batch(model.vocab_size, [4, 6], seed=3)
    inputs, cache = model_shard(model, ids, mask)
    token = 11
    rows = _decompose(inputs, model, token=f"t{token}", layer=2, positions=[1])
    w_u = model.model.lm_head.weight[token].detach().double()
    unit = w_u / w_u.norm()
    seq0, dh = int(inputs.tokens["seq_id"].to_numpy().min()), model.d_head
    for b in range(2):
        got = rows[rows.seq_id == seq0 + b].set_index("component")
        assert set(got.pos) == {1} and set(got.layer) == {2}
        attn = model.model.transformer.h[1].attn.c_proj
        z = cache["blocks.1.attn.hook_z"][b, 1, 2].double()
        expected = {
            "L1H2": z @ attn.weight.detach().double()[2 * dh : 3 * dh],
            "L1.attn_bias": attn.bias.detach().double(),
            "L0.mlp": cache["blocks.0.hook_mlp_out"][b, 1].double(),
            "embed": model.model.transformer.wte.weight.detach().double()[ids[b, 1]],
            "pos_embed": model.model.transformer.wpe.weight.detach().double()[1],
        }
        # layer 2 = n_layers: the stream after the last block
        resid = cache["blocks.1.hook_resid_post"][b, 1].double()
        for name, vector in expected.items():
            assert got.norm[name] == pytest.approx(float(vector.norm()), rel=1e-5)
            assert got.projection[name] == pytest.approx(float(vector @ unit), abs=1e-6)
            assert got.resid_projection[name] == pytest.approx(
                float(vector @ resid / resid.norm()), abs=1e-6
            )
        assert got["head"]["L1H2"] == 2 and got["component_layer"]["L1H2"] == 1
        assert np.isnan(got["component_layer"]["embed"]) and np.isnan(got["head"]["L1.mlp"])


def test_without_a_direction_projection_is_null_and_layer_zero_is_the_embeddings():
    model = tiny("llama")
    inputs, _ = model_shard(model, *batch(model.vocab_size, [4]))
    rows = _decompose(inputs, model, layer=0)
    assert rows.projection.isna().all()
    assert sorted(set(rows.component)) == ["embed", "total"]
    np.testing.assert_allclose(
        rows[rows.component == "embed"].norm.to_numpy(),
        rows[rows.component == "total"].norm.to_numpy(),
        rtol=1e-6,
    )


def test_bad_parameters_are_refused():
    with pytest.raises(ToolError, match="not both"):
        make_tool("residual_decomposition", {"direction": [1.0], "token": "a"})
    with pytest.raises(ToolError, match="layer must be >= 0"):
        make_tool("residual_decomposition", {"layer": -1})
    shape = synthetic_shape("llama", n_layers=2, d_model=64, norm="rmsnorm", positional="rotary")
    manifest = synthetic_manifest("r", ["hook_embed"], shape, shard_plan(1, 1))
    with pytest.raises(ToolError, match="layer 3 is out of range .* 0..2"):
        make_tool("residual_decomposition", {"layer": 3}).required_hooks(manifest)
    with pytest.raises(ToolError, match="direction has 3 numbers .* d_model 64"):
        make_tool("residual_decomposition", {"direction": [1, 2, 3]}).required_hooks(manifest)
    hooks = make_tool("residual_decomposition", {"layer": 1}).required_hooks(manifest)
    assert hooks == ["hook_embed", "blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"]


def test_the_demo_run_decomposes_exactly(harvested):
    """The trained gpt2 demo model, from its stored shard: parts sum to resid_pre."""
    from arrakis_ray.harvest.model_source import load_model

    config, _, result = harvested
    inputs = stored_shard(result.run_dir, 2)  # the stored manifest and vocab, via RunReader
    rows = _decompose(inputs, load_model(config.model), layer=3)
    parts = rows[rows.component != "total"].groupby(["seq_id", "pos"]).resid_projection.sum()
    for key, r in wide(inputs.activations["resid_pre"], 3).items():
        assert parts[key] == pytest.approx(np.linalg.norm(r), rel=1e-4)


def test_the_runner_writes_the_decomposition(harvested):
    _, store, result = harvested
    direction = np.random.default_rng(0).normal(size=128)
    analyze(
        result.run_dir,
        "residual_decomposition",
        {"layer": 2, "positions": [0, -1], "direction": direction.tolist()},
    )
    unit = direction / np.linalg.norm(direction)
    dot = " + ".join(f"p.d{i} * {float(u)!r}" for i, u in enumerate(unit))
    with Store(store) as db:
        got = db.sql(
            f"""
            WITH parts AS (
                SELECT seq_id, pos, sum(projection) AS projection, count(*) AS n
                FROM results_residual_decomposition
                WHERE component <> 'total' GROUP BY seq_id, pos
            )
            SELECT parts.*, {dot} AS expected
            FROM parts JOIN act_resid_pre p USING (seq_id, pos)
            WHERE p.layer = 2
            """
        )
        n_seq = db.sql("SELECT count(DISTINCT seq_id) AS n FROM tokens")["n"][0]
    assert len(got) == 2 * n_seq
    assert set(got["n"]) == {2 + 2 * 6}  # embed, pos_embed, 2 blocks x (4 heads, bias, mlp)
    np.testing.assert_allclose(got["projection"], got["expected"], atol=1e-4)


def test_rows_processed_in_chunks_give_the_same_result(monkeypatch):
    from arrakis_ray.tools import decompose

    model = tiny("gpt-neox", use_parallel_residual=True)
    inputs, _ = model_shard(model, *batch(model.vocab_size, [7, 4, 9]))
    whole = _decompose(inputs, model, positions=-2).sort_values(
        ["seq_id", "pos", "layer", "component"]
    )
    monkeypatch.setattr(decompose, "CHUNK_FLOATS", 2 * model.n_heads * model.d_model)
    chunked = _decompose(inputs, model, positions=-2).sort_values(
        ["seq_id", "pos", "layer", "component"]
    )
    assert set(whole.pos) == {5, 2, 7}
    assert list(whole.component) == list(chunked.component)
    for column in ("norm", "resid_projection"):
        np.testing.assert_allclose(whole[column], chunked[column], rtol=1e-5, atol=1e-7)
