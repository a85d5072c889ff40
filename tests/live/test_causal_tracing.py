"""Causal tracing: values known by construction, one cell recomputed by hand, Ray = local."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from support import with_run_id

from arrakis_ray.errors import DataError, ToolError
from arrakis_ray.reports.tracing_charts import (
    tracing_heatmap,
    tracing_heatmaps,
    tracing_role_heatmap,
)
from arrakis_ray.tools.causal_tracing import (
    CausalTracing,
    embedding_std,
    position_roles,
    subject_noise,
    window_of,
)
from arrakis_ray.tools.runner import analyze, make_tool

TOOL = "causal_tracing"
FAST = {"samples": 3, "window": 1}  # window 1: each mlp/attn cell is its own layer


def trace(model, items, prepared=None, **params):
    tool = make_tool(CausalTracing, {**FAST, **params})
    out = tool.compute_live(items, model, prepared)
    return out["causal_tracing"].to_pandas(), out["causal_tracing_prompts"].to_pandas()


@pytest.fixture(scope="module")
def three_facts(demo_facts):
    """france has its capital in / the capital of germany is / italy has its capital in."""
    return demo_facts.slice(0, 3)


@pytest.fixture(scope="module")
def traced(demo_live, three_facts):
    return trace(demo_live, three_facts)


def _prompt_table(rows, run_id="local"):
    table = pa.Table.from_pylist(rows)
    table = table.append_column("item", pa.array(range(len(rows)), pa.int64()))
    return with_run_id(table, run_id)


# ---------------------------------------------------------------------- by construction


def test_without_noise_nothing_is_lost_and_every_restoration_gives_the_clean_prob(
    demo_live, three_facts
):
    cells, prompts = trace(demo_live, three_facts, noise_scale=0.0, samples=2)
    np.testing.assert_allclose(prompts.corrupted_prob, prompts.clean_prob, rtol=1e-5)
    clean = cells.item.map(dict(zip(prompts.item, prompts.clean_prob, strict=True)))
    np.testing.assert_allclose(cells.effect, clean, rtol=1e-5)
    assert set(cells.kind) == {"resid", "mlp", "attn"}


def test_clean_prob_and_last_layer_restoration(demo_live, three_facts, traced):
    cells, prompts = traced
    for row in prompts.itertuples():
        ids = torch.tensor([demo_live.encode(row.prompt)])
        logits, _ = demo_live.meta.run_with_cache(ids, hooks=["logits"])
        answer = demo_live.token_id(row.answer)
        assert row.clean_prob == pytest.approx(
            torch.softmax(logits[0, -1], -1)[answer].item(), rel=1e-5
        )
        assert row.corrupted_prob < row.clean_prob - 0.5  # the noise does corrupt the fact
    # everything after the last block's output at the last position is clean again
    last = cells[
        (cells.kind == "resid")
        & (cells.layer == demo_live.n_layers - 1)
        & (cells.pos == cells.pos.groupby(cells.item).transform("max"))
    ]
    assert len(last) == 3
    np.testing.assert_allclose(last.effect, last.clean_prob, rtol=1e-5)


def test_positions_before_the_subject_recover_nothing(demo_live, three_facts, traced):
    cells, prompts = traced
    start = cells.item.map(dict(zip(prompts.item, prompts.subject_start, strict=True)))
    before = cells[cells.pos < start]
    assert len(before) and set(before.kind) == {"resid", "mlp", "attn"}
    # never corrupted, so the restored value is the value already there
    np.testing.assert_allclose(before.effect, before.corrupted_prob, rtol=1e-5)


def test_one_cell_recomputed_with_plain_interventions(demo_live, three_facts, traced):
    """(resid, layer 1, subject position) of item 1, by hand on the HookedModel."""
    cells, prompts = traced
    meta, row = demo_live.meta, prompts.iloc[1]
    s0, s1 = int(row.subject_start), int(row.subject_stop)
    ids = torch.tensor([demo_live.encode(row.prompt)])
    hook = "blocks.1.hook_resid_post"
    _, clean = meta.run_with_cache(ids, hooks=[hook])
    noise = torch.from_numpy(subject_noise(0, 1, 3, s1 - s0, meta.d_model)) * row.noise_std

    def corrupt(x, _name):
        x = x.clone()
        x[:, s0:s1] += noise
        return x

    def restore(x, _name):
        x = x.clone()
        x[:, s0] = clean[hook][0, s0]
        return x

    logits, _ = meta.run_with_cache(
        ids.repeat(3, 1), hooks=["logits"], interventions={"hook_embed": corrupt, hook: restore}
    )
    expected = torch.softmax(logits[:, -1], -1)[:, demo_live.token_id(row.answer)].mean()
    cell = cells[(cells["item"] == 1) & (cells.kind == "resid") & (cells.layer == 1)]
    cell = cell[cell.pos == s0]
    assert cell.effect.item() == pytest.approx(expected.item(), rel=1e-4)
    assert bool(cell.is_subject.item()) and cell.token.item() == row.subject


def test_noise_std_is_the_embedding_std_times_the_scale(demo_live, three_facts, traced):
    _, prompts = traced
    embeds = [
        demo_live.meta.run_with_cache(torch.tensor([demo_live.encode(p)]), hooks=["hook_embed"])[1][
            "hook_embed"
        ][0]
        for p in three_facts.column("prompt").to_pylist()
    ]
    std = torch.cat(embeds).double().std().item()
    assert embedding_std(demo_live, [demo_live.encode(p) for p in prompts.prompt]) == (
        pytest.approx(std, rel=1e-6)
    )
    np.testing.assert_allclose(prompts.noise_std, 3.0 * std, rtol=1e-5)


def test_seeds_slices_and_batching(demo_live, three_facts, traced):
    cells, _ = traced
    again, _ = trace(demo_live, three_facts, max_batch=7)  # chunks cut across draws
    np.testing.assert_allclose(again.effect, cells.effect, rtol=1e-5)
    same, _ = trace(demo_live, three_facts)
    np.testing.assert_array_equal(same.effect, cells.effect)
    other, _ = trace(demo_live, three_facts, seed=1)
    assert not np.allclose(other.effect, cells.effect)
    # a prompt's noise depends on (seed, item) only, not on the slice it is in
    std = embedding_std(demo_live, [demo_live.encode(p) for p in three_facts["prompt"].to_pylist()])
    whole, _ = trace(demo_live, three_facts, prepared=std)
    alone, _ = trace(demo_live, three_facts.slice(2, 1), prepared=std)
    np.testing.assert_allclose(alone.effect, whole[whole["item"] == 2].effect, rtol=1e-5)


def test_windows_and_roles():
    assert window_of("resid", 2, 10, 4) == (2, 3)
    assert window_of("mlp", 1, 10, 4) == (0, 4)  # ROME's default window: the whole demo
    assert window_of("attn", 0, 3, 4) == (0, 2) and window_of("attn", 3, 3, 4) == (2, 4)
    assert window_of("mlp", 5, 10, 48) == (0, 10) and window_of("mlp", 20, 10, 48) == (15, 25)
    assert position_roles(7, 2, 5) == [
        "prefix",
        "prefix",
        "subject_first",
        "subject_middle",
        "subject_last",
        "after_first",
        "last",
    ]
    assert position_roles(3, 2, 3) == ["prefix", "prefix", "subject_last"]


def test_a_multi_token_subject_and_the_window_columns(demo_live):
    items = _prompt_table(
        [
            {
                "prompt": "the capital of germany is",
                "subject": "capital of germany",
                "answer": "berlin",
            }
        ]
    )
    cells, prompts = trace(demo_live, items, kinds=["resid", "mlp"], window=3, samples=2)
    assert (prompts.subject_start.item(), prompts.subject_stop.item()) == (2, 5)
    at_layer0 = cells[(cells.kind == "resid") & (cells.layer == 0)].sort_values("pos")
    assert at_layer0.is_subject.tolist() == [False, False, True, True, True, False]
    assert at_layer0.role.tolist()[2:] == [
        "subject_first",
        "subject_middle",
        "subject_last",
        "last",
    ]
    mlp = cells[cells.kind == "mlp"].groupby("layer")[["window_start", "window_stop"]].first()
    assert mlp.to_numpy().tolist() == [[0, 2], [0, 3], [1, 4], [2, 4]]
    assert set(cells.kind) == {"resid", "mlp"} and len(cells) == 2 * 4 * 6


# ---------------------------------------------------------------------- the demo model


def test_the_demo_model_recalls_at_the_subjects_last_token_early(demo_live, demo_facts):
    """Measured over 20 facts (see the report): the subject's last token carries the
    fact through layer 0 (its MLP restores it alone); the last token's attention reads
    it at layer 1. Asserted here on three capitals, small margins."""
    cells, _ = trace(demo_live, demo_facts.slice(0, 3), samples=4)
    cells["ie"] = cells.effect - cells.corrupted_prob
    mean = cells.groupby(["kind", "role", "layer"]).ie.mean()
    assert mean["resid", "subject_last", 0] > 0.5
    assert mean["resid", "subject_last", 0] > mean["resid"].drop("subject_last", level=0).max()
    assert mean["mlp", "subject_last"].idxmax() == 0 and mean["mlp", "subject_last", 0] > 0.5
    assert mean["attn", "last"].idxmax() == 1 and mean["attn", "subject_last"].max() < 0.1


# ---------------------------------------------------------------------- refusals


def test_bad_rows_and_params_are_refused(demo_live):
    missing = _prompt_table(
        [{"prompt": "the capital of germany is", "subject": "spain", "answer": "berlin"}]
    )
    with pytest.raises(ToolError, match=r"item 0: subject 'spain'"):
        trace(demo_live, missing)
    long_answer = _prompt_table(
        [{"prompt": "the capital of germany is", "subject": "germany", "answer": "west berlin"}]
    )
    with pytest.raises(ToolError, match=r"item 0: answer 'west berlin'"):
        trace(demo_live, long_answer)
    for bad, field in [
        ({"kinds": ["resid", "mlps"]}, "mlps"),
        ({"kinds": []}, "kinds"),
        ({"samples": 0}, "samples"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"window": 0}, "window"),
        ({"max_batch": 0}, "max_batch"),
    ]:
        with pytest.raises(ToolError, match=field):
            make_tool(TOOL, bad)


# ---------------------------------------------------------------------- stages and Ray


def test_two_stages_equal_one(demo_live, demo_staged, three_facts):
    one, one_prompts = trace(demo_live, three_facts.slice(0, 2), samples=2)
    two, two_prompts = trace(demo_staged, three_facts.slice(0, 2), samples=2)
    assert one[["kind", "layer", "pos"]].equals(two[["kind", "layer", "pos"]])
    np.testing.assert_allclose(two.effect, one.effect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two_prompts.corrupted_prob, one_prompts.corrupted_prob, rtol=1e-4)


def test_analyze_through_ray_equals_local(harvested, demo_live, tmp_path):
    from arrakis_ray.live.prompts import read_prompts
    from arrakis_ray.store.reader import RunReader

    rows = [
        {"prompt": "the capital of germany is", "subject": "germany", "answer": "berlin"},
        {"prompt": "people in france speak", "subject": "france", "answer": "french"},
    ]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {**FAST, "samples": 2, "kinds": ["resid", "attn"], "prompts": str(path)}
    result = analyze(harvested[2].run_dir, TOOL, params)
    reader = RunReader.open(harvested[2].run_dir)
    stored = reader.result("causal_tracing").to_pandas()
    stored_prompts = reader.result("causal_tracing_prompts").to_pandas()
    assert result.rows == len(stored) + len(stored_prompts)

    tool = make_tool(TOOL, params)
    items = with_run_id(read_prompts(path, tool.prompt_columns), reader.run_id)
    local = tool.compute_live(items, demo_live, tool.prepare(items, demo_live))
    expected = local["causal_tracing"].to_pandas()
    keys = ["item", "kind", "layer", "pos"]
    stored = stored.sort_values(keys).reset_index(drop=True)
    expected = expected.sort_values(keys).reset_index(drop=True)
    assert stored[keys + ["token", "role", "run_id"]].equals(
        expected[keys + ["token", "role", "run_id"]]
    )
    np.testing.assert_allclose(stored.effect, expected.effect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        stored_prompts.sort_values("item").corrupted_prob,
        local["causal_tracing_prompts"].to_pandas().corrupted_prob,
        rtol=1e-4,
    )


# ---------------------------------------------------------------------- charts


def test_tracing_heatmaps_encode_one_prompt(traced):
    cells = pl.from_pandas(traced[0])
    spec = tracing_heatmap(cells, kind="mlp", item=1).to_dict()
    assert spec["mark"]["type"] == "rect" and spec["title"] == "item 1: restoring MLP outputs"
    enc = spec["encoding"]
    assert enc["x"]["field"] == "layer" and enc["y"]["field"] == "position"
    assert enc["y"]["sort"]["field"] == "pos" and enc["color"]["field"] == "effect"
    assert enc["color"]["scale"]["scheme"] == "greens"
    (flt,) = [t["filter"] for t in spec["transform"] if "filter" in t]
    assert "'mlp'" in str(flt).replace('"', "'") and "=== 1" in str(flt)
    calc = {t["as"]: t["calculate"] for t in spec["transform"] if "calculate" in t}
    assert "datum.is_subject" in calc["position"] and "datum.token" in calc["position"]
    (data,) = spec["datasets"].values()
    assert len(data) == len(cells)

    both = tracing_heatmaps(cells, item=0, value="indirect_effect").to_dict()
    assert len(both["hconcat"]) == 3
    inner = both["hconcat"][2]
    assert inner["encoding"]["color"]["field"] == "indirect_effect"
    assert inner["encoding"]["color"]["scale"]["domainMid"] == 0
    assert any(t.get("as") == "indirect_effect" for t in inner["transform"])


def test_tracing_role_heatmap_and_refusals(traced):
    cells = traced[0]
    spec = tracing_role_heatmap(cells, kind="attn").to_dict()
    enc = spec["encoding"]
    assert enc["color"]["aggregate"] == "mean" and enc["color"]["field"] == "effect"
    assert enc["y"]["field"] == "role" and enc["y"]["sort"][3] == "subject_last"
    with pytest.raises(DataError, match="holds 3 items"):
        tracing_heatmap(cells)
    with pytest.raises(DataError, match="item 9"):
        tracing_heatmap(cells, item=9)
    with pytest.raises(DataError, match="kind must be"):
        tracing_heatmap(cells, kind="heads", item=0)
    with pytest.raises(DataError, match="role"):
        tracing_role_heatmap(cells.drop(columns="role"))
