"""The bench's plots: each chart's numbers against the model computed another way, HF
module names mapped to hooks in every family, clear errors, and offline rendering."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
import torch

from arrakis_ray.bench.plots import (
    PLOT_TYPES,
    PlotSpec,
    build_chart,
    plot_data,
    resolve_data_keys,
)
from arrakis_ray.errors import ConfigError, ToolError
from arrakis_ray.models.adapters import get_module
from arrakis_ray.models.load import build_model
from arrakis_ray.models.tiny import ARCHITECTURES

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
IDS = torch.tensor([[1, 5, 7, 9, 3, 5], [2, 3, 4, 5, 6, 7]])  # two sequences: the first is drawn


@pytest.fixture(scope="module")
def gpt2():
    return build_model("gpt2", **TINY)


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model, with its tokenizer."""
    from arrakis_ray.models.load import load_pretrained
    from arrakis_ray.zoo import zoo_path

    return load_pretrained(zoo_path("facts-gpt2"))


def chart_values(chart) -> list[dict]:
    """Every inline row of a chart's Vega-Lite JSON (top level and sub-charts)."""
    rows: list[dict] = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "values" in data:
                rows.extend(data["values"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(chart.to_dict())
    return rows


# ---------------------------------------------------------------------- values


def test_attention_cells_are_hf_attention_weights(gpt2):
    frame = plot_data(gpt2, PlotSpec("attention", "blocks.1.attn.hook_pattern"), IDS).frame
    # reference: HF's own eager attention weights of the first sequence, no hooks
    gpt2.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = gpt2.model(IDS[:1], output_attentions=True)
    finally:
        gpt2.model.set_attn_implementation("sdpa")
    expected = out.attentions[1][0].numpy()  # [head, q, k]
    assert len(frame) == expected.size  # 4 heads x 6 x 6
    got = np.zeros_like(expected)
    got[frame["head"], frame["q_pos"], frame["k_pos"]] = frame["weight"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # rows of a softmax
    assert np.all(np.triu(got, k=1) == 0)  # causal: no key after its query


def test_attention_chart_carries_the_frame_and_says_first_sequence(gpt2):
    data = plot_data(gpt2, PlotSpec("attention", "blocks.0.attn.hook_pattern"), IDS)
    chart = build_chart(gpt2, PlotSpec("attention", "blocks.0.attn.hook_pattern"), IDS)
    rows = chart_values(chart)
    assert pl.DataFrame(rows).sort("head", "q_pos", "k_pos")["weight"].to_list() == pytest.approx(
        data.frame.sort("head", "q_pos", "k_pos")["weight"].to_list()
    )
    assert "first of 2 sequences" in chart.to_dict()["title"]["subtitle"]


def test_logit_lens_by_hand_through_final_norm_and_unembedding(gpt2):
    frame = plot_data(gpt2, PlotSpec("logit_lens"), IDS).frame.sort("layer", "pos")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "logits"]
    logits, cache = gpt2.run_with_cache(IDS[:1], hooks=hooks)
    ln_f = get_module(gpt2.model, gpt2.adapter.final_norm)
    w_u = get_module(gpt2.model, gpt2.adapter.lm_head).weight
    target = IDS[0, 1:]
    for layer in (0, 1):
        x = cache[f"blocks.{layer}.hook_resid_post"][0]
        with torch.inference_mode():  # the cache holds inference tensors
            normed = torch.nn.functional.layer_norm(x, (32,), ln_f.weight, ln_f.bias, ln_f.eps)
            probs = torch.softmax(normed @ w_u.T, dim=-1)  # gpt2's lm_head has no bias
        rows = frame.filter(pl.col("layer") == layer)
        assert rows["top1_id"].to_list() == probs.argmax(-1).tolist()
        np.testing.assert_allclose(rows["top1_prob"], probs.max(-1).values, rtol=1e-5)
        p_target = probs[:-1].gather(1, target[:, None])[:, 0]
        np.testing.assert_allclose(rows["target_prob"][:-1], p_target, rtol=1e-5)
        ranks = (probs[:-1] > p_target[:, None]).sum(-1) + 1
        assert rows["target_rank"][:-1].to_list() == ranks.tolist()
        assert rows["target_prob"][-1] is None  # the last token has no next one
    # the last layer's lens is the model's own prediction
    last = frame.filter(pl.col("layer") == 1)
    model_probs = torch.softmax(logits[0], dim=-1)
    np.testing.assert_allclose(last["top1_prob"], model_probs.max(-1).values, rtol=1e-5)


def test_logit_lens_counts_resid_pre_as_the_previous_layer(gpt2):
    spec = PlotSpec("logit_lens", ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"))
    frame = plot_data(gpt2, spec, IDS).frame
    assert sorted(frame["layer"].unique().to_list()) == [-1, 0]  # embeddings, block 0's output
    # blocks.1.hook_resid_pre and blocks.0.hook_resid_post are one state: drawn once
    both = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")
    assert len(plot_data(gpt2, PlotSpec("logit_lens", both), IDS).frame) == IDS.shape[1]


def test_residual_norms_are_l2_norms_of_the_cache(gpt2):
    data = plot_data(gpt2, PlotSpec("residual_norms"), IDS)
    assert data.hooks == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    _, cache = gpt2.run_with_cache(IDS[:1], hooks=data.hooks)
    for hook in data.hooks:
        expected = torch.sqrt((cache[hook][0] ** 2).sum(-1))
        got = data.frame.filter(pl.col("hook") == hook).sort("pos")["norm"]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_neuron_activations_are_the_top_k_by_max_abs(gpt2):
    data = plot_data(gpt2, PlotSpec("neuron_activations", top_k=5), IDS)
    assert data.hooks == ["blocks.1.mlp.hook_post"]  # the middle layer's mlp by default
    _, cache = gpt2.run_with_cache(IDS[:1], hooks=data.hooks)
    act = cache["blocks.1.mlp.hook_post"][0].numpy()  # [pos, d_mlp]
    top = np.argsort(-np.abs(act).max(0), kind="stable")[:5]
    frame = data.frame.sort("rank", "pos")
    assert frame["neuron"].unique(maintain_order=True).to_list() == top.tolist()
    np.testing.assert_allclose(frame["activation"], act[:, top].T.ravel(), rtol=1e-6)


def test_activations_are_the_top_k_dims_by_variance(gpt2):
    hooks = ("blocks.0.hook_attn_out", "blocks.1.hook_resid_post")
    data = plot_data(gpt2, PlotSpec("activations", hooks, top_k=3), IDS)
    _, cache = gpt2.run_with_cache(IDS[:1], hooks=list(hooks))
    for hook in hooks:
        act = cache[hook][0].numpy()
        top = np.argsort(-act.var(0), kind="stable")[:3]
        rows = data.frame.filter(pl.col("hook") == hook).sort("rank", "pos")
        assert rows["dim"].unique(maintain_order=True).to_list() == top.tolist()
        np.testing.assert_allclose(rows["activation"], act[:, top].T.ravel(), rtol=1e-6)
        np.testing.assert_allclose(rows["variance"][0], act.var(0)[top[0]], rtol=1e-5)


def test_axes_show_token_texts_with_a_tokenizer_and_ids_without(gpt2, demo):
    ids = demo.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    frame = plot_data(demo, PlotSpec("attention", "blocks.0.attn.hook_pattern"), ids).frame
    labels = frame.filter(pl.col("head") == 0, pl.col("k_pos") == 0).sort("q_pos")["q_label"]
    texts = [demo.tokenizer.decode([i]) for i in ids[0].tolist()]
    assert labels.to_list() == [f"{i}: {t}" for i, t in enumerate(texts)]
    frame = plot_data(gpt2, PlotSpec("neuron_activations", top_k=1), IDS).frame
    assert frame.sort("pos")["pos_label"].to_list() == [
        "0: 1",
        "1: 5",
        "2: 7",
        "3: 9",
        "4: 3",
        "5: 5",
    ]


# ---------------------------------------------------------------------- HF module names


@pytest.mark.parametrize(
    ("arch", "plot_type", "key", "hook"),
    [
        ("gpt2", "attention", "h.1.attn.c_attn", "blocks.1.attn.hook_pattern"),
        ("gpt2", "attention", "transformer.h.0.attn.c_proj", "blocks.0.attn.hook_pattern"),
        ("gpt2", "neuron_activations", "h.0.mlp.c_fc", "blocks.0.mlp.hook_post"),
        ("gpt2", "activations", "h.1.attn.c_attn", "blocks.1.hook_attn_out"),
        ("gpt2", "logit_lens", "h.1.ln_1", "blocks.1.hook_resid_post"),
        ("gpt2", "residual_norms", "transformer.wte", "blocks.0.hook_resid_pre"),
        ("gpt2", "activations", "transformer.ln_f", "ln_final.hook_normalized"),
        ("llama", "attention", "model.layers.1.self_attn.q_proj", "blocks.1.attn.hook_pattern"),
        ("llama", "attention", "layers.0.self_attn.o_proj", "blocks.0.attn.hook_pattern"),
        ("llama", "neuron_activations", "layers.1.mlp.down_proj", "blocks.1.mlp.hook_post"),
        ("gpt-neox", "attention", "gpt_neox.layers.1.attention.query_key_value",
         "blocks.1.attn.hook_pattern"),
        ("gpt-neox", "neuron_activations", "layers.0.mlp.dense_4h_to_h", "blocks.0.mlp.hook_post"),
        ("gpt-neo", "attention", "transformer.h.1.attn.attention.q_proj",
         "blocks.1.attn.hook_pattern"),
    ],
)  # fmt: skip
def test_hf_module_names_map_to_hooks(arch, plot_type, key, hook, caplog):
    model = build_model(arch, **TINY)
    with caplog.at_level(logging.INFO, logger="arrakis_ray.bench.plots"):
        assert resolve_data_keys(model, PlotSpec(plot_type, key)) == [hook]
    assert f"{key} → {hook}" in caplog.text
    data = plot_data(model, PlotSpec(plot_type, key), IDS[:1])
    assert any(f"{key} → {hook}" in note for note in data.notes)  # shown under the title
    assert data.frame["hook"].unique().to_list() == [hook]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_family_maps_its_attention_and_mlp_modules(arch):
    model = build_model(arch)
    a = model.adapter
    out_proj = f"{a.layers}.1.{a.o_proj}"  # the module paths of this family, by its adapter
    mlp_down = f"{a.layers}.0.{a.mlp_down}"
    assert resolve_data_keys(model, PlotSpec("attention", out_proj)) == [
        "blocks.1.attn.hook_pattern"
    ]
    assert resolve_data_keys(model, PlotSpec("neuron_activations", mlp_down)) == [
        "blocks.0.mlp.hook_post"
    ]


def test_a_module_glob_maps_every_layer(gpt2):
    keys = resolve_data_keys(gpt2, PlotSpec("activations", "h.*.attn.c_proj"))
    assert keys == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PlotSpec("attention", "h.9.attn.c_attn"),
         "data_keys 'h.9.attn.c_attn': the model has 2 layers (blocks 0..1)"),
        (PlotSpec("attention", "blocks.7.attn.hook_pattern"),
         "data_keys 'blocks.7.attn.hook_pattern': the model has 2 layers (blocks 0..1)"),
        (PlotSpec("attention", "blocks.1.attn.hook_patern"),
         "did you mean blocks.1.attn.hook_pattern"),
        (PlotSpec("attention", "h.1.mlp.c_fc"),
         "HF module transformer.h.1.mlp.c_fc is inside block 1's mlp, where the attention plot"),
        (PlotSpec("attention", "blocks.1.hook_resid_post"),
         "the attention plot reads attention patterns"),
        (PlotSpec("logit_lens", "blocks.1.hook_attn_out"),
         "the logit_lens plot reads residual stream states"),
        (PlotSpec("neuron_activations", "blocks.0.attn.hook_q"), "dense hooks"),
        (PlotSpec("activations", "transformer"), "transformer is outside every block"),
    ],
)  # fmt: skip
def test_bad_data_keys_give_one_clear_line(gpt2, spec, message):
    with pytest.raises(ToolError) as err:
        build_chart(gpt2, spec, IDS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (None, "input_ids is required"),
        ([[1, 2], [3]], "not a rectangular list"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "got shape (1, 2, 3)"),
        ([[0.5, 1.0]], "must be integers"),
        ([[1, 64]], "token id 64 is outside the model's vocabulary (0..63)"),
        ([list(range(60)) * 2], "120 tokens exceed the model's 64 learned positions"),
    ],
)
def test_bad_input_ids_give_one_clear_line(gpt2, ids, message):
    with pytest.raises(ToolError, match="input_ids") as err:
        build_chart(gpt2, PlotSpec("residual_norms"), ids)
    assert message in str(err.value)


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match="plot_type 'atention' .did you mean attention"):
        PlotSpec("atention")
    with pytest.raises(ConfigError, match="top_k must be a positive integer"):
        PlotSpec("activations", top_k=0)
    assert PlotSpec("attention", ["a", "b"]).data_keys == ("a", "b")
    assert PlotSpec("attention", "a").data_keys == ("a",)


# ---------------------------------------------------------------------- rendering


@pytest.mark.parametrize("plot_type", PLOT_TYPES)
def test_every_plot_renders_offline(gpt2, plot_type, capfd):
    import vl_convert

    spec = PlotSpec(plot_type, top_k=4)
    chart = build_chart(gpt2, spec, IDS)
    svg = vl_convert.vegalite_to_svg(chart.to_dict())
    # vl_convert reports a failed render on stderr and returns an empty frame
    assert "ERROR" not in capfd.readouterr().err
    rows = len(plot_data(gpt2, spec, IDS).frame)
    assert svg.count("<path") >= rows  # a mark (cell, point) per row at least
    assert len(chart_values(chart)) == rows
