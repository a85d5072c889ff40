"""The bench's profiling: hooks that count every forward (and are always removed), bytes
and parameters known by construction, and the profile tool's table in-process.

No timing is asserted beyond "positive and finite": the machine is shared and noisy.
"""

from __future__ import annotations

import math

import pytest
import torch

from arrakis_ray.bench.profiling import (
    ModuleProfiler,
    profile_call,
    profile_forward,
    tensor_bytes,
)
from arrakis_ray.errors import ToolError
from arrakis_ray.models.load import build_model

# the tiny gpt2: d_model 32, 4 heads, vocab 64; tiny_config's d_mlp 128 and 64 positions
D, HEADS, VOCAB, D_MLP, POSITIONS = 32, 4, 64, 128, 64
TINY = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, vocab_size=VOCAB)
MODULES = [
    "embed",
    "blocks.0.attn",
    "blocks.0.mlp",
    "blocks.1.attn",
    "blocks.1.mlp",
    "ln_final",
    "unembed",
]
IDS = torch.tensor([[1, 5, 7, 9, 3], [2, 3, 4, 5, 6]])  # batch 2, 5 positions


@pytest.fixture(scope="module")
def gpt2():
    model = build_model("gpt2", **TINY)
    assert model.d_mlp == D_MLP and model.model.config.n_positions == POSITIONS  # tiny_config's
    return model


def calls(profiler: ModuleProfiler) -> dict[str, int]:
    return dict(profiler.table().select("module", "calls").iter_rows())


def test_every_forward_is_counted(gpt2):
    with ModuleProfiler(gpt2) as profiler:
        for _ in range(3):
            gpt2.run_with_cache(IDS)
        with torch.no_grad():
            gpt2.model(IDS)  # a forward that bypasses the HookedModel: counted too
    assert profiler.table()["module"].to_list() == MODULES
    assert calls(profiler) == dict.fromkeys(MODULES, 4)


def test_a_forward_stopped_early_counts_only_what_ran(gpt2):
    with ModuleProfiler(gpt2) as profiler:
        gpt2.run_with_cache(IDS, hooks=["blocks.0.hook_resid_post"])  # stops after block 0
    ran = {"embed", "blocks.0.attn", "blocks.0.mlp"}
    assert calls(profiler) == {m: int(m in ran) for m in MODULES}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_output_bytes_by_hand(attention):
    model = build_model("gpt2", **TINY)
    model.model.set_attn_implementation(attention)
    batch, pos = IDS.shape
    dense = batch * pos * D * 4  # float32 [batch, pos, d_model]
    # gpt2's attention returns (output, weights): weights [batch, head, q, k] when eager
    weights = batch * HEADS * pos * pos * 4 if attention == "eager" else 0
    per_call = {
        "embed": dense,  # the token embedding's output (the position embedding is timed only)
        "blocks.0.attn": dense + weights,
        "blocks.0.mlp": dense,
        "blocks.1.attn": dense + weights,
        "blocks.1.mlp": dense,
        "ln_final": dense,
        "unembed": batch * pos * VOCAB * 4,
    }
    with ModuleProfiler(model) as profiler:
        for _ in range(3):
            model.run_with_cache(IDS)
    table = profiler.table()
    assert dict(table.select("module", "peak_output_bytes").iter_rows()) == per_call
    assert dict(table.select("module", "output_bytes").iter_rows()) == {
        m: 3 * b for m, b in per_call.items()
    }


def test_tensor_bytes_searches_containers_and_counts_a_tensor_once():
    t = torch.zeros(3, 4)  # 48 bytes
    half = torch.zeros(5, dtype=torch.float16)  # 10 bytes
    assert tensor_bytes((t, None, [half, {"a": t}], "text")) == 58


