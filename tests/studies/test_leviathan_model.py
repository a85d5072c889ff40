"""The Leviathan and baseline char LMs: sizes, shared init, hooks, and the shipped files."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from arrakis_ray.models.custom import build_custom, causal_softmax
from arrakis_ray.studies.leviathan.attention import correlation_scores, dot_scores
from arrakis_ray.studies.leviathan.model import build, parameter_count
from arrakis_ray.studies.leviathan.train import DEFAULT_EXCERPT, DEFAULT_OUT, KINDS

FACTORY = "arrakis_ray.studies.leviathan.model:build"
SUMMARY = json.loads((DEFAULT_OUT / "train_config.json").read_text())


def _config(kind: str) -> dict:
    return SUMMARY["models"][kind]["model_config"]


def test_the_two_models_have_the_same_parameter_count_within_5_percent():
    counts = {kind: parameter_count(build(**_config(kind)).module) for kind in KINDS}
    assert abs(counts["correlation"] / counts["dot"] - 1) <= 0.05
    cfg = _config("correlation")
    lag_params = cfg["n_layers"] * cfg["n_heads"] * (2 * cfg["max_lag"] + 1)
    assert counts["correlation"] - counts["dot"] == lag_params  # nothing else differs
    assert counts == {k: SUMMARY["models"][k]["parameters"] for k in KINDS}


def test_the_same_seed_gives_the_same_weights_and_the_same_function_at_init():
    models = {}
    for kind in KINDS:
        torch.manual_seed(7)
        models[kind] = build(**_config(kind)).module
    dot, corr = models["dot"].state_dict(), models["correlation"].state_dict()
    assert set(corr) - set(dot) == {f"blocks.{i}.attn.lag_weights" for i in range(2)}
    for name, value in dot.items():
        assert torch.equal(value, corr[name]), name
    ids = torch.randint(0, 86, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models["dot"](ids), models["correlation"](ids), rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=KINDS)
def shipped(request):
    kind = request.param
    model = build_custom(FACTORY, _config(kind), checkpoint=DEFAULT_OUT / f"{kind}.safetensors")
    return kind, model


def test_the_hooked_pattern_is_the_attention_computed_from_the_weights(shipped):
    kind, hooked = shipped
    state = hooked.model.state_dict()
    ids = torch.randint(2, 86, (2, 30), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{i}.attn.hook_{n}" for i in range(2) for n in ("q", "k", "pattern")]
    _, cache = hooked.run_with_cache(ids, hooks=names)
    for layer in range(2):
        q = cache[f"blocks.{layer}.attn.hook_q"].transpose(1, 2)  # TL [b, p, h, d] -> [b, h, p, d]
        k = cache[f"blocks.{layer}.attn.hook_k"].transpose(1, 2)
        if kind == "correlation":
            scores = correlation_scores(q, k, state[f"blocks.{layer}.attn.lag_weights"])
        else:
            scores = dot_scores(q, k)
        want = causal_softmax(scores)
        torch.testing.assert_close(
            cache[f"blocks.{layer}.attn.hook_pattern"], want, rtol=1e-5, atol=1e-6
        )


def test_the_shipped_models_predict_the_validation_excerpt_as_training_recorded(shipped):
    from transformers import AutoTokenizer

    kind, hooked = shipped
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT / "tokenizer")
    texts = [json.loads(line)["text"] for line in DEFAULT_EXCERPT.read_text().splitlines()]
    assert tokenizer.decode(tokenizer(texts[0])["input_ids"]) == texts[0]  # lossless, no BOS
    ids = torch.tensor(tokenizer("".join(texts))["input_ids"][: 20 * 129]).view(20, 129)
    with torch.no_grad():
        logits, _ = hooked.run_with_cache(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    bpc = loss.item() / math.log(2)
    # the excerpt is a slice of the validation text, so its bpc is near the recorded one
    assert abs(bpc - SUMMARY["models"][kind]["final_validation_bpc"]) < 0.25
    assert bpc < 3.0  # far below a uniform guess over 86 characters (6.4 bits)


def test_the_correlation_model_learned_to_use_other_lags():
    from safetensors.torch import load_file

    state = load_file(str(DEFAULT_OUT / "correlation.safetensors"))
    lags = torch.stack([state[f"blocks.{i}.attn.lag_weights"] for i in range(2)])
    max_lag = _config("correlation")["max_lag"]
    off_zero = torch.cat([lags[..., :max_lag], lags[..., max_lag + 1 :]], -1)
    assert off_zero.abs().max() > 1e-2  # it started at exactly zero


def test_the_curve_files_hold_loss_and_bpc_per_evaluation_for_both_models():
    steps = None
    for kind in KINDS:
        table = pq.read_table(DEFAULT_OUT / f"{kind}_curves.parquet").to_pylist()
        assert set(table[0]) == {"step", "split", "metric", "value"}
        val = {(r["step"], r["metric"]): r["value"] for r in table if r["split"] == "validation"}
        these = sorted({s for s, _ in val})
        assert steps is None or these == steps  # evaluated at the same steps
        steps = these
        for step in these:
            assert val[(step, "bpc")] == pytest.approx(val[(step, "loss")] / math.log(2))
        walls = [r["value"] for r in table if r["metric"] == "wall_s_per_step"]
        assert len(walls) == len(these) - 1 and all(w > 0 for w in walls)
    assert steps[0] == 0 and steps[-1] == SUMMARY["config"]["steps"]
