"""Neuron dashboard: streamed, reduced tables equal a direct computation over every value.

The direct side loads every stored value of a layer at once (test-side only) and takes
frequencies, means and maxima with numpy, percentiles as exact order statistics of the
sorted values, and top-k by sorting (value desc, seq_id, pos); contexts are rebuilt from
the tokens table. The tool only ever sees one shard.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runs import shard_plan, synthetic_manifest, synthetic_shape
from support import family_table

from arrakis_ray.errors import ToolError
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import ShardInputs
from arrakis_ray.tools.neuron_dashboard import NeuronDashboard
from arrakis_ray.tools.neuron_logit_effects import top_effects
from arrakis_ray.tools.runner import analyze, make_tool, shard_inputs

PCTS = (50, 90, 99)


def run_tool(run_dir, params: dict, model=None) -> dict[str, pd.DataFrame]:
    """compute_shard on every stored shard, then reduce: the runner's path, without Ray."""
    layout = store_layout.RunLayout(run_dir.parents[1], run_dir.name)
    manifest = store_manifest.read_manifest(layout)
    tool = make_tool("neuron_dashboard", params)
    partials: dict[str, list] = {}
    for shard in sorted(layout.completed_shards()):
        inputs = shard_inputs(tool, RunReader(layout, manifest), shard)
        for name, table in tool.compute_shard(inputs).items():
            partials.setdefault(name, []).append(table)
    return {k: v.to_pandas() for k, v in tool.reduce(partials, manifest, model).items()}


def run_model(run_dir):
    """The run's model, loaded as the runner's reduce task loads it."""
    from arrakis_ray.harvest.model_source import load_model

    return load_model(RunReader.open(run_dir).manifest.model_config)


def all_values(run_dir, family: str, layer: int) -> tuple[np.ndarray, pd.DataFrame]:
    """([tokens, width] float64 values, their (seq_id, pos)) of one layer of the run."""
    df = family_table(run_dir, family).to_pandas()
    df = df[df.layer == layer].sort_values(["seq_id", "pos"]).reset_index(drop=True)
    dims = [c for c in df.columns if re.fullmatch(r"d\d+", c)]
    return df[dims].to_numpy(np.float64), df[["seq_id", "pos"]]


