"""The model facts kept on disk (``harvest.facts_cache``): a plan is the same whether
its facts come from the model or from the cache, a changed model file or a corrupt
entry is learned again, failures are never kept, and a second process plans a sweep
importing neither torch nor transformers.

Every test points ``ARRAKIS_RAY_CACHE_DIR`` at its own directory and forgets this
process's memory of entries (``fresh_process``), so a plan reads the entries on disk
as a new process would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ConfigError, ModelLoadError, UnknownHookError
from arrakis_ray.harvest import facts_cache
from arrakis_ray.harvest.model_source import describe_model, model_source_fingerprint
from arrakis_ray.harvest.plan import model_shape, plan_run
from arrakis_ray.zoo import zoo_path

SOURCE = "pipelines/facts.yaml"
LLAMA = {  # a random-init model from its config (grouped-query attention, rotary)
    "arch": "llama",
    "config": {
        "vocab_size": 400,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": 64,
    },
    "tokenizer": "zoo:facts-gpt2",
}
GLOBS = ["blocks.*.attn.hook_[qkv]", "blocks.1.hook_resid_*", "ln_final.*", "logits"]
CASES = {
    "zoo": ({"zoo": "facts-gpt2"}, GLOBS + ["hook_pos_embed"], {}),
    "zoo-auto-shards": ({"zoo": "facts-gpt2"}, ["blocks.*.hook_resid_post"], {"shard": None}),
    "zoo-packed": (
        {"zoo": "facts-gpt2"},
        ["blocks.*.mlp.hook_post"],
        {"packed": True, "shard": None},
    ),
    "llama-config": (LLAMA, GLOBS, {}),
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """This test's cache directory (never the user's)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ARRAKIS_RAY_CACHE_DIR", str(path))
    fresh_process(monkeypatch)
    return path / "facts"


def fresh_process(monkeypatch) -> None:
    """Forget the entries this process has read or computed: the next plan reads disk."""
    monkeypatch.setattr(facts_cache, "_MEMORY", {})


def config_of(model: dict, hooks: list[str], shard=8, packed=False, **data):
    raw = pipeline_dict(hooks=hooks, shard_size=shard)
    raw["model"] = model
    raw["data"].update(max_documents=16, keep_columns=[], **data)
    if packed:
        raw["data"]["mode"] = "packed"
    return pipeline_from_dict(raw, source=SOURCE)


def entries(cache: Path, kind: str = "") -> list[Path]:
    return sorted(cache.glob(f"{kind}*.json"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_plan_is_the_same_from_the_model_and_from_the_cache(case, cache, monkeypatch):
    model, hooks, options = CASES[case]
    config = config_of(model, hooks, **options)
    computed = plan_run(config)
    kinds = {p.name.split("-")[0] for p in entries(cache)}
    assert {"model", "tokenizer"} <= kinds
    assert ("fingerprint" in kinds) == ("zoo" in model)
    assert ("tokens_per_document" in kinds) == bool(options.get("packed"))

    fresh_process(monkeypatch)
    described = facts_cache._described.cache_info().misses
    from_cache = plan_run(config)
    assert facts_cache._described.cache_info().misses == described  # no model was built
    assert from_cache == computed  # run id, identity, hooks, shape, shards, bytes, ...
    assert from_cache.predicted_bytes == computed.predicted_bytes

    # both equal what the meta model and the checkpoint's bytes say
    meta = describe_model(config.model)
    assert list(from_cache.hooks) == meta.resolve_hooks(hooks)
    assert from_cache.shape == model_shape(meta)
    assert from_cache.identity["model"] == model_source_fingerprint(config.model)
    stored = [(h, *meta.hook_shape(h)) for h in from_cache.hooks]
    kept = facts_cache.model_facts(config.model, SOURCE).resolve(hooks)[1]
    assert [(h, k, w or 0) for h, k, w in stored] == [(h, k, w) for h, k, w, _ in kept]


NEOX = {"arch": "gpt-neox", "config": {"vocab_size": 400}, "tokenizer": "zoo:facts-gpt2"}


@pytest.mark.parametrize(
    "model", [{"zoo": "facts-gpt2"}, LLAMA, NEOX], ids=["zoo", "llama", "neox"]
)
def test_hooks_resolve_from_the_facts_as_on_the_model(model):
    config = config_of(model, ["logits"])
    meta = describe_model(config.model)
    facts = facts_cache.model_facts(config.model, SOURCE)
    assert [h for h, *_ in facts.hooks] == meta.hook_names()
    for patterns in (["*"], ["blocks.0.*", "hook_embed"], ["blocks.*.hook_resid_mid"], "logits"):
        if patterns == ["blocks.*.hook_resid_mid"] and meta.parallel_residual:
            continue  # gpt-neox's parallel blocks have none
        names, shapes = facts.resolve(patterns)
        assert list(names) == meta.resolve_hooks(patterns)
        heads = [meta.n_heads_of(h) if meta.hook_shape(h)[0] != "dense" else 1 for h in names]
        assert [s[3] for s in shapes] == heads


def test_a_changed_model_file_is_learned_again(tmp_path, cache, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(zoo_path("facts-gpt2"), checkpoint)
    config = config_of({"path": str(checkpoint)}, ["blocks.*.hook_resid_post"])
    before = plan_run(config)
    n_entries = len(entries(cache))

    # a file the fingerprint reads: the run id follows the bytes, not a kept entry
    with open(checkpoint / "README.md", "a") as f:
        f.write("one more line\n")
    fresh_process(monkeypatch)
    after = plan_run(config)
    assert after.identity["model"] == model_source_fingerprint(config.model)
    assert after.identity["model"] != before.identity["model"]
    assert after.run_id != before.run_id
    assert len(entries(cache)) == n_entries + 3  # model, tokenizer and fingerprint again

    # the config: the model's facts follow it (fewer positions, a longer context refused)
    hf = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**hf, "n_positions": 20}))
    fresh_process(monkeypatch)
    with pytest.raises(ConfigError, match="24 tokens, but the model has 20 positions"):
        plan_run(config)


