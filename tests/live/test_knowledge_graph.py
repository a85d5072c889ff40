"""Knowledge graph extraction on the demo model, against plain forwards and the facts it
was trained on."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from support import with_run_id

from arrakis_ray.errors import DataError, ToolError
from arrakis_ray.tools.knowledge_graph import (
    LENS_HOOKS,
    KnowledgeGraphExtractor,
    LastPositions,
    _padded,
)
from arrakis_ray.tools.runner import analyze, make_tool
from arrakis_ray.zoo.corpus import FACTS

TOOL = "knowledge_graph_extractor"
PRECISION_BOUND = 0.95  # measured: 400 of 400 held-out phrasings (1.0)


def _tool(**params) -> KnowledgeGraphExtractor:
    return make_tool(KnowledgeGraphExtractor, params)


def _forward(meta, prompt: str, hooks=("logits",)):
    """One prompt alone (no batch, no padding) through the plain HookedModel."""
    ids = torch.tensor([_encode(meta, prompt)])
    _, cache = meta.run_with_cache(ids, hooks=list(hooks))
    return cache


def _encode(meta, prompt: str) -> list[int]:
    ids = meta.tokenizer(prompt)["input_ids"]
    bos = meta.tokenizer.bos_token_id
    return ids if ids[:1] == [bos] else [bos, *ids]


def test_precision_against_the_training_facts(demo_live, demo_facts):
    """Top-1 objects of the held-out phrasings are the trained facts, and are what a plain
    unbatched forward predicts."""
    graph = _tool().compute_live(demo_facts, demo_live).to_pydict()
    assert graph["item"] == demo_facts["item"].to_pylist()  # top_k = 1: one row per prompt
    truth = [FACTS[r][s] for r, s in zip(graph["relation"], graph["subject"], strict=True)]
    hits = [obj == fact for obj, fact in zip(graph["object"], truth, strict=True)]
    precision = sum(hits) / len(hits)
    assert precision >= PRECISION_BOUND, precision
    assert graph["correct"] == hits  # the answer column is the training fact

    meta = demo_live.meta
    direct_ids, direct_probs = [], []
    for prompt in graph["prompt"]:
        logits = _forward(meta, prompt)["logits"][0, -1]
        direct_ids.append(int(logits.argmax()))
        direct_probs.append(float(logits.softmax(-1).max()))
    assert graph["object_token_id"] == direct_ids
    np.testing.assert_allclose(graph["probability"], direct_probs, rtol=1e-4)
    direct_words = [meta.tokenizer.decode([i]).strip() for i in direct_ids]
    direct_precision = np.mean([w == t for w, t in zip(direct_words, truth, strict=True)])
    assert direct_precision == precision
    assert graph["rank"] == [1] * len(hits)
    correct = np.array(graph["correct"])
    np.testing.assert_allclose(
        np.array(graph["expected_probability"])[correct], np.array(graph["probability"])[correct]
    )


def test_ranks_probabilities_and_first_layer_match_a_manual_lens(demo_live, demo_facts):
    items = demo_facts.take([0, 31, 61, 150, 220, 399])
    graph = _tool(top_k=3, batch_size=4).compute_live(items, demo_live).to_pydict()
    meta = demo_live.meta
    lens_hooks = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_resid_post" for layer in range(meta.n_layers)
    ]
    for k, prompt in enumerate(items["prompt"].to_pylist()):
        cache = _forward(meta, prompt, ["logits", *lens_hooks])
        logits = cache["logits"][0, -1]
        probs = logits.softmax(-1)
        top = probs.topk(3)
        # the lens by hand: every residual state's last position through ln_f and lm_head
        lens_top1 = [int(meta.unembed(meta.ln_final(cache[h][0, -1])).argmax()) for h in lens_hooks]
        expected_id = demo_live.token_id(items["answer"][k].as_py())
        rows = range(3 * k, 3 * k + 3)
        assert [graph["object_token_id"][r] for r in rows] == top.indices.tolist()
        assert [graph["rank"][r] for r in rows] == [1, 2, 3]
        np.testing.assert_allclose([graph["probability"][r] for r in rows], top.values, rtol=1e-4)
        for r in rows:
            token = graph["object_token_id"][r]
            hits = [
                layer
                for layer, t in zip(range(-1, meta.n_layers), lens_top1, strict=True)
                if t == token
            ]
            assert graph["first_layer"][r] == (hits[0] if hits else None)
            assert graph["correct"][r] == (token == expected_id)
            assert graph["expected_rank"][r] == int((logits > logits[expected_id]).sum()) + 1
            assert graph["expected_probability"][r] == pytest.approx(
                float(probs[expected_id]), rel=1e-4
            )
        # the last layer's lens is the model's own prediction
        assert lens_top1[-1] == top.indices[0]
        assert graph["first_layer"][3 * k] is not None


def test_the_lens_reads_each_prompts_last_real_position(demo_live, demo_staged):
    """The probe sends back, per layer, each right-padded row's last real position: the
    cached residual there, on whichever stage holds the layer."""
    prompts = ["the capital of france is", "people in spain speak", "paris is in"]
    ids, mask, last = _padded(demo_live, prompts)
    assert last.tolist() == [len(demo_live.encode(p)) - 1 for p in prompts]
    hooks = demo_live.resolve_hooks(list(LENS_HOOKS))
    cache = demo_live.run(ids, mask, hooks=hooks).cache
    for model in (demo_live, demo_staged):
        probed = model.run(ids, mask, probes={h: LastPositions(last) for h in hooks}).probes
        assert sorted(probed) == sorted(hooks)
        for hook in hooks:
            assert probed[hook].shape == (3, demo_live.d_model)
            expected = torch.stack([cache[hook][row, pos] for row, pos in enumerate(last)])
            torch.testing.assert_close(probed[hook], expected, rtol=1e-5, atol=1e-6)


def test_two_stages_give_the_same_graph(demo_live, demo_staged, demo_facts):
    items = demo_facts.slice(100, 12)
    tool = _tool(top_k=2, batch_size=5)
    whole = pl.from_arrow(tool.compute_live(items, demo_live))
    staged = pl.from_arrow(tool.compute_live(items, demo_staged))
    floats = ["probability", "expected_probability"]
    assert whole.drop(floats).equals(staged.drop(floats))
    for column in floats:
        np.testing.assert_allclose(whole[column].to_numpy(), staged[column].to_numpy(), rtol=1e-5)


def test_without_an_answer_column(demo_live, demo_facts):
    tool = _tool(answer_column=None)
    assert tool.prompt_columns == ("prompt", "subject", "relation")
    assert _tool().prompt_columns == ("prompt", "subject", "relation", "answer")
    items = demo_facts.slice(0, 4).drop_columns(["answer"])
    graph = tool.compute_live(items, demo_live)
    for column in ("expected", "correct", "expected_probability", "expected_rank"):
        assert graph[column].null_count == 4
    assert graph["object"].to_pylist() == ["paris", "berlin", "rome", "madrid"]


def test_bad_input_is_refused_with_its_row(demo_live, demo_facts):
    bad = with_run_id(
        pa.table(
            {
                "prompt": ["the capital of france is"],
                "subject": ["france"],
                "relation": ["capital"],
                "answer": ["paris london"],
                "item": pa.array([7], pa.int64()),
            }
        )
    )
    with pytest.raises(ToolError, match=r"item 7: answer 'paris london' is not a single token"):
        _tool().compute_live(bad, demo_live)
    with pytest.raises(ToolError, match="lack column.*subject"):
        _tool().compute_live(demo_facts.slice(0, 2).drop_columns(["subject"]), demo_live)
    with pytest.raises(ToolError, match="top_k must be at least 1"):
        _tool(top_k=0)
    with pytest.raises(ToolError, match="top_k 1000 exceeds the vocabulary"):
        _tool(top_k=1000).compute_live(demo_facts.slice(0, 1), demo_live)


def test_the_driver_refuses_top_k_beyond_the_runs_vocabulary():
    """check() reads the run's manifest (here a 16-token vocabulary), before any actor;
    the answer column named in the parameters is read by every copy of the tool."""
    from runs import synthetic_manifest, synthetic_shape

    from arrakis_ray.config import to_dict

    manifest = synthetic_manifest("other", ["blocks.0.hook_resid_post"], synthetic_shape(), [])
    _tool(top_k=16).check(manifest)
    with pytest.raises(ToolError, match=r"top_k 17 exceeds the vocabulary \(16 tokens\)"):
        _tool(top_k=17).check(manifest)
    with pytest.raises(ToolError, match="batch_size must be at least 1, got 0"):
        _tool(batch_size=0)
    tool = _tool(answer_column="fact")
    rebuilt = make_tool(KnowledgeGraphExtractor, to_dict(tool.params))  # as an actor does
    assert (
        rebuilt.prompt_columns == tool.prompt_columns == ("prompt", "subject", "relation", "fact")
    )
    assert KnowledgeGraphExtractor.prompt_columns == ("prompt", "subject", "relation")


FRANCE_SQL = """
    SELECT relation, object, round(probability, 3) AS probability, first_layer, correct
    FROM results_knowledge_graph
    WHERE subject = 'france' AND rank = 1
    ORDER BY relation, item
