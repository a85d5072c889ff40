"""Model surgery equals running the HF blocks by hand in the plan's order; the identity
plan is the model itself; the same on 2 stages and through Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from support import with_run_id

from arrakis_ray.errors import DataError, ToolError
from arrakis_ray.live.holder import weights_digest
from arrakis_ray.tools.model_surgery import increasing_runs
from arrakis_ray.tools.runner import make_tool

TOOL = "model_surgery"


def surgery(**params):
    return make_tool(TOOL, params)


def texts(demo_facts, n: int, start: int = 0) -> pa.Table:
    """Facts as a ``text`` table: prompt + answer (7 to 9 tokens with BOS)."""
    rows = demo_facts.slice(start, n).to_pylist()
    table = pa.table(
        {
            "text": [f"{r['prompt']} {r['answer']} ." for r in rows],
            "item": pa.array([r["item"] for r in rows], pa.int64()),
        }
    )
    return with_run_id(table)


def by_item_plan(table: pa.Table) -> dict:
    return {(r["item"], r["plan"]): r for r in table.to_pylist()}


def manual_logits(meta, text: str, plan: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[pos, vocab]``, token ids): the HF gpt2's embeddings, then its blocks
    called one by one in the plan's order, then ln_f and lm_head (one unpadded
    sequence: each block masks causally itself)."""
    hf = meta.model
    words = meta.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[meta.tokenizer.bos_token_id, *words]])
    with torch.no_grad():
        h = hf.transformer.wte(ids) + hf.transformer.wpe(torch.arange(ids.shape[1]))[None]
        for layer in plan:
            out = hf.transformer.h[layer](h)
            h = out[0] if isinstance(out, tuple) else out
        return hf.lm_head(hf.transformer.ln_f(h))[0], ids[0]


def expected(meta, text: str, plan: list[int]) -> dict:
    """loss, top-1 agreement and KL(base || plan) from manual forwards."""
    n = meta.n_layers
    base, ids = manual_logits(meta, text, list(range(n)))
    logits, _ = manual_logits(meta, text, plan)
    base_lp = torch.log_softmax(base[:-1], -1)
    lp = torch.log_softmax(logits[:-1], -1)
    targets = ids[1:]
    rows = torch.arange(len(targets))
    return {
        "loss": float(-lp[rows, targets].mean()),
        "base_loss": float(-base_lp[rows, targets].mean()),
        "top1_agreement": float((base_lp.argmax(-1) == lp.argmax(-1)).float().mean()),
        "kl": float((base_lp.exp() * (base_lp - lp)).sum(-1).mean()),
    }


def test_increasing_runs():
    assert increasing_runs([0, 1, 2, 2, 3]) == [[0, 1, 2], [2, 3]]
    assert increasing_runs([0, 2, 1, 3]) == [[0, 2], [1, 3]]
    assert increasing_runs([3, 0]) == [[3], [0]]
    assert increasing_runs([]) == [[]]


def test_the_identity_plan_is_the_model_itself(demo_live, demo_facts):
    items = texts(demo_facts, 5)
    out = surgery(plans={"same": [0, 1, 2, 3]}).compute_live(items, demo_live)
    assert out.column("loss_delta").to_pylist() == [0.0] * 5
    assert out.column("top1_agreement").to_pylist() == [1.0] * 5
    assert out.column("kl").to_pylist() == [0.0] * 5
    assert out.column("layers").to_pylist() == ["0,1,2,3"] * 5


