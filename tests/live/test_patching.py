"""Activation patching and attribution patching, against values known by construction."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from support import REPO, with_run_id

from arrakis_ray.config import ModelConfig
from arrakis_ray.errors import ToolError
from arrakis_ray.live.holder import ModelHolder
from arrakis_ray.live.model import LiveModel, local_model
from arrakis_ray.live.prompts import read_prompts
from arrakis_ray.live.stage_worker import StageWorker
from arrakis_ray.tools import patching
from arrakis_ray.tools.runner import make_tool

PAIRS = REPO / "pipelines" / "data" / "facts_pairs.jsonl"


def _pairs(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    clean, corrupted, answer, wrong = (list(c) for c in zip(*rows, strict=True))
    table = pa.table({"clean": clean, "corrupted": corrupted, "answer": answer, "wrong": wrong})
    return with_run_id(table.append_column("item", pa.array(range(len(rows)), pa.int64())))


def _frame(table: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(table).sort("item", "family", "layer", "pos", "head", nulls_last=True)


FRANCE = ("the capital of france is", "the capital of germany is", "paris", "berlin")
SPAIN = ("the capital of spain is", "the capital of italy is", "madrid", "rome")


@pytest.fixture(scope="module")
def demo_pairs():
    return with_run_id(read_prompts(PAIRS, patching.PAIR_COLUMNS)).slice(0, 6)


@pytest.fixture(scope="module")
def one_head_model():
    """A 2-layer GPT-2 wired so the answer reaches the last position through one head.

    Every MLP and every head but layer 1's head 0 writes nothing (their output
    projections are zero), so the last position's residual is its own embedding plus
    head 1.0's output, and the clean and corrupted prompts differ only at the subject
    (position 4). The test changes its own copy of the weights; the tools never do.
    """
    config = ModelConfig(
        arch="gpt2",
        config={"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 386, "n_positions": 32},
        tokenizer="zoo:facts-gpt2",
        seed=3,
    )
    holder = ModelHolder(config)
    blocks = holder.model.model.transformer.h
    d_head = 16
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
            block.attn.c_proj.bias.zero_()
            keep = 0 if layer == 1 else None  # Conv1D weight: [in, out]; rows = heads' dims
            for head in range(2):
                if head != keep:
                    block.attn.c_proj.weight[head * d_head : (head + 1) * d_head].zero_()
        # make the one path strong: random init (std 0.02) moves the logits by ~1e-4
        blocks[1].attn.c_attn.weight[:, 64 : 64 + d_head] *= 10  # head 0's values
        blocks[1].attn.c_proj.weight *= 100
    return LiveModel([StageWorker(holder)])


def test_patching_restores_exactly_where_the_answer_flows_and_nowhere_else(one_head_model):
    result = _frame(make_tool("activation_patching").compute_live(_pairs([FRANCE]), one_head_model))
    first = result.row(0, named=True)
    assert abs(first["clean_logit_diff"] - first["corrupted_logit_diff"]) > 1e-3
    restoring = {  # (family, layer, pos, head): everything downstream of these is clean
        ("resid_pre", 0, 4, None),
        ("resid_post", 0, 4, None),
        ("resid_pre", 1, 4, None),
        ("attn_z", 1, None, 0),
        ("attn_out", 1, 5, None),
        ("resid_post", 1, 5, None),
    }
    for row in result.iter_rows(named=True):
        key = (row["family"], row["layer"], row["pos"], row["head"])
        want = 1.0 if key in restoring else 0.0
        assert row["metric"] == pytest.approx(want, abs=1e-4), key
    assert len(result) == 2 * (4 * 6 + 2)  # 2 layers x (4 dense families x 6 pos + 2 heads)


def test_batched_rows_equal_one_forward_per_intervention(demo_live, demo_pairs):
    tool = "activation_patching"
    batched = make_tool(tool, {"max_batch": 37}).compute_live(demo_pairs, demo_live)
    naive = make_tool(tool, {"batched": False}).compute_live(demo_pairs, demo_live)
    a, b = _frame(batched), _frame(naive)
    assert a.select("item", "family", "layer", "pos", "head").equals(
        b.select("item", "family", "layer", "pos", "head")
    )
    np.testing.assert_allclose(a["logit_diff"], b["logit_diff"], atol=1e-4)


def test_patched_logit_diff_equals_a_hand_made_intervention(demo_live):
    """Three components, each re-run by hand with HookedModel.run_with_cache."""
    result = _frame(make_tool("activation_patching").compute_live(_pairs([SPAIN]), demo_live))
    hm = demo_live.meta
    clean_ids, corrupt_ids = (torch.tensor([demo_live.encode(t)]) for t in SPAIN[:2])
    answer, wrong = demo_live.token_id("madrid"), demo_live.token_id("rome")
    for family, layer, pos, head in [
        ("resid_pre", 2, 4, None),
        ("mlp_out", 0, 4, None),
        ("attn_z", 3, None, 1),
    ]:
        hook = patching.family_hook(family, layer)
        _, clean = hm.run_with_cache(clean_ids, hooks=[hook])

        def patch(act, _name, value=clean[hook], pos=pos, head=head):
            act = act.clone()
            if head is None:
                act[:, pos] = value[:, pos]
            else:
                act[:, :, head] = value[:, :, head]
            return act

        logits, _ = hm.run_with_cache(corrupt_ids, hooks=["logits"], interventions={hook: patch})
        want = float(logits[0, -1, answer] - logits[0, -1, wrong])
        row = result.filter(
            (pl.col("family") == family)
            & (pl.col("layer") == layer)
            & (pl.col("pos").eq_missing(pos))
            & (pl.col("head").eq_missing(head))
        )
        assert row["logit_diff"][0] == pytest.approx(want, abs=1e-4), (family, layer)


@pytest.mark.parametrize("tool", ["activation_patching", "attribution_patching"])
def test_two_stages_equal_the_whole_model(demo_live, demo_staged, demo_pairs, tool):
    whole = _frame(make_tool(tool).compute_live(demo_pairs, demo_live))
    staged = _frame(make_tool(tool).compute_live(demo_pairs, demo_staged))
    assert whole.select("family", "layer", "pos", "head").equals(
        staged.select("family", "layer", "pos", "head")
    )
    np.testing.assert_allclose(whole["logit_diff"], staged["logit_diff"], atol=1e-4)


def test_attribution_is_the_directional_derivative(demo_live):
    """AtP's estimate of a component = the finite difference of the logit difference
    along (clean - corrupted) at that component, from two forwards (no gradients)."""
    table = make_tool("attribution_patching").compute_live(_pairs([FRANCE]), demo_live)
    atp = _frame(table)
    hm = demo_live.meta
    clean_ids, corrupt_ids = (torch.tensor([demo_live.encode(t)]) for t in FRANCE[:2])
    answer, wrong = demo_live.token_id("paris"), demo_live.token_id("berlin")
    eps = 0.05  # central difference: float32 rounding dominates below ~1e-2
    for family, layer, pos, head in [
        ("resid_pre", 3, 4, None),
        ("attn_out", 1, 4, None),
        ("mlp_out", 2, 5, None),
        ("attn_z", 2, None, 1),  # a head: every position at once
    ]:
        hook = patching.family_hook(family, layer)
        _, clean = hm.run_with_cache(clean_ids, hooks=[hook])
        _, corrupt = hm.run_with_cache(corrupt_ids, hooks=[hook])
        where = (slice(None), pos) if head is None else (slice(None), slice(None), head)
        step = (clean[hook] - corrupt[hook])[where].double()

        def nudge(act, _name, scale=0.0, where=where, step=step):
            act = act.clone()
            act[where] = (act[where].double() + scale * step).to(act.dtype)
            return act

        lds = []
        for scale in (-eps, eps):
            logits, _ = hm.run_with_cache(
                corrupt_ids,
                hooks=["logits"],
                interventions={hook: lambda a, n, s=scale: nudge(a, n, s)},
            )
            lds.append(float(logits[0, -1, answer] - logits[0, -1, wrong]))
        derivative = (lds[1] - lds[0]) / (2 * eps)
        row = atp.filter(
            (pl.col("family") == family)
            & (pl.col("layer") == layer)
            & pl.col("pos").eq_missing(pos)
            & pl.col("head").eq_missing(head)
        ).row(0, named=True)
        estimate = row["logit_diff"] - row["corrupted_logit_diff"]
        assert estimate == pytest.approx(derivative, rel=2e-2, abs=2e-3), (family, layer)


def _correlations(model: LiveModel, pairs: pa.Table) -> dict[str, float]:
    exact = _frame(make_tool("activation_patching").compute_live(pairs, model))
    atp = _frame(make_tool("attribution_patching").compute_live(pairs, model))
    found = {}
    for family in ("attn_z", "resid_pre"):
        # the effects (patched minus corrupted): the pairs' own logit differences, common
        # to both sides, would inflate a correlation of raw logit differences
        x, y = (
            t.filter(pl.col("family") == family)
            .select(pl.col("logit_diff") - pl.col("corrupted_logit_diff"))
            .to_series()
            .to_numpy()
            for t in (exact, atp)
        )
        found[family] = float(np.corrcoef(x, y)[0, 1])
    return found


@pytest.mark.parametrize("arch", ["demo", "llama", "gpt-neox", "qwen2"])
def test_attribution_heads_correlate_with_exact_patching(arch, demo_live, demo_pairs):
    """The issue's bar: per-head AtP vs exact patching, Pearson >= 0.9 on the effects.
    The residual stream's figure is printed, not bounded: AtP is known to be worse there."""
    if arch == "demo":
        model = demo_live
    else:
        size = {"vocab_size": 386, "num_hidden_layers": 3, "hidden_size": 64}
        model = local_model(ModelConfig(arch=arch, config=size, tokenizer="zoo:facts-gpt2"))
    found = _correlations(model, demo_pairs)
    print(f"{arch}: AtP vs exact, Pearson: {found}")
    assert found["attn_z"] >= 0.9