def order_statistic(values: np.ndarray, pct: int) -> float:
    """x_(r), r = ceil(pct n / 100), 1-based, of the sorted values."""
    rank = max(1, -(-pct * len(values) // 100))
    return float(np.sort(values)[rank - 1])


def assert_quantiles(row, values: np.ndarray, accuracy: float) -> None:
    for pct in PCTS:
        exact = order_statistic(values, pct)
        bound = max(accuracy * abs(exact), 1e-6) * (1 + 1e-9)
        assert abs(row[f"p{pct}"] - exact) <= bound, (pct, row[f"p{pct}"], exact)


def window_text(texts: list[str], pos: int, width: int, sep: str) -> str:
    lo, hi = max(0, pos - width), min(len(texts) - 1, pos + width)
    words = [f"[{t}]" if i == pos else t for i, t in enumerate(texts) if lo <= i <= hi]
    return ("…" + sep if lo else "") + sep.join(words) + (sep + "…" if hi < len(texts) - 1 else "")


def test_dashboard_matches_direct_computation(harvested):
    _, _, result = harvested
    params = {"layers": [0, 3], "k": 7, "window": 3, "threshold": 0.1, "logit_k": 0}
    got = run_tool(result.run_dir, params)
    tokens = pd.read_parquet(result.run_dir / "tokens").sort_values(["seq_id", "pos"])
    texts = tokens.groupby("seq_id")["token_text"].apply(list).to_dict()
    stats, top = got["neuron_stats"], got["neuron_top_contexts"]
    assert len(stats) == 2 * 512 and len(top) == 2 * 512 * 7
    assert list(stats[["layer", "neuron"]].itertuples(index=False)) == sorted(
        stats[["layer", "neuron"]].itertuples(index=False)
    )
    for layer in (0, 3):
        x, keys = all_values(result.run_dir, "mlp_post", layer)
        for neuron in (0, 7, 123, 511):
            v = x[:, neuron]
            row = stats.query("layer == @layer and neuron == @neuron").iloc[0]
            assert row["family"] == "mlp_post" and row["n_tokens"] == len(v) == result.tokens
            assert row["freq"] == (v > 0.1).sum() / len(v)
            assert row["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
            assert row["max"] == v.max()
            assert_quantiles(row, v, 0.01)
            # top-k: value desc, then seq_id, pos ascending
            order = np.lexsort((keys["pos"], keys["seq_id"], -v))[:7]
            mine = top.query("layer == @layer and neuron == @neuron").sort_values("rank")
            assert mine["rank"].to_list() == list(range(1, 8))
            assert mine["seq_id"].to_list() == keys["seq_id"].to_numpy()[order].tolist()
            assert mine["pos"].to_list() == keys["pos"].to_numpy()[order].tolist()
            np.testing.assert_array_equal(mine["activation"], v[order].astype(np.float32))
            # the zoo vocabulary is word-level: words joined with spaces
            want = [
                window_text(texts[s], p, 3, " ")
                for s, p in zip(mine["seq_id"], mine["pos"], strict=True)
            ]
            assert mine["context"].to_list() == want


def synthetic_shard(values: np.ndarray, seq_ids: list[int], vocab: list[str]) -> ShardInputs:
    """A one-layer mlp_post shard: sequence s holds len(values) // len(seq_ids) tokens."""
    n, width = values.shape
    per = n // len(seq_ids)
    seq = np.repeat(np.asarray(seq_ids, np.int64), per)
    pos = np.tile(np.arange(per, dtype=np.int32), len(seq_ids))
    ids = (seq * 7 + pos) % len(vocab)
    table = pa.table(
        {
            "run_id": ["synthetic"] * n,
            "layer": pa.array(np.zeros(n, np.int16)),
            "seq_id": seq,
            "pos": pos,
            **{f"d{i}": values[:, i].astype(np.float32) for i in range(width)},
        }
    )
    tokens = pa.table({"seq_id": seq, "pos": pos, "token_text": [vocab[i] for i in ids]})
    manifest = synthetic_manifest(
        "synthetic", ["blocks.0.mlp.hook_post"], synthetic_shape(n_layers=1), shard_plan(1, 1)
    )
    # rows arrive shuffled: the tool must not rely on the stored order
    perm = np.random.default_rng(0).permutation(n)
    return ShardInputs(
        "synthetic",
        seq_ids[0],
        manifest,
        {"mlp_post": table.take(perm)},
        tokens.take(perm),
        np.asarray(vocab, dtype=object),
    )


def test_ties_heavy_tails_and_shard_merging():
    rng = np.random.default_rng(1)
    n, width = 600, 5
    x = np.zeros((n, width))
    x[:, 0] = rng.lognormal(0.0, 3.0, n) * rng.choice([-1, 1], n)  # 1e-4 .. 1e4, both signs
    x[:, 1] = np.round(rng.standard_normal(n), 1)  # many ties
    x[:, 2] = 0.0  # one value
    x[:, 3] = np.where(rng.random(n) < 0.05, rng.exponential(1.0, n), 0.0)  # sparse
    x[:, 4] = rng.standard_normal(n) * 1e-7  # all in the zero bucket
    x = x.astype(np.float32).astype(np.float64)
    vocab = [" the", " cat", " sat", "s", " on", "."]  # GPT-2 style: texts concatenated
    tool = make_tool(
        "neuron_dashboard", {"k": 25, "window": 2, "quantile_accuracy": 0.02, "logit_k": 0}
    )
    shards = [
        synthetic_shard(x[i : i + 200], [i // 10 + j for j in range(10)], vocab)
        for i in (0, 200, 400)
    ]
    partials: dict[str, list] = {}
    for inputs in shards:
        for name, table in tool.compute_shard(inputs).items():
            partials.setdefault(name, []).append(table)
    got = {k: v.to_pandas() for k, v in tool.reduce(partials, shards[0].manifest).items()}
    seq = np.concatenate([np.repeat(np.arange(i // 10, i // 10 + 10), 20) for i in (0, 200, 400)])
    pos = np.tile(np.arange(20), 30)
    for neuron in range(width):
        v = x[:, neuron]
        row = got["neuron_stats"].query("neuron == @neuron").iloc[0]
        assert row["freq"] == (v > 0).mean() and row["max"] == v.max()
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-15)
        assert_quantiles(row, v, 0.02)
        order = np.lexsort((pos, seq, -v))[:25]
        mine = got["neuron_top_contexts"].query("neuron == @neuron").sort_values("rank")
        assert list(zip(mine["seq_id"], mine["pos"], strict=True)) == list(
            zip(seq[order], pos[order], strict=True)
        )
    # contexts of a GPT-2 style vocabulary concatenate the texts
    first = got["neuron_top_contexts"].iloc[0]
    words = [vocab[(first["seq_id"] * 7 + p) % len(vocab)] for p in range(20)]
    p = first["pos"]
    lo, hi = max(0, p - 2), min(19, p + 2)
    want = "".join(f"[{w}]" if i == p else w for i, w in enumerate(words) if lo <= i <= hi)
    assert first["context"] == ("…" if lo else "") + want + ("…" if hi < 19 else "")


def test_bad_params_are_refused(harvested):
    with pytest.raises(ToolError, match="family 'mlp_pots'"):
        make_tool("neuron_dashboard", {"family": "mlp_pots"})
    with pytest.raises(ToolError, match="k must be"):
        make_tool("neuron_dashboard", {"k": 0})
    with pytest.raises(ToolError, match="source"):
        make_tool("neuron_dashboard", {"source": "saes"})
    with pytest.raises(ToolError, match="intervals <= samples"):
        make_tool("neuron_dashboard", {"samples": 4, "intervals": 6})
    with pytest.raises(ToolError, match="bins must be"):
        make_tool("neuron_dashboard", {"bins": 0})
    with pytest.raises(ToolError, match="logit_k"):
        make_tool("neuron_dashboard", {"logit_k": -1})
    with pytest.raises(ToolError, match="SAE features are >= 0"):
        make_tool("neuron_dashboard", {"source": "sae_features", "threshold": -0.5})
    with pytest.raises(ToolError, match="needs the model's weights"):  # reduce without it
        make_tool("neuron_dashboard", {})._logit_effects(None, "r", [("mlp_post", 0, None, None)])
    # the weights are loaded only where they are used, and only when asked for
    assert make_tool("neuron_dashboard", {}).reduce_needs_weights
    assert not make_tool("neuron_dashboard", {"logit_k": 0}).reduce_needs_weights
    _, _, result = harvested
    manifest = store_manifest.read_manifest(
        store_layout.RunLayout(result.run_dir.parents[1], result.run_id)
    )
    with pytest.raises(ToolError, match=r"layers \[4\]"):
        make_tool("neuron_dashboard", {"layers": [4]}).required_hooks(manifest)


def test_runner_and_sql_lookup(harvested):
    _, store, result = harvested
    params = {"layers": [1, 2], "k": 4, "window": 2, "samples": 6, "intervals": 3}
    done = analyze(result.run_dir, "neuron_dashboard", params | {"bins": 8, "logit_k": 3})
    # a feature page: one lookup per table by (run_id, family, layer, neuron)
    page = {
        output: f"SELECT * FROM results_{output} WHERE run_id = '{result.run_id}' "
        "AND family = 'mlp_post' AND layer = 2 AND neuron = 123"
        for output in NeuronDashboard.outputs
    }
    with Store(store) as db:
        counts = {
            output: db.sql(
                f"SELECT count(*) AS n FROM results_{output} WHERE run_id = '{result.run_id}'"
            )["n"][0]
            for output in NeuronDashboard.outputs
        }
        got = {output: db.sql(query) for output, query in page.items()}
        plans = {o: "\n".join(db.sql(f"EXPLAIN {q}")["explain_value"]) for o, q in page.items()}
    assert done.shards == 3 and done.rows == sum(counts.values())
    assert counts["neuron_stats"] == 2 * 512 and counts["neuron_logit_effects"] == 2 * 512 * 6
    assert got["neuron_histograms"]["count"].sum() == result.tokens
    x, keys = all_values(result.run_dir, "mlp_post", 2)
    assert got["neuron_quantile_contexts"].height == min(6, int((x[:, 123] > 0).sum()))
    # the reduce task loaded the model: its effects equal an in-process computation
    vocab = RunReader.open(result.run_dir).vocab
    want = top_effects(run_model(result.run_dir), "mlp_post", 2, 3, vocab)
    effects = got["neuron_logit_effects"].sort(["direction", "rank"])
    assert effects["token_id"].to_list() == want["token_id"][123 * 6 : 124 * 6].tolist()
    assert effects["token"].to_list() == vocab[effects["token_id"].to_numpy()].tolist()
    for output, plan in plans.items():  # the key filters reach the scan
        assert re.search(r"Filters:.*layer\s*=\s*2", plan, re.S) and "neuron" in plan, output
    lookup = (
        "SELECT rank, seq_id, pos, activation, context FROM results_neuron_top_contexts "
        f"WHERE run_id = '{result.run_id}' AND layer = 2 AND neuron = 123 ORDER BY rank"
    )
    with Store(store) as db:
        rows = db.sql(lookup)
        stats = db.sql(
            "SELECT * FROM results_neuron_stats WHERE layer = 2 AND neuron = 123 "
            f"AND run_id = '{result.run_id}'"
        )
        macro = [
            db.sql(f"SELECT context FROM context_window('{result.run_id}', {s}, {p}, 2)")[
                "context"
            ][0]
            for s, p in zip(rows["seq_id"], rows["pos"], strict=True)
        ]
    order = np.lexsort((keys["pos"], keys["seq_id"], -x[:, 123]))[:4]
    assert rows["rank"].to_list() == [1, 2, 3, 4]
    assert rows["seq_id"].to_list() == keys["seq_id"].to_numpy()[order].tolist()
    assert rows["pos"].to_list() == keys["pos"].to_numpy()[order].tolist()
    assert rows["context"].to_list() == macro  # the tool and the SQL macro agree
    assert stats["max"][0] == x[:, 123].max() and stats["n_tokens"][0] == result.tokens
    # the scans the filters reach have min/max statistics on the keys
    files = RunReader.open(result.run_dir).manifest.results["neuron_dashboard"].files
    for output in NeuronDashboard.outputs:
        (written,) = [e.path for e in files if e.path.startswith(f"results/{output}/")]
        meta = pq.ParquetFile(result.run_dir / written)
        names = meta.schema_arrow.names
        group = meta.metadata.row_group(0)
        for key in ("layer", "neuron"):
            assert group.column(names.index(key)).statistics.has_min_max, (output, key)
