"""Ablation equals removing the component's output by hand, and changes nothing where
the component writes nothing; the same on 2 stages and through Ray."""

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
from arrakis_ray.tools.runner import make_tool

TOOL = "ablation"


def ablation(**params):
    return make_tool(TOOL, params)


def facts(demo_facts, n: int, start: int = 0) -> pa.Table:
    return demo_facts.slice(start, n)


def prompt_items(prompts: list[tuple[str, str]]) -> pa.Table:
    table = pa.table(
        {
            "prompt": [p for p, _ in prompts],
            "answer": [a for _, a in prompts],
            "item": pa.array(range(len(prompts)), pa.int64()),
        }
    )
    return with_run_id(table)


def by_item_component(table: pa.Table) -> dict:
    return {(r["item"], r["component"]): r for r in table.to_pylist()}


# ------------------------------------------------------------ computed another way


def _direct(meta, prompt: str, answer: str, interventions=None) -> tuple[float, float]:
    """(loss, answer log-prob) of one unpadded forward of the HookedModel."""
    ids = _ids(meta, prompt, answer)
    n_prompt = len(_ids(meta, prompt))
    logits, _ = meta.run_with_cache(torch.tensor([ids]), interventions=interventions)
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    picked = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(-picked.mean()), float(picked[n_prompt - 1 :].sum())


def _ids(meta, prompt: str, answer: str | None = None) -> list[int]:
    text = prompt if answer is None else f"{prompt} {answer}"
    return [
        meta.tokenizer.bos_token_id,
        *meta.tokenizer(text, add_special_tokens=False)["input_ids"],
    ]


def _minus_head(meta, layer: int, head: int) -> dict:
    """Interventions subtracting head ``head``'s write ``z_h @ W_O[h]`` from the
    attention output: what zeroing its z does, computed from the weights."""
    d_head = meta.d_head
    w_o = meta.model.transformer.h[layer].attn.c_proj.weight[head * d_head : (head + 1) * d_head]
    seen = {}

    def keep(z, _name):
        seen["z"] = z[:, :, head]

    def subtract(attn_out, _name):
        return attn_out - seen["z"] @ w_o

    return {f"blocks.{layer}.attn.hook_z": keep, f"blocks.{layer}.hook_attn_out": subtract}


def _minus_neuron(meta, layer: int, neuron: int) -> dict:
    """Interventions subtracting one neuron's write ``post_n * W_out[n]`` from the MLP output."""
    w_out = meta.model.transformer.h[layer].mlp.c_proj.weight[neuron]
    seen = {}

    def keep(post, _name):
        seen["post"] = post[..., neuron : neuron + 1]

    def subtract(mlp_out, _name):
        return mlp_out - seen["post"] * w_out

    return {f"blocks.{layer}.mlp.hook_post": keep, f"blocks.{layer}.hook_mlp_out": subtract}