def test_params_are_the_modules_parameter_counts():
    def numel(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    gpt2 = build_model("gpt2", **TINY)  # ties its unembedding to the embedding
    hf = gpt2.model.transformer
    with ModuleProfiler(gpt2) as profiler:
        pass
    params = dict(profiler.table().select("module", "params").iter_rows())
    assert params["embed"] == numel(hf.wte, hf.wpe) == (VOCAB + POSITIONS) * D
    for layer in (0, 1):
        block = hf.h[layer]
        assert params[f"blocks.{layer}.attn"] == numel(block.ln_1, block.attn)
        assert params[f"blocks.{layer}.mlp"] == numel(block.ln_2, block.mlp)
    assert params["ln_final"] == numel(hf.ln_f) == 2 * D
    assert params["unembed"] == 0  # tied: counted with the embedding

    llama = build_model("llama", **TINY, tie_word_embeddings=False)
    with ModuleProfiler(llama) as profiler:
        pass
    params = dict(profiler.table().select("module", "params").iter_rows())
    assert params["unembed"] == numel(llama.model.lm_head) == VOCAB * D
    block = llama.model.model.layers[1]
    assert params["blocks.1.mlp"] == numel(block.post_attention_layernorm, block.mlp)


def test_times_are_finite_and_shares_sum_to_one(gpt2):
    with ModuleProfiler(gpt2) as profiler:
        gpt2.run_with_cache(IDS)
    table = profiler.table()
    # no timing claims (a shared machine): only that each is a duration
    assert all(s >= 0 and math.isfinite(s) for s in table["seconds"])
    assert table["share_of_time"].sum() == pytest.approx(1.0)
    assert table["cuda_peak_bytes"].null_count() == len(MODULES)  # on CPU: null


def test_hooks_are_removed_on_exit_and_on_an_exception(gpt2):
    with ModuleProfiler(gpt2) as profiler:
        gpt2.run_with_cache(IDS)
    gpt2.run_with_cache(IDS)  # after the block: not seen
    assert calls(profiler) == dict.fromkeys(MODULES, 1)

    with pytest.raises(ValueError, match="in the body"):
        with ModuleProfiler(gpt2) as failed:
            gpt2.run_with_cache(IDS)
            raise ValueError("in the body")
    gpt2.run_with_cache(IDS)
    assert calls(failed) == dict.fromkeys(MODULES, 1)

    # no hook was left behind: a fresh profiler sees one call per forward, not two
    with ModuleProfiler(gpt2) as fresh:
        gpt2.run_with_cache(IDS)
    assert calls(fresh) == dict.fromkeys(MODULES, 1)


def test_a_profiler_is_entered_once_at_a_time_and_reset_on_reentry(gpt2):
    profiler = ModuleProfiler(gpt2)
    with profiler:
        with pytest.raises(ToolError, match="already active"):
            profiler.__enter__()
        gpt2.run_with_cache(IDS)
    with profiler:  # a new block measures itself only
        pass
    assert calls(profiler) == dict.fromkeys(MODULES, 0)
    assert profiler.table()["share_of_time"].null_count() == len(MODULES)


def test_profile_call_returns_the_result_and_the_table(gpt2):
    def two_forwards(ids):
        gpt2.run_with_cache(ids)
        return gpt2.run_with_cache(ids, hooks=["logits"])[0].shape

    shape, table = profile_call(gpt2, two_forwards, IDS)
    assert shape == (2, 5, VOCAB)
    assert table["calls"].to_list() == [2] * len(MODULES)


# ---------------------------------------------------------------------- the tool


def test_profile_forward_is_the_tool_with_its_formulas(gpt2):
    seq_len, d_head = 8, D // HEADS
    table = profile_forward(gpt2, seq_len=seq_len, repeats=2, warmup=0)
    from arrakis_ray.tools.profile_model import ProfileModel, ProfileParams

    assert table.columns == ProfileModel(ProfileParams()).result_schema().names
    rows = {r["module"]: r for r in table.iter_rows(named=True)}
    assert list(rows) == MODULES
    attn = (
        2 * D * (HEADS + 2 * HEADS) * d_head + 2 * HEADS * d_head * D + 4 * HEADS * d_head * seq_len
    )
    mlp = 2 * D * D_MLP + 2 * D_MLP * D  # gpt2's mlp is not gated
    flops = {"embed": 0, "ln_final": 0, "unembed": 2 * D * VOCAB}
    flops |= {f"blocks.{i}.{k}": f for i in (0, 1) for k, f in (("attn", attn), ("mlp", mlp))}
    assert {m: r["flops_per_token"] for m, r in rows.items()} == flops
    params = {
        "embed": (VOCAB + POSITIONS) * D,
        "ln_final": 2 * D,
        "unembed": 0,  # tied
    }
    # ln_1 + c_attn (weight, bias) + c_proj; ln_2 + c_fc + c_proj
    params |= {f"blocks.{i}.attn": 2 * D + (D * 3 * D + 3 * D) + (D * D + D) for i in (0, 1)}
    params |= {f"blocks.{i}.mlp": 2 * D + (D * D_MLP + D_MLP) + (D_MLP * D + D) for i in (0, 1)}
    assert {m: r["params"] for m, r in rows.items()} == params
    assert rows["embed"]["activation_bytes_per_token"] == 2 * D * 4  # hook_embed, hook_pos_embed
    assert all(
        r["seconds_per_forward"] > 0 and math.isfinite(r["seconds_per_forward"])
        for r in rows.values()
    )
    assert {(r["batch_size"], r["seq_len"], r["device"]) for r in rows.values()} == {(4, 8, "cpu")}
    # the profiler's parameter column is the tool's
    with ModuleProfiler(gpt2) as profiler:
        pass
    assert profiler.table()["params"].to_list() == table["params"].to_list()


def test_profile_forward_takes_its_shape_from_input_ids(gpt2):
    table = profile_forward(gpt2, torch.zeros(3, 6, dtype=torch.long), repeats=1, warmup=0)
    assert set(table["batch_size"]) == {3} and set(table["seq_len"]) == {6}
    table = profile_forward(gpt2, [1, 2, 3], repeats=1, warmup=0, run_id="exp-1")
    assert set(table["batch_size"]) == {1} and set(table["seq_len"]) == {3}
    assert set(table["run_id"]) == {"exp-1"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"seq_len": POSITIONS + 1}, f"seq_len {POSITIONS + 1} exceeds the model's"),
        ({"input_ids": [[1, 2], [3]]}, "not a rectangular list"),
        ({"input_ids": torch.zeros(2, 0)}, "got shape (2, 0)"),
    ],
)
def test_profile_forward_refuses_bad_parameters(gpt2, kwargs, message):
    with pytest.raises(ToolError) as err:
        profile_forward(gpt2, **kwargs)
    assert message in str(err.value)