"""


PRECISION_SQL = """
    SELECT count(*) AS facts, avg(correct::INT) AS precision
    FROM results_knowledge_graph WHERE rank = 1
"""


def test_through_ray_and_sql(harvested, demo_live):
    """analyze() over the run's own data (the facts), then "what does the model know about
    france" in SQL, against the tool run here."""
    from arrakis_ray.store.catalog import Store

    _, store, result = harvested
    analyze(result.run_dir, TOOL)
    with Store(store) as s:
        known = s.sql(FRANCE_SQL)
        precision = s.sql(PRECISION_SQL)
        table = s.sql("SELECT * FROM results_knowledge_graph ORDER BY item")
    assert known["relation"].to_list() == [
        "capital",
        "continent",
        "continent",
        "language",
        "language",
    ]
    assert known["object"].to_list() == ["paris", "europe", "europe", "french", "french"]
    assert known["correct"].all()

    france = table.filter(pl.col("subject") == "france")
    items = pa.table(
        {
            "prompt": france["prompt"].to_list(),
            "subject": france["subject"].to_list(),
            "relation": france["relation"].to_list(),
            "answer": france["expected"].to_list(),
            "item": pa.array(france["item"].to_list(), pa.int64()),
            "run_id": france["run_id"].to_list(),
        }
    )
    local = pl.from_arrow(_tool().compute_live(items, demo_live))
    assert france.drop("probability", "expected_probability").equals(
        local.drop("probability", "expected_probability")
    )
    np.testing.assert_allclose(france["probability"], local["probability"], rtol=1e-5)
    assert table.height == 400 and table["correct"].mean() >= PRECISION_BOUND
    assert precision["facts"].item() == 400
    assert precision["precision"].item() == pytest.approx(table["correct"].mean())


def test_first_layer_chart(demo_live, demo_facts):
    from arrakis_ray.reports.knowledge_charts import first_layer_bars

    graph = pl.from_arrow(_tool(top_k=2).compute_live(demo_facts.slice(0, 8), demo_live))
    spec = first_layer_bars(graph, title="where facts appear").to_dict()
    assert spec["mark"]["type"] == "bar" and spec["title"] == "where facts appear"
    enc = spec["encoding"]
    assert enc["x"]["field"] == "layer_label" and enc["x"]["sort"]["field"] == "layer_order"
    assert enc["y"]["aggregate"] == "count" and enc["color"]["field"] == "relation"
    assert any("rank" in str(t.get("filter", "")) for t in spec["transform"])
    rows = next(iter(spec["datasets"].values()))
    assert [r["first_layer"] for r in rows] == graph["first_layer"].to_list()
    with pytest.raises(DataError, match="lacks column"):
        first_layer_bars(graph.drop("first_layer"))