def test_zero_ablation_equals_removing_the_components_write(demo_live, demo_facts):
    items = facts(demo_facts, 4)
    digest = weights_digest(demo_live.meta.model)
    out = ablation(components=["L1H2", "L3H0", "L2N7"], batch_size=5).compute_live(items, demo_live)
    assert weights_digest(demo_live.meta.model) == digest  # interventions only
    assert out.num_rows == 4 * 3
    rows = by_item_component(out)
    meta = demo_live.meta
    hand = {
        "L1H2": _minus_head(meta, 1, 2),
        "L3H0": _minus_head(meta, 3, 0),
        "L2N7": _minus_neuron(meta, 2, 7),
    }
    for fact in items.to_pylist():
        base_loss, base_lp = _direct(meta, fact["prompt"], fact["answer"])
        for name, fns in hand.items():
            loss, lp = _direct(meta, fact["prompt"], fact["answer"], fns)
            row = rows[(fact["item"], name)]
            assert row["base_loss"] == pytest.approx(base_loss, abs=1e-5)
            assert row["base_answer_logprob"] == pytest.approx(base_lp, abs=1e-4)
            assert row["loss"] == pytest.approx(loss, abs=1e-5)
            assert row["answer_logprob"] == pytest.approx(lp, abs=1e-4)
            assert row["loss_delta"] == pytest.approx(loss - base_loss, abs=1e-5)
            assert row["answer_logprob_delta"] == pytest.approx(lp - base_lp, abs=1e-4)
    # the model has learned something these heads do: not every ablation is a no-op
    assert max(abs(r["loss_delta"]) for r in rows.values()) > 1e-3
    assert {r["kind"] for r in rows.values()} == {"head", "neuron"}
    assert rows[(0, "L2N7")]["neuron"] == 7 and rows[(0, "L2N7")]["head"] is None


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_mean_and_resample_replace_by_the_dataset_value(demo_live, demo_facts, method):
    """The replacement, rebuilt from unpadded forwards of each prompt (the dataset's
    per-position mean, or the source prompt's value clamped to its last token)."""
    items = facts(demo_facts, 3, start=2)  # 7, 8 and 9 tokens with BOS and the answer
    tool = ablation(components=["L2H1"], method=method, seed=3)
    prepared = tool.prepare(items, demo_live)
    out = by_item_component(tool.compute_live(items, demo_live, prepared))
    meta, hook = demo_live.meta, "blocks.2.attn.hook_z"
    texts = {f["item"]: (f["prompt"], f["answer"]) for f in items.to_pylist()}
    z = {
        item: meta.run_with_cache(torch.tensor([_ids(meta, *pa_)]), hooks=[hook])[1][hook][0, :, 1]
        for item, pa_ in texts.items()
    }
    lengths = sorted({len(v) for v in z.values()})
    assert len(lengths) == 3  # different lengths: the alignment is exercised
    if method == "mean":
        longest = max(lengths)
        stack = torch.zeros(3, longest, meta.d_head)
        reach = torch.zeros(longest, 1)
        for k, v in enumerate(z.values()):
            stack[k, : len(v)] = v
            reach[: len(v)] += 1
        mean = stack.sum(0) / reach
    sources = {}
    for item, ids in (prepared or {}).get("sources", {}).items():
        sources[item] = next(i for i, t in texts.items() if _ids(meta, *t) == ids)
    assert method == "mean" or sorted(sources) == sorted(texts)
    assert all(sources[i] != i for i in sources)  # never its own source
    for item, (prompt, answer) in texts.items():
        n = len(z[item])
        if method == "mean":
            new = mean[:n]
        else:
            src = z[sources[item]]
            new = src[torch.arange(n).clamp(max=len(src) - 1)]

        def replace(value, _name, new=new):
            value = value.clone()
            value[0, :, 1] = new
            return value

        loss, lp = _direct(meta, prompt, answer, {hook: replace})
        assert out[(item, "L2H1")]["loss"] == pytest.approx(loss, abs=1e-5)
        assert out[(item, "L2H1")]["answer_logprob"] == pytest.approx(lp, abs=1e-4)
        assert out[(item, "L2H1")]["method"] == method


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_identical_prompts_make_mean_and_resample_no_ops(demo_live, method):
    """Four copies of one prompt: the mean (and any other prompt) is the activation itself."""
    items = prompt_items([("the capital of france is", "paris")] * 4)
    out = ablation(components=["heads", "L1N3"], method=method).compute_live(items, demo_live)
    assert out.num_rows == 4 * (demo_live.n_layers * demo_live.n_heads + 1)
    np.testing.assert_allclose(out.column("loss_delta").to_numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(out.column("answer_logprob_delta").to_numpy(), 0, atol=1e-4)


@pytest.fixture(scope="module")
def silent_head_model():
    """A random-init 2-layer gpt2 whose head 0 of block 1 has zero value weights, so its
    z is exactly zero (the test edits its own model's weights; the tool never does)."""
    from arrakis_ray.config import ModelConfig
    from arrakis_ray.live.model import local_model

    config = ModelConfig(
        arch="gpt2",
        config={"n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 400, "n_positions": 32},
        tokenizer="zoo:facts-gpt2",
        seed=1,
    )
    live = local_model(config)
    attn = live.meta.model.transformer.h[1].attn
    d = live.d_model
    with torch.no_grad():
        attn.c_attn.weight[:, 2 * d : 2 * d + live.d_head] = 0  # v of head 0
        attn.c_attn.bias[2 * d : 2 * d + live.d_head] = 0
    return live


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_a_head_that_writes_nothing_changes_nothing(silent_head_model, method):
    items = prompt_items([("the capital of france is", "paris"), ("a cow says", "moo")])
    out = ablation(components=["L1H0", "L1H1"], method=method).compute_live(
        items, silent_head_model
    )
    frame = out.to_pandas().set_index(["component", "item"])
    np.testing.assert_allclose(frame.loc["L1H0", "loss_delta"], 0, atol=1e-6)
    np.testing.assert_allclose(frame.loc["L1H0", "answer_logprob_delta"], 0, atol=1e-6)
    assert (frame.loc["L1H1", "loss_delta"].abs() > 1e-5).all()  # the other head writes


def test_two_stages_equal_one(demo_live, demo_staged, demo_facts):
    items = facts(demo_facts, 5, start=10)
    tool = ablation(components=["L0H1", "L3H2", "L2N5", "L1N0"], method="mean", batch_size=7)
    one = tool.compute_live(items, demo_live, tool.prepare(items, demo_live))
    two = tool.compute_live(items, demo_staged, tool.prepare(items, demo_staged))
    assert one.column("component").to_pylist() == two.column("component").to_pylist()
    for column in ("loss", "loss_delta", "answer_logprob", "answer_logprob_delta"):
        np.testing.assert_allclose(one[column].to_numpy(), two[column].to_numpy(), atol=1e-5)


def test_bad_input_is_refused(demo_live, demo_facts):
    items = facts(demo_facts, 2)
    with pytest.raises(ToolError, match="L9H0: layer 9 out of range"):
        ablation(components=["L9H0"]).compute_live(items, demo_live)
    with pytest.raises(ToolError, match="L1H4: head 4 out of range"):
        ablation(components=["L1H4"]).compute_live(items, demo_live)
    with pytest.raises(ToolError, match="components"):
        ablation(components=["head3"])
    with pytest.raises(ToolError, match="method"):
        ablation(method="noise")
    with pytest.raises(ToolError, match="at least 2 prompts"):
        ablation(method="resample").prepare(items.slice(0, 1), demo_live)
    with pytest.raises(DataError, match="row 1: the answer '' adds no token"):
        ablation(components=["L0H0"]).compute_live(prompt_items([("a cow says", "")]), demo_live)


def _manifest():
    """A run's manifest whose model (2 layers, 2 heads, 32 neurons) is not the demo's."""
    from runs import synthetic_manifest, synthetic_shape

    return synthetic_manifest("other", ["blocks.0.hook_resid_post"], synthetic_shape(), [])


def test_the_driver_refuses_components_the_runs_model_lacks(harvested):
    from support import store_snapshot

    from arrakis_ray.tools.runner import analyze

    manifest = _manifest()
    ablation(components=["heads", "L1H1", "L1N31"]).check(manifest)  # all in range
    for spec, error in [
        ("L2H0", "L2H0: layer 2 out of range"),
        ("L0H2", r"L0H2: head 2 out of range \(0..1\)"),
        ("L1N32", r"L1N32: neuron 32 out of range \(0..31\)"),
    ]:
        with pytest.raises(ToolError, match=error):
            ablation(components=[spec]).check(manifest)
    # through analyze: refused in the driver, before any actor, writing nothing
    run_dir = harvested[2].run_dir
    before = store_snapshot(run_dir)
    with pytest.raises(ToolError, match="L9H0: layer 9 out of range"):
        analyze(run_dir, TOOL, {"components": ["L9H0"]})
    assert store_snapshot(run_dir) == before


def test_a_prompt_beyond_the_models_positions_is_refused_with_its_row(demo_live):
    items = prompt_items([("a cow says", "moo"), ("the " * 70, "paris")])
    with pytest.raises(DataError, match="row 2: 72 tokens .*, but the model has 64 positions"):
        ablation(components=["L0H0"]).compute_live(items, demo_live)


def test_each_hook_gets_only_its_own_rows_and_values(demo_live, demo_facts):
    """The interventions of one forward: one Ablate per hook, each carrying the
    replacement values of its own rows only (what a stage in another actor receives)."""
    import pickle

    from arrakis_ray.tools.ablation import Ablate, _ablations, parse_components

    items = facts(demo_facts, 3)
    tool = ablation(components=["L0H1", "L3N5", "L3N9"], method="resample")
    comps = parse_components(tool.params.components, demo_live, TOOL)
    prompts = tool._tokenize(items, demo_live)
    source = tool._source(prompts, comps, demo_live, tool.prepare(items, demo_live))
    chunk = [(i, c) for c in range(3) for i in range(3)]  # 9 rows: 3 per component
    fns = _ablations(chunk, comps, source)
    assert sorted(fns) == ["blocks.0.attn.hook_z", "blocks.3.mlp.hook_post"]
    head, neurons = fns["blocks.0.attn.hook_z"], fns["blocks.3.mlp.hook_post"]
    assert isinstance(head, Ablate) and isinstance(neurons, Ablate)
    n_pos = prompts.ids.shape[1]
    assert head.rows.tolist() == [0, 1, 2] and head.units.tolist() == [1] * 3
    assert head.new.shape == (3, n_pos, demo_live.d_head)
    torch.testing.assert_close(head.new, source["blocks.0.attn.hook_z"][1][:, :, 1])
    assert neurons.rows.tolist() == [3, 4, 5, 6, 7, 8]
    assert neurons.units.tolist() == [5, 5, 5, 9, 9, 9]
    want = source["blocks.3.mlp.hook_post"][1][[0, 1, 2, 0, 1, 2], :, [5, 5, 5, 9, 9, 9]]
    torch.testing.assert_close(neurons.new, want)
    assert pickle.loads(pickle.dumps(neurons)).new.shape == (6, n_pos)  # plain data


def test_through_ray_equals_local(harvested, demo_live, demo_facts, tmp_path):
    """20 prompts in 2 slices (16 + 4): the sources of resampling cross slices."""
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.runner import analyze

    rows = facts(demo_facts, 20, start=40).select(["prompt", "answer"]).to_pylist()
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"prompts": str(path), "components": ["L1H1", "L2N9"], "method": "resample"}
    result = analyze(harvested[2].run_dir, TOOL, params)
    assert result.shards == 2 and result.rows == 40
    got = RunReader.open(harvested[2].run_dir).result("ablation").to_pandas()

    from arrakis_ray.live.prompts import read_prompts

    items = with_run_id(read_prompts(path, ("prompt", "answer")), result.run_id)
    tool = ablation(**params)
    want = tool.compute_live(items, demo_live, tool.prepare(items, demo_live)).to_pandas()
    got = got.sort_values(["item", "component"]).reset_index(drop=True)
    want = want.sort_values(["item", "component"]).reset_index(drop=True)
    assert (got["run_id"] == result.run_id).all()
    pd.testing.assert_frame_equal(
        got[["item", "component", "method"]], want[["item", "component", "method"]]
    )
    for column in ("loss", "base_loss", "answer_logprob_delta"):
        np.testing.assert_allclose(got[column], want[column], atol=1e-5)


# ------------------------------------------------------------ the chart


def test_ranking_chart_shows_the_top_components_by_mean_change():
    from arrakis_ray.reports.ablation_charts import ablation_ranking

    frame = pd.DataFrame(
        {
            "component": ["L0H0", "L0H0", "L1H1", "L1H1", "L2N3", "L2N3"],
            "layer": [0, 0, 1, 1, 2, 2],
            "method": ["zero"] * 6,
            "loss_delta": [0.1, 0.3, -0.9, -0.5, 0.05, 0.05],
        }
    )
    spec = ablation_ranking(frame, top=2).to_dict()
    data = next(iter(spec["datasets"].values()))
    assert [(d["component"], d["rank"]) for d in data] == [("L1H1", 1), ("L0H0", 2)]
    assert [d["loss_delta"] for d in data] == pytest.approx([-0.7, 0.2])
    assert spec["encoding"]["x"]["field"] == "loss_delta"
    assert spec["encoding"]["y"]["sort"] == {"field": "rank", "op": "min"}
    assert spec["title"] == "zero ablation: mean loss_delta"
    mixed = frame.assign(method=["zero", "mean"] * 3)
    with pytest.raises(DataError, match="mixes methods"):
        ablation_ranking(mixed)
    with pytest.raises(DataError, match="lacks column"):
        ablation_ranking(frame.drop(columns="layer"))