def test_plans_equal_running_the_blocks_by_hand(demo_live, demo_facts):
    """Deletion, repetition, a swap, a replacement, the blocks backwards and none at all."""
    plans = {
        "skip_1": [0, 2, 3],
        "repeat_0": [0, 0, 1, 2, 3],
        "swap_1_2": [0, 2, 1, 3],
        "replace_3_with_2": [0, 1, 2, 2],
        "backwards": [3, 2, 1, 0],
        "nothing": [],
    }
    items = texts(demo_facts, 3, start=2)  # 3 lengths: padding is exercised
    digest = weights_digest(demo_live.meta.model)
    out = by_item_plan(surgery(plans=plans, batch_size=2).compute_live(items, demo_live))
    assert weights_digest(demo_live.meta.model) == digest  # a forward plan, no edit
    for row in items.to_pylist():
        for name, plan in plans.items():
            want = expected(demo_live.meta, row["text"], plan)
            got = out[(row["item"], name)]
            assert got["layers"] == ",".join(map(str, plan))
            for key, value in want.items():
                assert got[key] == pytest.approx(value, abs=1e-4), (name, key)
            assert got["loss_delta"] == pytest.approx(want["loss"] - want["base_loss"], abs=1e-4)
    # the plans change the prediction measurably: the checks above are not vacuous
    assert out[(2, "skip_1")]["kl"] > 1e-3 and out[(2, "nothing")]["top1_agreement"] < 0.5


def test_deletion_equals_an_intervention_on_the_hooked_model(demo_live, demo_facts):
    """skip_2 equals one forward with blocks.2.hook_resid_post set to its resid_pre."""
    items = texts(demo_facts, 2)
    out = by_item_plan(surgery().compute_live(items, demo_live))
    assert sorted({plan for _, plan in out}) == ["skip_0", "skip_1", "skip_2", "skip_3"]
    meta = demo_live.meta
    seen = {}

    def remember(x, _name):
        seen["x"] = x

    fns = {
        "blocks.2.hook_resid_pre": remember,
        "blocks.2.hook_resid_post": lambda _x, _name: seen["x"],
    }
    for row in items.to_pylist():
        ids = torch.tensor([demo_live.encode(row["text"])])
        logits, _ = meta.run_with_cache(ids, interventions=fns)
        lp = torch.log_softmax(logits[0, :-1], -1)
        loss = float(-lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean())
        assert out[(row["item"], "skip_2")]["loss"] == pytest.approx(loss, abs=1e-5)
        assert out[(row["item"], "skip_2")]["layers"] == "0,1,3"


def test_two_stages_equal_one(demo_live, demo_staged, demo_facts):
    """Plans crossing the stage boundary (blocks 0-1 | 2-3) both ways."""
    plans = {
        "swap_1_2": [0, 2, 1, 3],
        "repeat_2": [0, 1, 2, 2, 3],
        "back": [3, 0],
        "skip_3": [0, 1, 2],
    }
    items = texts(demo_facts, 4, start=20)
    one = surgery(plans=plans).compute_live(items, demo_live)
    two = surgery(plans=plans).compute_live(items, demo_staged)
    assert one.column("plan").to_pylist() == two.column("plan").to_pylist()
    for column in ("loss", "loss_delta", "top1_agreement", "kl"):
        np.testing.assert_allclose(one[column].to_numpy(), two[column].to_numpy(), atol=1e-5)


def test_bad_plans_are_refused(demo_live, demo_facts):
    items = texts(demo_facts, 1)
    with pytest.raises(ToolError, match=r"plan deep: blocks \[4, -1\] out of range"):
        surgery(plans={"deep": [0, 4, -1]}).compute_live(items, demo_live)
    with pytest.raises(ToolError, match="plans.oops: give a list of block indices"):
        surgery(plans={"oops": "0,1"})
    with pytest.raises(ToolError, match="plans.half: give a list of block indices"):
        surgery(plans={"half": [0, 1.5]})


def test_the_driver_refuses_plans_beyond_the_runs_blocks():
    """check() reads the run's manifest (here a 2-block model), before any actor."""
    from runs import synthetic_manifest, synthetic_shape

    manifest = synthetic_manifest("other", ["blocks.0.hook_resid_post"], synthetic_shape(), [])
    surgery(plans={"swap": [1, 0]}).check(manifest)
    surgery().check(manifest)  # the default plans are the model's own deletions
    with pytest.raises(
        ToolError, match=r"plan deep: blocks \[2\] out of range \(the model has 2\)"
    ):
        surgery(plans={"fine": [0, 1], "deep": [0, 2]}).check(manifest)