def test_pairs_of_different_lengths_are_refused_naming_the_row(demo_live):
    longer = ("the capital of france is", "the capital city of spain is", "paris", "madrid")
    bad = _pairs([FRANCE, longer])
    with pytest.raises(ToolError, match="prompts row 2: clean and corrupted prompts differ"):
        make_tool("activation_patching").compute_live(bad, demo_live)


def test_an_answer_of_several_tokens_is_refused(demo_live):
    bad = _pairs([("the capital of france is", "the capital of spain is", "paris city", "madrid")])
    with pytest.raises(ToolError, match="prompts row 1: answer 'paris city' is not a single token"):
        make_tool("attribution_patching").compute_live(bad, demo_live)


def test_unknown_family_is_refused():
    with pytest.raises(ToolError, match="families \\['resid_mid'\\] unknown"):
        make_tool("activation_patching", {"families": ["resid_mid"]})


def test_analyze_fans_pairs_out_over_ray_actors(harvested, demo_live, tmp_path):
    """Through Ray on a harvested run: the stored rows equal the tools run here."""
    import pyarrow.parquet as pq

    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.runner import analyze

    run_dir, run_id = harvested[2].run_dir, harvested[2].run_id
    pairs = read_prompts(PAIRS, patching.PAIR_COLUMNS).slice(0, 24)
    pq.write_table(pairs.drop(["item"]), tmp_path / "pairs.parquet")
    n_pos = [len(demo_live.encode(text)) for text in pairs.column("clean").to_pylist()]
    for tool in ("activation_patching", "attribution_patching"):
        params = {"prompts": str(tmp_path / "pairs.parquet"), "families": ["attn_z", "resid_pre"]}
        done = analyze(run_dir, tool, params)
        assert done.rows == sum(4 * (4 + n) for n in n_pos)  # layers x (heads + positions)
        stored = _frame(RunReader.open(run_dir).result(tool))
        want = _frame(make_tool(tool, params).compute_live(with_run_id(pairs, run_id), demo_live))
        assert stored.select("run_id", "item", "family", "layer", "pos", "head").equals(
            want.select("run_id", "item", "family", "layer", "pos", "head")
        )
        np.testing.assert_allclose(stored["logit_diff"], want["logit_diff"], atol=1e-4)


