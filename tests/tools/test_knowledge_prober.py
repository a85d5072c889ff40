"""Probes find a label exactly where it is linearly encoded; AUROC equals brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import DEMO_DATA

from arrakis_ray.errors import StoreError, ToolError
from arrakis_ray.store.catalog import Store
from arrakis_ray.tools.knowledge_prober import (
    auroc,
    macro_auroc,
    select_positions,
)
from arrakis_ray.tools.runner import analyze, make_tool

from .synthetic_run import run_inputs, write_synthetic_run


def _label_from_layer(tmp_path, first: int, n_layers: int = 5, n_seq: int = 400, seed: int = 0):
    """A run where a binary label is label * direction + noise from layer ``first`` on,
    and layers below hold noise independent of the label."""
    rng = np.random.default_rng(seed)
    n_pos, d = 4, 16
    label = rng.integers(0, 2, n_seq)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    acts = {}
    for layer in range(n_layers):
        x = rng.standard_normal((n_seq, n_pos, d))
        if layer >= first:
            x += 3.0 * (2 * label - 1)[:, None, None] * direction
        acts[layer] = x
    docs = [{"text": "...", "label": ["no", "yes"][v]} for v in label]
    return write_synthetic_run(
        tmp_path, "blocks.{layer}.hook_resid_post", acts, documents=docs, shard_size=128
    )


@pytest.mark.parametrize("position", ["last", "mean", 1])
def test_first_layer_where_the_probe_works_is_where_the_label_appears(tmp_path, position):
    torch.set_num_threads(1)
    first = 2
    layout = _label_from_layer(tmp_path, first)
    tool = make_tool("knowledge_prober", {"label_column": "label", "position": position})
    rows = tool.compute_run(run_inputs(layout), None).sort_by("layer").to_pylist()
    accuracy = [r["accuracy"] for r in rows]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]
    assert next(r["layer"] for r in rows if r["accuracy"] > 0.8) == first
    assert all(a < 0.7 for a in accuracy[:first]), accuracy  # chance: 100 held-out docs
    assert all(a > 0.9 for a in accuracy[first:]), accuracy
    assert all(r["auroc"] > 0.95 for r in rows[first:])
    # the split: 25% of 400 documents held out, disjoint from training
    assert {(r["n_train"], r["n_test"], r["n_classes"]) for r in rows} == {(300, 100, 2)}
    assert rows[0]["hook"] == "blocks.0.hook_resid_post" and rows[0]["position"] == str(position)
    # the baseline is the test share of the training split's majority class
    assert all(0.3 < r["baseline_accuracy"] < 0.7 for r in rows)


def _brute_force_auroc(scores, positive):
    """P(score of a random positive > a random negative), ties counting 1/2."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auroc_equals_pairwise_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        # integer scores: plenty of ties
        scores = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.standard_normal(n)
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            assert auroc(scores, positive) is None
            continue
        assert auroc(scores, positive) == pytest.approx(_brute_force_auroc(scores, positive))
    probs = rng.dirichlet(np.ones(3), size=50)
    y = rng.integers(0, 3, 50)
    expected = np.mean([_brute_force_auroc(probs[:, c], y == c) for c in range(3)])
    assert macro_auroc(probs, y) == pytest.approx(expected)
    assert auroc(np.array([0.1, 0.9, 0.5]), np.array([False, True, True])) == 1.0


def test_select_positions_equals_a_loop_over_sequences():
    rng = np.random.default_rng(1)
    lengths = {3: 2, 5: 4, 8: 1, 9: 3}
    seq = np.concatenate([np.full(n, s) for s, n in lengths.items()])
    pos = np.concatenate([np.arange(n) for n in lengths.values()])
    x = rng.standard_normal((len(seq), 3)).astype(np.float32)
    for position in ["last", "mean", 0, 2, -1, -3]:
        seqs, vectors = select_positions(seq, pos, x, position)
        expected = {}
        for s, n in lengths.items():
            rows = x[seq == s]
            if position == "mean":
                expected[s] = rows.mean(0)
            elif position == "last":
                expected[s] = rows[-1]
            elif -n <= position < n:
                expected[s] = rows[position]
        assert seqs.tolist() == list(expected), position
        np.testing.assert_allclose(vectors, np.array(list(expected.values())), rtol=1e-6)


def test_bad_params_and_labels_are_refused(tmp_path):
    with pytest.raises(ToolError, match="position"):
        make_tool("knowledge_prober", {"label_column": "x", "position": "first"})
    with pytest.raises(ToolError, match="dense hook family"):
        make_tool("knowledge_prober", {"label_column": "x", "hook": "attn_q"})
    with pytest.raises(ToolError, match="label_column: required"):
        make_tool("knowledge_prober", {})
    layout = _label_from_layer(tmp_path, first=1, n_layers=2, n_seq=20)
    with pytest.raises(StoreError, match="'relation'"):
        make_tool("knowledge_prober", {"label_column": "relation"}).compute_run(
            run_inputs(layout), None
        )
    with pytest.raises(ToolError, match="fewer than 2 classes"):
        make_tool("knowledge_prober", {"label_column": "text"}).compute_run(
            run_inputs(layout), None
        )


def test_runs_as_a_ray_task_on_the_demo_run(harvested):
    """Relation of the demo facts, read at the last token: above the majority baseline."""
    _, store, result = harvested
    analyze(result.run_dir, "knowledge_prober", {"label_column": "relation", "position": "last"})
    rows = (
        Store(store)
        .sql(
            f"""SELECT * FROM results_probe_layers WHERE run_id = '{result.run_id}'
                ORDER BY layer"""
        )
        .to_dicts()
    )
    relations = {json.loads(line)["relation"] for line in open(DEMO_DATA)}
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    last = rows[-1]
    assert last["hook"] == "blocks.3.hook_resid_post" and last["label_column"] == "relation"
    assert 2 <= last["n_classes"] <= len(relations)
    assert last["n_train"] + last["n_test"] == 40
    assert last["accuracy"] > last["baseline_accuracy"]