def test_max_tokens_cuts_each_text(demo_live, demo_facts):
    """Texts cut to 5 tokens give the figures of their first 4 words (the demo tokenizer
    is word-level), computed by hand; a text beyond the model's 64 positions is refused
    unless cut."""
    items = texts(demo_facts, 3, start=5)
    plans = {"skip_2": [0, 1, 3], "swap": [1, 0, 2, 3]}
    out = by_item_plan(surgery(plans=plans, max_tokens=5).compute_live(items, demo_live))
    for row in items.to_pylist():
        cut = " ".join(row["text"].split()[:4])
        for name, plan in plans.items():
            for key, value in expected(demo_live.meta, cut, plan).items():
                assert out[(row["item"], name)][key] == pytest.approx(value, abs=1e-4), key

    long = with_run_id(
        pa.table({"text": ["a cow says moo .", "the " * 70], "item": pa.array([0, 1], pa.int64())})
    )
    with pytest.raises(
        DataError, match="prompts row 2: 71 tokens .* 64 positions; set params.max_tokens"
    ):
        surgery(plans=plans).compute_live(long, demo_live)
    cut = surgery(plans=plans, max_tokens=64).compute_live(long, demo_live)
    assert np.isfinite(cut["loss"].to_numpy()).all()
    with pytest.raises(ToolError, match="max_tokens 65 exceeds the model's 64 positions"):
        surgery(max_tokens=65).compute_live(long, demo_live)
    with pytest.raises(ToolError, match="max_tokens must be at least 2"):
        surgery(max_tokens=1)


def test_through_ray_equals_local(harvested, demo_live, demo_facts, tmp_path):
    from arrakis_ray.live.prompts import read_prompts
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.runner import analyze

    rows = texts(demo_facts, 6, start=30).select(["text"]).to_pylist()
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"prompts": str(path), "plans": {"skip_1": [0, 2, 3], "swap": [1, 0, 2, 3]}}
    result = analyze(harvested[2].run_dir, TOOL, params)
    assert result.rows == 12
    got = RunReader.open(harvested[2].run_dir).result("model_surgery").to_pandas()
    items = with_run_id(read_prompts(path, ("text",)), result.run_id)
    want = surgery(**params).compute_live(items, demo_live).to_pandas()
    got = got.sort_values(["item", "plan"]).reset_index(drop=True)
    want = want.sort_values(["item", "plan"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        got[["run_id", "item", "plan", "layers"]], want[["run_id", "item", "plan", "layers"]]
    )
    for column in ("loss", "base_loss", "top1_agreement", "kl"):
        np.testing.assert_allclose(got[column], want[column], atol=1e-5)


def test_surgery_chart_ranks_plans_by_mean_change():
    from arrakis_ray.reports.ablation_charts import surgery_bars

    frame = pd.DataFrame(
        {
            "plan": ["skip_0", "skip_0", "skip_1", "skip_1", "swap", "swap"],
            "layers": ["1,2", "1,2", "0,2", "0,2", "0,2,1", "0,2,1"],
            "loss_delta": [3.0, 5.0, 0.1, 0.3, 0.5, 0.7],
            "kl": [1.0] * 6,
        }
    )
    spec = surgery_bars(frame).to_dict()
    data = next(iter(spec["datasets"].values()))
    assert [(d["plan"], d["rank"]) for d in data] == [("skip_0", 1), ("swap", 2), ("skip_1", 3)]
    assert [d["loss_delta"] for d in data] == pytest.approx([4.0, 0.6, 0.2])
    assert spec["encoding"]["y"]["field"] == "loss_delta"
    assert spec["encoding"]["tooltip"][1]["field"] == "layers"
    kl = next(iter(surgery_bars(frame, value="kl").to_dict()["datasets"].values()))
    assert [d["kl"] for d in kl] == [1.0] * 3
    with pytest.raises(DataError, match="mixes run_ids"):
        surgery_bars(frame.assign(run_id=["a", "b"] * 3))