def test_a_failed_rerun_leaves_the_previous_results_whole(harvested, tmp_path):
    """Bad pairs fail inside an actor, after the call has started writing: the earlier
    call's record and files stay, and the failed call leaves no file behind."""
    import pyarrow.parquet as pq

    from arrakis_ray.errors import ArrakisError
    from arrakis_ray.store.manifest import read_tool_records
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.runner import analyze

    run_dir = harvested[2].run_dir
    good = read_prompts(PAIRS, patching.PAIR_COLUMNS).slice(0, 10).drop(["item"])
    bad = pa.concat_tables(
        [
            good,
            _pairs([FRANCE[:1] + ("the capital city of spain is",) + FRANCE[2:]]).select(
                good.column_names
            ),
        ]
    )
    pq.write_table(good, tmp_path / "good.parquet")
    pq.write_table(bad, tmp_path / "bad.parquet")
    params = {"families": ["attn_z"], "max_batch": 64}
    analyze(run_dir, "activation_patching", {**params, "prompts": str(tmp_path / "good.parquet")})
    reader = RunReader.open(run_dir)
    before = reader.result("activation_patching")
    record = read_tool_records(reader.layout)["activation_patching"]
    with pytest.raises(ArrakisError, match="prompts row 11: clean and corrupted prompts differ"):
        analyze(
            run_dir, "activation_patching", {**params, "prompts": str(tmp_path / "bad.parquet")}
        )
    assert read_tool_records(reader.layout)["activation_patching"] == record
    assert reader.result("activation_patching").equals(before)
    written = sorted(
        p.relative_to(run_dir).as_posix() for p in (run_dir / "results").rglob("*.parquet")
    )
    assert written == sorted(
        e.path for r in read_tool_records(reader.layout).values() for e in r.files
    )
