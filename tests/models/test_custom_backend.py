"""The plain-torch backend: a hand-written transformer hooked, harvested and analysed.

The model is ``arrakis_ray.models.toy`` (no model library in it). Every hook point is
checked against a forward computed here from the state dict alone, with plain tensor
ops; the harvest (replicas and layer stages) against the live model; a tool against
its definition over those values.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from support import DEMO_DATA, family_table

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ArrakisError, ModelLoadError
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.models.custom import build_custom
from arrakis_ray.models.load import model_fingerprint
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.runner import analyze

FACTORY = "arrakis_ray.models.toy:build"
CONFIG = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_mlp": 64, "vocab": 386}
N_HEADS, D_HEAD = 4, 8


@pytest.fixture(scope="module")
def toy():
    return build_custom(FACTORY, CONFIG, seed=3)


def _layer_norm(x, state, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def manual_forward(state: dict, ids: torch.Tensor, zero_head: tuple[int, int] | None = None):
    """Every hook value of the toy model from its weights, by hand (TL shapes)."""
    b, p = ids.shape
    out = {"hook_embed": state["embed.weight"][ids]}
    out["hook_pos_embed"] = state["pos_embed.weight"][:p][None].expand(b, -1, -1)
    x = out["hook_embed"] + out["hook_pos_embed"]
    for layer in range(CONFIG["n_layers"]):
        pre = f"blocks.{layer}"
        out[f"{pre}.hook_resid_pre"] = x
        normed = _layer_norm(x, state, f"{pre}.ln1")
        q, k, v = (
            _linear(normed, state, f"{pre}.attn.{n}").reshape(b, p, N_HEADS, D_HEAD) for n in "qkv"
        )
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D_HEAD)
        scores = scores + torch.full((p, p), float("-inf")).triu(1)
        pattern = scores.softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        if zero_head is not None and zero_head[0] == layer:
            z = z.clone()
            z[:, :, zero_head[1]] = 0
        attn_out = _linear(z.reshape(b, p, -1), state, f"{pre}.attn.o")
        mid = x + attn_out
        pre_act = _linear(_layer_norm(mid, state, f"{pre}.ln2"), state, f"{pre}.mlp.w_in")
        post = torch.nn.functional.gelu(pre_act)
        mlp_out = _linear(post, state, f"{pre}.mlp.w_out")
        x = mid + mlp_out
        out |= {
            f"{pre}.attn.hook_q": q,
            f"{pre}.attn.hook_k": k,
            f"{pre}.attn.hook_v": v,
            f"{pre}.attn.hook_pattern": pattern,
            f"{pre}.attn.hook_z": z,
            f"{pre}.hook_attn_out": attn_out,
            f"{pre}.hook_resid_mid": mid,
            f"{pre}.mlp.hook_pre": pre_act,
            f"{pre}.mlp.hook_post": post,
            f"{pre}.hook_mlp_out": mlp_out,
            f"{pre}.hook_resid_post": x,
        }
    normed = _layer_norm(x, state, "ln_final")
    mean = x.mean(-1, keepdim=True)
    out["ln_final.hook_scale"] = torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    out["ln_final.hook_normalized"] = normed
    out["logits"] = _linear(normed, state, "unembed")
    return out


def test_every_hook_point_equals_a_manual_computation(toy):
    ids = torch.randint(0, CONFIG["vocab"], (3, 9), generator=torch.Generator().manual_seed(0))
    names = toy.hook_names()
    assert len(names) == 2 + 2 * 12 + 3  # embed, pos; 12 per block; scale, normalized, logits
    logits, cache = toy.run_with_cache(ids, hooks=names)
    want = manual_forward(toy.model.state_dict(), ids)
    assert set(cache) == set(want)
    for name in names:
        torch.testing.assert_close(cache[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)


def test_an_intervention_on_a_custom_model_changes_what_the_manual_forward_says(toy):
    ids = torch.randint(0, CONFIG["vocab"], (2, 7), generator=torch.Generator().manual_seed(1))

    def zero_head_2(z, _name):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    logits, _ = toy.run_with_cache(ids, interventions={"blocks.1.attn.hook_z": zero_head_2})
    want = manual_forward(toy.model.state_dict(), ids, zero_head=(1, 2))["logits"]
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    plain, _ = toy.run_with_cache(ids)
    assert not torch.allclose(plain, want, atol=1e-3)  # the head mattered


def test_padding_and_positions_follow_the_attention_mask(toy):
    ids = torch.randint(3, CONFIG["vocab"], (1, 6), generator=torch.Generator().manual_seed(2))
    alone, _ = toy.run_with_cache(ids)
    padded = torch.cat([torch.zeros(1, 2, dtype=ids.dtype), ids], dim=1)  # left padding
    mask = torch.cat([torch.zeros(1, 2), torch.ones(1, 6)], dim=1).long()
    with_pad, _ = toy.run_with_cache(padded, attention_mask=mask)
    torch.testing.assert_close(with_pad[:, 2:], alone, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loads_and_the_fingerprint_follows_the_weights(tmp_path, toy):
    from safetensors.torch import save_file

    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in toy.model.state_dict().items()}, str(path))
    loaded = build_custom(FACTORY, CONFIG, checkpoint=path, seed=99)  # seed is overridden
    assert model_fingerprint(loaded) == model_fingerprint(toy)
    with torch.no_grad():
        loaded.model.unembed.bias[0] += 1.0
    assert model_fingerprint(loaded) != model_fingerprint(toy)
    other = build_custom(FACTORY, {**CONFIG, "d_mlp": 32}, seed=3)
    assert model_fingerprint(other) != model_fingerprint(toy)


@pytest.mark.parametrize(
    ("factory", "config", "message"),
    [
        ("arrakis_ray.models.toy", {}, "write it as 'package.module:function'"),
        ("arrakis_ray.no_such:build", {}, "cannot import arrakis_ray.no_such"),
        ("arrakis_ray.models.toy:nothing", {}, "has no function nothing"),
        ("arrakis_ray.models.custom:causal_softmax", {}, "model.config for"),
        (FACTORY, {"n_layer": 2}, "unexpected keyword argument 'n_layer'"),
    ],
)
def test_a_bad_factory_is_refused_in_one_line(factory, config, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        build_custom(factory, config)
    assert "\n" not in str(info.value)


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path, toy):
    from safetensors.torch import save_file

    small = build_custom(FACTORY, {**CONFIG, "d_mlp": 16})
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.model.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"small.safetensors does not fit .*size mismatch"):
        build_custom(FACTORY, CONFIG, checkpoint=path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read .*garbage.safetensors"):
        build_custom(FACTORY, CONFIG, checkpoint=garbage)


def _pipeline(**harvest):
    return pipeline_from_dict(
        {
            "name": "toy",
            "model": {
                "factory": FACTORY,
                "config": CONFIG,
                "tokenizer": "zoo:facts-gpt2",
                "seed": 3,
            },
            "data": {"path": str(DEMO_DATA), "context_length": 12, "max_documents": 10},
            "harvest": {
                "hooks": [
                    "blocks.*.hook_resid_post",
                    "blocks.*.attn.hook_pattern",
                    "blocks.*.mlp.hook_post",
                    "ln_final.hook_normalized",
                ],
                "batch_size": 4,
                "shard_size": 5,
                "storage_dtype": "float32",
                **harvest,
            },
        }
    )


def _stored_sequences(run_dir) -> dict[int, np.ndarray]:
    reader = RunReader.open(run_dir)
    tokens = pa.concat_tables([reader.tokens(s) for s in reader.shards]).sort_by(
        [("seq_id", "ascending"), ("pos", "ascending")]
    )
    seqs: dict[int, list[int]] = {}
    for seq, tok in zip(tokens["seq_id"].to_pylist(), tokens["token_id"].to_pylist(), strict=True):
        seqs.setdefault(seq, []).append(tok)
    return {seq: np.array(ids) for seq, ids in seqs.items()}


@pytest.mark.parametrize("harvest_overrides", [{"actors": 2}, {"stages": 2}])
def test_a_custom_model_is_harvested_as_the_live_model_computes(
    ray_session, tmp_path, toy, harvest_overrides
):
    result = harvest(_pipeline(**harvest_overrides), tmp_path / "store")
    assert result.shards_done == 2
    resid = family_table(result.run_dir, "resid_post")
    for seq, ids in _stored_sequences(result.run_dir).items():
        _, cache = toy.run_with_cache(torch.tensor(ids)[None], hooks=["blocks.1.hook_resid_post"])
        rows = resid.filter(
            pa.compute.and_(
                pa.compute.equal(resid["layer"], 1), pa.compute.equal(resid["seq_id"], seq)
            )
        )
        rows = rows.sort_by("pos")
        stored = np.column_stack([rows[f"d{i}"].to_numpy() for i in range(32)])
        np.testing.assert_allclose(
            stored, cache["blocks.1.hook_resid_post"][0].numpy(), rtol=1e-5, atol=1e-5
        )


def test_tools_run_on_a_custom_model_run(ray_session, tmp_path, toy):
    result = harvest(_pipeline(), tmp_path / "store")
    analyze(result.run_dir, "logit_lens")
    table = pq.read_table(result.run_dir / "results" / "logit_lens")
    last = table.filter(pa.compute.equal(table["layer"], 1)).to_pylist()
    seqs = _stored_sequences(result.run_dir)
    for row in last[:10]:
        logits, _ = toy.run_with_cache(torch.tensor(seqs[row["seq_id"]])[None])
        assert row["top1_token_id"] == int(logits[0, row["pos"]].argmax())


def test_a_factory_pipeline_is_refused_before_any_work_on_bad_input(ray_session, tmp_path):
    raw = {
        "name": "toy",
        "model": {
            "factory": "arrakis_ray.models.toy:build",
            "config": {"nope": 1},
            "tokenizer": "zoo:facts-gpt2",
        },
        "data": {"path": str(DEMO_DATA), "max_documents": 2},
        "harvest": {"hooks": ["blocks.0.hook_resid_post"]},
    }
    with pytest.raises(ArrakisError, match="unexpected keyword argument 'nope'"):
        harvest(pipeline_from_dict(raw), tmp_path / "store")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


def test_a_model_without_norms_has_no_ln_final_hooks_and_norm_tools_use_the_identity(
    ray_session, tmp_path
):
    """No LayerNorm at all (as in the grokking model): no ``ln_final.*`` hook points, and
    direct logit attribution reads the identity in the final norm's place, so the
    components still sum to the logit (less the unembedding bias)."""
    bare = build_custom(FACTORY, {**CONFIG, "norms": False}, seed=3)
    assert not [n for n in bare.hook_names() if n.startswith("ln_final")]
    with pytest.raises(ArrakisError, match="ln_final.hook_normalized exists only in models with"):
        bare.resolve_hooks(["ln_final.hook_normalized"])
    raw = {
        "name": "toy-no-norms",
        "model": {
            "factory": FACTORY,
            "config": {**CONFIG, "norms": False},
            "tokenizer": "zoo:facts-gpt2",
            "seed": 3,
        },
        "data": {"path": str(DEMO_DATA), "context_length": 8, "max_documents": 4},
        "harvest": {
            "hooks": [
                "hook_*",
                "blocks.*.hook_resid_post",
                "blocks.*.attn.hook_z",
                "blocks.*.hook_mlp_out",
                "blocks.*.hook_attn_out",
            ],
            "storage_dtype": "float32",
        },
    }
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    analyze(result.run_dir, "logit_attribution")
    table = pq.read_table(result.run_dir / "results" / "logit_attribution").to_pylist()
    totals: dict[tuple[int, int, int], float] = {}
    for row in table:
        key = (row["seq_id"], row["pos"], row["target_token_id"])
        totals[key] = totals.get(key, 0.0) + row["contribution"]
    seqs = _stored_sequences(result.run_dir)
    bias = bare.model.unembed.bias
    for (seq, pos, target), total in list(totals.items())[:12]:
        logits, _ = bare.run_with_cache(torch.tensor(seqs[seq])[None])
        want = float(logits[0, pos, target] - bias[target])
        assert total == pytest.approx(want, rel=1e-4, abs=1e-4)
    # the live profile has no final norm to time or count
    analyze(result.run_dir, "profile_model", {"repeats": 1, "warmup": 0})
    profile = pq.read_table(result.run_dir / "results" / "profile_model").to_pylist()
    by_module = {row["module"]: row for row in profile}
    assert by_module["ln_final"]["params"] == 0
    assert by_module["ln_final"]["seconds_per_forward"] == 0.0
    block = bare.model.blocks[0]
    assert by_module["blocks.0.attn"]["params"] == sum(p.numel() for p in block.attn.parameters())
    assert by_module["blocks.0.mlp"]["params"] == sum(p.numel() for p in block.mlp.parameters())


def test_a_live_tool_intervenes_on_a_custom_model(ray_session, tmp_path, toy):
    """Zero ablation of head 2 in layer 1: the tool's loss equals the manual forward's."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the capital of france is", "answer": "paris"}\n')
    result = harvest(_pipeline(), tmp_path / "store")
    analyze(result.run_dir, "ablation", {"prompts": str(prompts), "components": ["L1H2"]})
    row = pq.read_table(result.run_dir / "results" / "ablation").to_pylist()[0]
    tokenizer = toy.tokenizer or _facts_tokenizer()
    ids = tokenizer("the capital of france is paris", add_special_tokens=True)["input_ids"]
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id, *ids]
    ids = torch.tensor([ids])
    state = toy.model.state_dict()
    for logits, key in (
        (manual_forward(state, ids, zero_head=(1, 2))["logits"], "loss"),
        (manual_forward(state, ids)["logits"], "base_loss"),
    ):
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert row[key] == pytest.approx(float(loss), rel=1e-4)


def _facts_tokenizer():
    from arrakis_ray.config import ModelConfig
    from arrakis_ray.harvest.model_source import load_tokenizer

    return load_tokenizer(ModelConfig(zoo="facts-gpt2"))
