"""build_model, load_pretrained, model_fingerprint, tiny_config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import ModelLoadError
from arrakis_ray.models import build_model, load_pretrained, model_fingerprint, tiny_config


def test_unknown_arch_suggests_close_match():
    with pytest.raises(ModelLoadError, match="llama"):
        build_model("lama")
    with pytest.raises(ModelLoadError, match="gpt-neox"):
        build_model("gpt-neoxx")


def test_hf_spelling_and_overrides(tokens):
    hm = build_model("gpt_neox", num_hidden_layers=3, use_parallel_residual=False)
    assert hm.arch == "gpt-neox" and hm.n_layers == 3 and not hm.parallel_residual
    cfg = tiny_config("gpt-neo", num_hidden_layers=3)
    assert cfg.attention_layers == ["global", "local", "global"]
    assert tiny_config("gemma", hidden_size=128).head_dim == 32  # 128 / 4 heads


def test_bad_dtype_is_a_load_error():
    with pytest.raises(ModelLoadError, match="bfloat16"):
        build_model("llama", dtype="float8")


def test_bfloat16_model_caches_bfloat16(tokens):
    hm = build_model("mistral", dtype="bfloat16")
    assert hm.dtype == torch.bfloat16
    logits, cache = hm.run_with_cache(tokens, hooks=["blocks.1.hook_resid_post", "logits"])
    assert cache["blocks.1.hook_resid_post"].dtype == torch.bfloat16
    assert logits.shape == (2, tokens.shape[1], 128)


def test_seed_determines_weights_and_fingerprint(tiny_models):
    again = build_model("llama", seed=0)
    assert model_fingerprint(again) == model_fingerprint(tiny_models["llama"])
    for name, param in again.model.named_parameters():
        assert torch.equal(param, tiny_models["llama"].model.get_parameter(name)), name
    assert model_fingerprint(build_model("llama", seed=1)) != model_fingerprint(again)
    assert model_fingerprint(build_model("llama", rms_norm_eps=1e-5)) != model_fingerprint(again)


def test_fingerprint_is_stable_across_processes(tiny_models):
    code = (
        "from arrakis_ray.models import build_model, model_fingerprint;"
        "print(model_fingerprint(build_model('gpt2', seed=0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == model_fingerprint(tiny_models["gpt2"])


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox", "phi3", "gemma"])
def test_save_then_load_round_trip(tiny_models, tmp_path, tokens, arch):
    hm = tiny_models[arch]
    hm.model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.arch == arch and loaded.tokenizer is None
    want, _ = hm.run_with_cache(tokens, hooks=["logits"])
    got, _ = loaded.run_with_cache(tokens, hooks=["logits"])
    assert torch.equal(got, want)
    assert model_fingerprint(loaded) == model_fingerprint(hm)


def test_load_picks_up_a_local_tokenizer(tiny_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(tmp_path)
    tiny_models["llama"].model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, dtype="float32")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("w5 w7")["input_ids"] == [5, 7]


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_pretrained(missing)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="bert") as err:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_ln_final_and_unembed_keep_grad_outside_inference(tiny_models):
    hm = tiny_models["gpt2"]
    with torch.enable_grad():
        resid = torch.randn(1, 3, hm.d_model, requires_grad=True)
        logits = hm.unembed(hm.ln_final(resid))
        logits.sum().backward()
    assert resid.grad is not None and resid.grad.shape == resid.shape
    assert_close(logits.detach(), hm.model.lm_head(hm.model.transformer.ln_f(resid)).detach())


def test_a_familys_own_config_names_override_the_tiny_defaults():
    from arrakis_ray.models import build_model

    model = build_model("gpt2", n_layer=3, n_embd=96, n_head=4, n_positions=32)
    assert (model.n_layers, model.d_model, model.n_heads) == (3, 96, 4)
    assert model.model.config.n_positions == 32


def test_corrupt_weights_are_one_line_naming_the_file(tmp_path) -> None:
    import shutil

    from arrakis_ray.errors import ModelLoadError
    from arrakis_ray.models.load import load_pretrained
    from arrakis_ray.zoo import zoo_path

    model = tmp_path / "model"
    shutil.copytree(zoo_path("facts-gpt2"), model)
    (model / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot load the model weights {model / 'model.safetensors'}: ")
