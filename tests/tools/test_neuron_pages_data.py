"""Feature-page tables of the neuron dashboard against direct computations.

Quantile contexts: the sample is rebuilt here as a bottom-k over every active token of
the run (priorities from ``sample_hash``, itself checked against a pure-Python
splitmix64), then split into intervals by its own activation order. Histograms: the
counts equal ``numpy.histogram`` of every stored value with the table's edges. Logit
effects: a float64 matmul of the HF modules' own weights (W_out, the final norm's
weight, W_U), not the library's weight readers. One shard or three give the same tables.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from tools.test_neuron_dashboard import (
    all_values,
    assert_quantiles,
    run_model,
    run_tool,
    synthetic_shard,
    window_text,
)

from arrakis_ray.errors import ToolError
from arrakis_ray.models import build_model
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store.manifest import ToolRecord
from arrakis_ray.store.reader import RunReader
from arrakis_ray.store.schemas import load_schema
from arrakis_ray.store.writer import RunWriter
from arrakis_ray.tools.neuron_contexts import sample_hash
from arrakis_ray.tools.neuron_logit_effects import top_effects
from arrakis_ray.tools.runner import make_tool

PAGE = {"layers": [1, 3], "k": 3, "window": 2, "threshold": 0.1}
PAGE |= {"samples": 12, "intervals": 4, "bins": 40, "logit_k": 6}
NEURONS = (0, 9, 200, 511)


@pytest.fixture(scope="module")
def pages(harvested):
    """(harvest result, the tool's tables over the demo run, the run's model)."""
    _, _, result = harvested
    model = run_model(result.run_dir)
    return result, run_tool(result.run_dir, PAGE, model), model


def splitmix_reference(seq: int, pos: int, layer: int, neuron: int) -> int:
    """The documented priority in Python integers."""
    full, golden = 2**64 - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        return z ^ (z >> 31)

    token = mix((seq * golden + pos) & full)
    unit = mix(((layer & full) * golden + neuron) & full)
    return mix(token ^ unit) >> 1


def test_sample_hash_is_splitmix64():
    keys = [(0, 0, 0, 0), (7, 3, 1, 511), (123456789, 23, -1, 5), (2**40, 1, 31, 2**20)]
    for key in keys:
        assert int(sample_hash(*key)) == splitmix_reference(*key)
    grid = sample_hash(np.arange(4)[:, None], np.zeros((4, 1)), 2, np.arange(3)[None, :])
    assert grid.shape == (4, 3) and grid[3, 2] == splitmix_reference(3, 0, 2, 2)


def expected_sample(v, seq, pos, layer, neuron, samples, threshold):
    """Token indices of the bottom-``samples`` active tokens by (priority, seq, pos), in
    activation order (ties: seq, pos)."""
    active = np.flatnonzero(v > threshold)
    prio = sample_hash(seq[active], pos[active], layer, neuron)
    pick = active[np.lexsort((pos[active], seq[active], prio))[:samples]]
    return pick[np.lexsort((pos[pick], seq[pick], v[pick].astype(np.float32)))]


def assert_quantile_rows(mine: pd.DataFrame, v, seq, pos, pick, intervals: int) -> None:
    """``mine`` (one neuron's rows, table order) is the sample ``pick`` in intervals."""
    if len(pick) == 0:  # a silent neuron has no rows
        assert mine.empty
        return
    assert list(zip(mine["seq_id"], mine["pos"], strict=True)) == list(
        zip(seq[pick], pos[pick], strict=True)
    )
    np.testing.assert_array_equal(mine["activation"], v[pick].astype(np.float32))
    m = len(pick)
    assert mine["interval"].to_list() == (np.arange(m) * intervals // m).tolist()
    for _, rows in mine.groupby("interval"):  # a partition in activation order
        assert rows["rank"].to_list() == list(range(1, len(rows) + 1))
        assert (rows["interval_low"] == rows["activation"].min()).all()
        assert (rows["interval_high"] == rows["activation"].max()).all()
    sizes = mine.groupby("interval").size()
    assert sizes.max() - sizes.min() <= 1


def assert_histogram(mine: pd.DataFrame, v: np.ndarray, bins: int) -> None:
    """Exact counts of equal-width bins covering [min, max] as documented."""
    edges = np.r_[mine["bin_low"].to_numpy(), mine["bin_high"].to_numpy()[-1]]
    width = np.diff(edges)
    assert mine["bin"].to_list() == list(range(len(mine)))
    assert (width == width[0]).all() and len(mine) > bins * 32 / 33
    np.testing.assert_array_equal(mine["count"], np.histogram(v, edges)[0])
    assert edges[0] <= v.min() < edges[0] + width[0] / 32
    assert v.max() < edges[-1] <= v.max() + width[0]


def assert_effects(mine: pd.DataFrame, effect: np.ndarray, k: int, vocab) -> None:
    """One neuron's promoted/suppressed rows against its direct effect vector."""
    for direction, sign in (("promoted", -1.0), ("suppressed", 1.0)):
        rows = mine[mine["direction"] == direction]
        order = np.argsort(sign * effect, kind="stable")
        gaps = np.diff(np.sort(sign * effect)[: k + 1])
        assert gaps.min() > 1e-5  # no near-tie: the order is well defined
        assert rows["rank"].to_list() == list(range(1, k + 1))
        assert rows["token_id"].to_list() == order[:k].tolist()
        np.testing.assert_allclose(rows["effect"], effect[order[:k]], rtol=1e-4, atol=1e-5)
        assert rows["token"].to_list() == [vocab[i] for i in order[:k]]


def centred_effects(gamma, w, W_U, layernorm: bool) -> np.ndarray:
    """C_V((gamma * P w) @ W_U), float64."""
    if layernorm:
        w = w - w.mean(dim=-1, keepdim=True)
    effect = (gamma * w) @ W_U
    return (effect - effect.mean(dim=-1, keepdim=True)).numpy()


def test_quantile_contexts_are_a_hash_ordered_sample(pages):
    result, got, _ = pages
    q = got["neuron_quantile_contexts"]
    assert list(q[["layer", "neuron", "interval", "rank"]].itertuples(index=False)) == sorted(
        q[["layer", "neuron", "interval", "rank"]].itertuples(index=False)
    )
    tokens = pd.read_parquet(result.run_dir / "tokens").sort_values(["seq_id", "pos"])
    texts = tokens.groupby("seq_id")["token_text"].apply(list).to_dict()
    for layer in PAGE["layers"]:
        x, keys = all_values(result.run_dir, "mlp_post", layer)
        seq, pos = keys["seq_id"].to_numpy(), keys["pos"].to_numpy()
        # every neuron: min(samples, active tokens) rows, none for a silent neuron
        sizes = q[q.layer == layer].groupby("neuron").size()
        want = np.minimum((x > 0.1).sum(0), 12)
        assert sizes.reindex(range(x.shape[1]), fill_value=0).tolist() == want.tolist()
        for neuron in NEURONS:
            v = x[:, neuron]
            pick = expected_sample(v, seq, pos, layer, neuron, 12, 0.1)
            mine = q[(q.layer == layer) & (q.neuron == neuron)]
            assert_quantile_rows(mine, v, seq, pos, pick, 4)
            assert mine["context"].to_list() == [
                window_text(texts[s], p, 2, " ") for s, p in zip(seq[pick], pos[pick], strict=True)
            ]


def test_histograms_count_every_activation(pages):
    result, got, _ = pages
    h = got["neuron_histograms"]
    assert (h.groupby(["layer", "neuron"])["count"].sum() == result.tokens).all()
    for layer in PAGE["layers"]:
        x, _ = all_values(result.run_dir, "mlp_post", layer)
        for neuron in NEURONS:
            assert_histogram(h[(h.layer == layer) & (h.neuron == neuron)], x[:, neuron], 40)


def test_logit_effects_are_W_out_through_ln_final_to_W_U(pages):
    result, got, model = pages
    e = got["neuron_logit_effects"]
    assert len(e) == 2 * 512 * 2 * 6 and set(e["family"]) == {"mlp_post"}
    vocab = pd.read_parquet(result.run_dir / "vocab.parquet").sort_values("token_id")
    vocab = vocab["token_text"].to_list()
    hf = model.model  # GPT2LMHeadModel: Conv1D c_proj stores W_out as [d_mlp, d_model]
    gamma = hf.transformer.ln_f.weight.detach().double()
    W_U = hf.lm_head.weight.detach().double().T
    for layer in PAGE["layers"]:
        W_out = hf.transformer.h[layer].mlp.c_proj.weight.detach().double()
        direct = centred_effects(gamma, W_out, W_U, layernorm=True)
        for neuron in NEURONS:
            mine = e[(e.layer == layer) & (e.neuron == neuron)]
            assert_effects(mine, direct[neuron], 6, vocab)


def test_logit_effects_rmsnorm_gated_mlp_and_vectors():
    """llama: RMSNorm (no centring), a gated mlp; SAE-like vectors through W_out."""
    model = build_model(
        "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    hf = model.model
    with torch.no_grad():  # a non-trivial final gain
        hf.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 32))
    gamma, W_U = hf.model.norm.weight.detach().double(), hf.lm_head.weight.detach().double().T
    vectors = np.random.default_rng(3).standard_normal((3, 48)).astype(np.float32)
    cols = top_effects(model, "mlp_post", 1, 5, None, vectors, "sae:blocks.1.mlp.hook_post")
    W_out = hf.model.layers[1].mlp.down_proj.weight.detach().double().T  # [d_mlp, d_model]
    direct = centred_effects(gamma, torch.from_numpy(vectors).double() @ W_out, W_U, False)
    table = pd.DataFrame(cols)
    assert set(table["family"]) == {"sae:blocks.1.mlp.hook_post"} and set(table["layer"]) == {1}
    for unit in range(3):
        assert_effects(table[table.neuron == unit], direct[unit], 5, [None] * 64)
    # residual dimensions: e_i through the norm's gain
    table = pd.DataFrame(top_effects(model, "resid_post", 0, 5, np.array(["t"] * 64)))
    direct = centred_effects(gamma, torch.eye(32, dtype=torch.float64), W_U, False)
    for dim in (0, 31):
        assert_effects(table[table.neuron == dim], direct[dim], 5, ["t"] * 64)
    assert top_effects(model, "mlp_pre", 0, 5, None) is None  # no linear path


def test_one_shard_or_three_give_the_same_tables():
    rng = np.random.default_rng(4)
    x = np.column_stack(
        [
            rng.lognormal(0.0, 3.0, 600) * rng.choice([-1, 1], 600),  # ranges differ by shard
            np.round(rng.standard_normal(600), 1),  # ties
            np.where(rng.random(600) < 0.1, rng.exponential(1.0, 600), 0.0),  # sparse
            np.full(600, 0.25),  # constant
        ]
    ).astype(np.float32)
    vocab = [" the", " cat", " sat", "s", " on", "."]
    seqs = [list(range(s, s + 10)) for s in (0, 20, 40)]
    params = {"k": 5, "window": 2, "samples": 9, "intervals": 3, "bins": 16, "logit_k": 0}
    tool = make_tool("neuron_dashboard", params | {"threshold": 0.05})

    def tables(shards):
        partials: dict[str, list] = {}
        for inputs in shards:
            for name, table in tool.compute_shard(inputs).items():
                partials.setdefault(name, []).append(table)
        return {k: v.to_pandas() for k, v in tool.reduce(partials, shards[0].manifest).items()}

    one = tables([synthetic_shard(x, sum(seqs, []), vocab)])
    three = tables([synthetic_shard(x[i * 200 : i * 200 + 200], seqs[i], vocab) for i in range(3)])
    for name in ("neuron_top_contexts", "neuron_quantile_contexts", "neuron_histograms"):
        pd.testing.assert_frame_equal(one[name], three[name])
    pd.testing.assert_frame_equal(one["neuron_stats"], three["neuron_stats"], rtol=1e-12)
    h = three["neuron_histograms"]
    for neuron in range(3):
        assert_histogram(h[h.neuron == neuron], x[:, neuron].astype(np.float64), 16)
    assert h[h.neuron == 3]["count"].to_list() == [600]  # a constant: one bin
    seq = np.repeat(np.r_[tuple(seqs)], 20)
    pos = np.tile(np.arange(20), 30)
    q = three["neuron_quantile_contexts"]
    for neuron in range(4):
        v = x[:, neuron].astype(np.float64)
        pick = expected_sample(v, seq, pos, 0, neuron, 9, 0.05)
        assert_quantile_rows(q[q.neuron == neuron], v, seq, pos, pick, 3)


def test_sae_features_source(pages, tmp_path):
    """Features of a (synthetic) SAE result: absent rows are zeros, neuron = feature;
    logit effects from the decoder directions."""
    result, _, model = pages
    store = tmp_path / "store"
    run = store / "runs" / result.run_id
    run.mkdir(parents=True)
    shutil.copy(result.run_dir.parents[1] / store_layout.STORE_MARKER, store)
    for part in ("tokens", "completions"):
        shutil.copytree(result.run_dir / part, run / part)
    for part in ("manifest.json", "vocab.parquet"):
        shutil.copy(result.run_dir / part, run / part)
    layout = store_layout.RunLayout(store, result.run_id)
    manifest = store_manifest.read_manifest(layout)
    params = {"source": "sae_features", "k": 5, "window": 1, "samples": 7, "intervals": 3}
    sae = make_tool("neuron_dashboard", params | {"bins": 10, "logit_k": 4})
    inputs = RunReader(layout, manifest)
    with pytest.raises(ToolError, match="run superposition_disentangler first"):
        sae.compute_run(inputs, model)
    tokens = pd.read_parquet(run / "tokens").sort_values(["seq_id", "pos"])
    n_features, rng = 6, np.random.default_rng(2)
    dense = np.where(
        rng.random((len(tokens), n_features)) < [0.5, 0.1, 0.0, 0.01, 0.9, 0.3],
        rng.exponential(2.0, (len(tokens), n_features)),
        0.0,
    ).astype(np.float32)
    dense[:40, 4] = 50.0  # ties, above every other value
    r, f = np.nonzero(dense)
    features = pa.table(
        {
            "run_id": [result.run_id] * len(r),
            "hook": ["blocks.2.hook_resid_post"] * len(r),
            "seq_id": tokens["seq_id"].to_numpy()[r],
            "pos": tokens["pos"].to_numpy()[r].astype(np.int32),
            "feature": f.astype(np.int32),
            "activation": dense[r, f],
        }
    )
    write(layout, "sae_features", features)
    metrics = {f.name: [None] for f in load_schema("result.sae_metrics").arrow()}
    metrics.update(
        run_id=[result.run_id], hook=["blocks.2.hook_resid_post"], layer=[2], kind=["topk"],
        width=[128], n_features=[n_features], epochs=[1], n_tokens=[len(tokens)], mse=[0.0],
        l0=[1.0], dead_features=[1], train_loss=[0.0], weights_path=["x"], seconds=[0.0],
    )  # fmt: skip
    write(layout, "sae_metrics", pa.table(metrics))
    with pytest.raises(ToolError, match="no sae_directions results"):
        sae.compute_run(inputs, model)
    decoder = rng.standard_normal((n_features, 128))
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    write(layout, "sae_directions", directions_table(result.run_id, decoder))

    assert sae.scope == "run" and sae.required_hooks(manifest) == []
    assert sae.needs_weights and not sae.reduce_needs_weights
    got = {k: v.to_pandas() for k, v in sae.compute_run(inputs, model).items()}
    stats, top = got["neuron_stats"], got["neuron_top_contexts"]
    assert stats["neuron"].to_list() == list(range(n_features))
    assert set(stats["family"]) == {"sae:blocks.2.hook_resid_post"} and set(stats["layer"]) == {2}
    seq, pos = tokens["seq_id"].to_numpy(), tokens["pos"].to_numpy()
    for feature in range(n_features):
        v = dense[:, feature].astype(np.float64)
        row = stats.iloc[feature]
        assert row["n_tokens"] == len(v) and row["freq"] == (v > 0).mean() and row["max"] == v.max()
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-15)
        assert_quantiles(row, v, 0.01)
        active = np.flatnonzero(v > 0)
        order = active[np.lexsort((pos[active], seq[active], -v[active]))][:5]
        mine = top.query("neuron == @feature").sort_values("rank")
        assert list(zip(mine["seq_id"], mine["pos"], strict=True)) == list(
            zip(seq[order], pos[order], strict=True)
        )
    assert top.query("neuron == 2").empty  # a dead feature has no contexts
    q, h = got["neuron_quantile_contexts"], got["neuron_histograms"]
    assert q.query("neuron == 2").empty
    for feature in range(n_features):
        v = dense[:, feature].astype(np.float64)
        pick = expected_sample(v, seq, pos, 2, feature, 7, 0.0)
        assert_quantile_rows(q[q.neuron == feature], v, seq, pos, pick, 3)
        if feature != 2:
            assert_histogram(h[h.neuron == feature], v, 10)
    assert h[h.neuron == 2]["count"].to_list() == [len(tokens)]  # all zero: one bin
    # logit effects: the unit decoder rows through ln_final (LayerNorm: centred) to W_U
    e, hf = got["neuron_logit_effects"], model.model
    assert set(e["family"]) == {"sae:blocks.2.hook_resid_post"} and len(e) == 6 * 2 * 4
    gamma = hf.transformer.ln_f.weight.detach().double()
    direct = centred_effects(
        gamma, torch.from_numpy(decoder), hf.lm_head.weight.detach().double().T, True
    )
    vocab = pd.read_parquet(run / "vocab.parquet").sort_values("token_id")["token_text"]
    for feature in range(n_features):
        assert_effects(e[e.neuron == feature], direct[feature], 4, vocab.to_list())


def write(layout, output: str, table: pa.Table) -> None:
    """A result as a tool writes it: its file, and a record listing it."""
    schema = load_schema(f"result.{output}")
    writer = RunWriter.for_layout(layout)
    entry = writer.write_result(
        output, 0, table.cast(schema.arrow()), schema.arrow(), schema.version
    )
    record = ToolRecord({}, (output,), schema.version, 1, entry.rows, 0.0, "2026-01-01T00:00:00Z")
    writer.record_tool(output, replace(record, files=(entry,)))


def directions_table(run_id: str, decoder: np.ndarray) -> pa.Table:
    """results_sae_directions rows (long form) of decoder rows [features, width]."""
    m, d = decoder.shape
    return pa.table(
        {
            "run_id": [run_id] * (m * d),
            "hook": ["blocks.2.hook_resid_post"] * (m * d),
            "feature": np.repeat(np.arange(m, dtype=np.int32), d),
            "dim": np.tile(np.arange(d, dtype=np.int32), m),
            "value": decoder.astype(np.float32).ravel(),
        }
    )