def test_a_corrupt_entry_is_computed_again(cache, monkeypatch):
    config = config_of({"zoo": "facts-gpt2"}, GLOBS, packed=True, shard=None)
    expected = plan_run(config)
    written = entries(cache)
    assert len(written) == 4
    assert [p.name.split("-")[0] for p in written] == [
        "fingerprint", "model", "tokenizer", "tokens_per_document"
    ]  # fmt: skip
    damages = [
        b"",  # empty
        None,  # valid JSON, its value of the wrong shape
        b"\x00\xff not json",  # garbage
        b'{"key": {"kind": ',  # cut short
    ]
    for path, damage in zip(written, damages, strict=True):
        if damage is None:
            entry = json.loads(path.read_text())
            entry["value"] = {"shape": 3} if isinstance(entry["value"], dict) else "x"
            damage = json.dumps(entry).encode()
        path.write_bytes(damage)
    fresh_process(monkeypatch)
    assert plan_run(config) == expected
    for path in written:  # each was written again, whole
        assert json.loads(path.read_text())["value"] is not None


def test_an_unwritable_cache_dir_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = config_of(LLAMA, GLOBS)
    expected = plan_run(config)
    monkeypatch.setenv("ARRAKIS_RAY_CACHE_DIR", str(blocker))
    fresh_process(monkeypatch)
    assert plan_run(config) == expected
    assert blocker.read_text() == "not a directory"


def test_failures_are_not_kept_and_read_the_same_with_facts_kept(cache, monkeypatch):
    broken = {"arch": "gpt2", "config": {"n_embd": 65}, "tokenizer": "zoo:facts-gpt2"}
    for _ in range(2):  # 65 wide, 4 heads
        fresh_process(monkeypatch)
        with pytest.raises(ModelLoadError, match="divisible by num_heads"):
            plan_run(config_of(broken, GLOBS))
    assert entries(cache) == []

    # an unknown hook: the model's facts are kept, the error is the model's own both times
    bad = config_of(LLAMA, ["blocks.*.hook_resid_post", "hook_pos_embed"])
    messages = []
    for _ in range(2):
        fresh_process(monkeypatch)
        with pytest.raises(UnknownHookError) as caught:
            plan_run(bad)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "exists only in models with learned position embeddings" in messages[0]
    assert entries(cache, "model")


def test_the_key_holds_the_versions_and_the_model_files(cache):
    config = config_of({"zoo": "facts-gpt2"}, GLOBS)
    plan_run(config)
    (path,) = entries(cache, "model")
    key = json.loads(path.read_text())["key"]
    assert key["model"]["zoo"] == "facts-gpt2"
    assert set(key["env"]["versions"]) == {"arrakis-ray", "torch", "transformers", "tokenizers"}
    files = {Path(stamp[0]).name for stamp in key["files"]}
    assert files == {p.name for p in zoo_path("facts-gpt2").iterdir() if p.is_file()}


# ------------------------------------------------------------- a second process

PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print(json.dumps(
    {m: m in sys.modules for m in ("torch", "transformers")}), file=sys.stderr))
sys.argv = ["arrakis-ray", *sys.argv[1:]]
runpy.run_module("arrakis_ray.cli", run_name="__main__")
"""


def test_a_second_dry_run_imports_neither_torch_nor_transformers(tmp_path):
    env = {**os.environ, "ARRAKIS_RAY_CACHE_DIR": str(tmp_path / "cache")}
    sweep = REPO / "pipelines" / "sweeps" / "grid1000.yaml"
    command = [sys.executable, "-c", PROBE, "sweep", str(sweep)]
    command += ["--store", str(tmp_path / "store"), "--dry-run"]
    runs = []
    for _ in range(2):
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        imported = json.loads(done.stderr.strip().splitlines()[-1])
        runs.append((done.stdout, imported))
    (first, cold), (second, warm) = runs
    assert cold == {"torch": True, "transformers": True}
    assert warm == {"torch": False, "transformers": False}
    assert second == first
    assert "1000 points: 1000 distinct" in first


FACTORY_SOURCE = """
from arrakis_ray.models.toy import build as toy_build

def build(**config):
    return toy_build(n_layers={n_layers}, d_model=16, n_heads=2, d_mlp=32)
"""


def test_a_factory_model_is_learned_again_when_its_code_changes(tmp_path, monkeypatch, cache):
    """A custom model's shape and fingerprint come from its factory's code: an edit to it
    (or to a module beside it) is a new model, never the cached facts of the old one."""
    from arrakis_ray.config import ModelConfig

    package = tmp_path / "my_models"
    package.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ModelConfig(factory="my_models.net:build", tokenizer="zoo:facts-gpt2")
    seen = []
    for n_layers in (2, 3):
        (package / "net.py").write_text(FACTORY_SOURCE.format(n_layers=n_layers))
        sys.modules.pop("my_models.net", None)  # as a new process would import it
        sys.modules.pop("my_models", None)
        fresh_process(monkeypatch)
        facts = facts_cache.model_facts(model, SOURCE)
        seen.append((facts.shape.n_layers, facts_cache.model_fingerprint(model)))
    assert [n for n, _ in seen] == [2, 3]
    assert seen[0][1] != seen[1][1]
    assert entries(cache, "model")  # both kept on disk, under different keys
