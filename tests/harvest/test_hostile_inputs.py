"""Hostile or wrong inputs are refused up front, in one line naming the file and where.

Each case used to hang, crash late inside a Ray actor, or be silently accepted. Now the
pipeline loader or ``plan_run`` (which touches no store) refuses it with one line that
names the file and the dotted field or line; one case goes through the CLI to show the
exit code and that no run directory is made. No Ray: the cluster check is a pure
function of ``ray.cluster_resources()``'s dict.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml
from support import DEMO_DATA, pipeline_dict

from arrakis_ray.cli import main
from arrakis_ray.config import HarvestConfig, load_pipeline, pipeline_from_dict
from arrakis_ray.errors import ConfigError, DataError, ModelLoadError
from arrakis_ray.harvest.checks import check_cluster_fits
from arrakis_ray.harvest.inputs import plan_shards
from arrakis_ray.harvest.model_source import check_config_overrides
from arrakis_ray.harvest.plan import plan_run
from arrakis_ray.harvest.tokenize import TokenizeShard

SOURCE = "pipelines/x.yaml"


def _refused(error_type, call, *needles) -> str:
    """The one-line message of the error ``call()`` raises, checked for ``needles``."""
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _yaml_file(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def _pipeline_yaml(**sections) -> str:
    """A valid pipeline file's text, sections replaced by raw YAML text."""
    parts = {
        "name": "name: hostile\n",
        "model": "model:\n  zoo: facts-gpt2\n",
        "data": f"data:\n  path: {DEMO_DATA}\n  max_documents: 8\n",
        "harvest": "harvest:\n  hooks: [blocks.*.hook_resid_post]\n  batch_size: 4\n",
    }
    parts.update(sections)
    return "".join(parts.values())


def _plan_config(model=None, **data):
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"])
    raw["data"].update(max_documents=8, keep_columns=[], **data)
    if model is not None:
        raw["model"] = model
    return pipeline_from_dict(raw, source=SOURCE)


# --- 1. pipeline YAML: duplicate keys, aliases, non-finite numbers -------------------


@pytest.mark.parametrize(
    ("harvest", "field", "lines"),
    [
        (
            "harvest:\n  hooks: [hook_embed]\n  batch_size: 4\n  batch_size: 8\n",
            "harvest.batch_size",
            "lines 9 and 10",
        ),
        (  # deeper, in a flow mapping on one line
            "harvest:\n  hooks: [hook_embed]\nanalyze:\n  - tool: logit_lens\n"
            "    params: {top_k: 3, top_k: 5}\n",
            "analyze[0].params.top_k",
            "lines 11 and 11",
        ),
    ],
    ids=["block", "flow-mapping"],
)
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path, harvest, field, lines):
    path = _yaml_file(tmp_path, _pipeline_yaml(harvest=harvest))
    message = _refused(ConfigError, lambda: load_pipeline(path), str(path), field, lines)
    assert message == f"{path}: {field}: key given twice ({lines}); keep one"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    # "billion laughs": 9 levels of 9 aliases each expand to 9**9 strings
    levels = ['  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    for i in range(1, 9):
        levels.append(f"  l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n")
    model = "model:\n  arch: gpt2\n  tokenizer: zoo:facts-gpt2\n  config:\n" + "".join(
        "  " + line for line in levels
    )
    path = _yaml_file(tmp_path, _pipeline_yaml(model=model))
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    message = _refused(ConfigError, lambda: load_pipeline(path), f"{path}:6:", "&l0")
    assert time.perf_counter() - started < 1.0
    assert message == (
        f"{path}:6: YAML &l0: anchors and aliases are not allowed in a pipeline file; "
        "write the value out"
    )


def test_an_alias_alone_is_refused_naming_its_line(tmp_path):
    harvest = "harvest:\n  hooks: [hook_embed]\n  batch_size: *size\n"
    path = _yaml_file(tmp_path, _pipeline_yaml(harvest=harvest))
    _refused(ConfigError, lambda: load_pipeline(path), f"{path}:9:", "*size", "not allowed")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
@pytest.mark.parametrize(
    ("section", "field"),
    [
        (
            "harvest:\n  hooks: [hook_embed]\n  num_cpus_per_actor: {}\n",
            "harvest.num_cpus_per_actor",
        ),
        (
            "harvest:\n  hooks: [hook_embed]\n  num_gpus_per_actor: {}\n",
            "harvest.num_gpus_per_actor",
        ),
        (
            "model:\n  arch: gpt2\n  tokenizer: zoo:facts-gpt2\n"
            "  config: {{layer_norm_epsilon: {}}}\n",
            "model.config.layer_norm_epsilon",
        ),
    ],
    ids=["cpus", "gpus", "model-config"],
)
def test_a_non_finite_number_is_refused_naming_the_field(tmp_path, section, field, value):
    key = section.split(":")[0]
    path = _yaml_file(tmp_path, _pipeline_yaml(**{key: section.format(value)}))
    shown = "nan" if "nan" in value.lower() else value.replace(".", "")
    message = _refused(ConfigError, lambda: load_pipeline(path), str(path), field)
    assert message == f"{path}: {field}: expected a finite number, got {shown}"


def test_a_pipeline_file_that_is_not_utf8_or_not_yaml_fails_in_one_line(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert _refused(ConfigError, lambda: load_pipeline(path)) == (
        f"{path}:1: not UTF-8 text (byte 0xe9 at byte offset 9)"
    )
    path.write_text("name: x\nmodel: {zoo: facts-gpt2\n")
    _refused(ConfigError, lambda: load_pipeline(path), f"{path}:3:", "not valid YAML")


# --- 2. model.config keys the architecture does not have ----------------------------


@pytest.mark.parametrize(
    ("arch", "key", "expected"),
    [
        (
            "llama",
            "n_layer",
            "not a field of LlamaConfig, the config of model.arch llama; did you mean "
            "num_hidden_layers? (n_layer is gpt2's name for it)",
        ),
        (
            "gpt2",
            "n_layers",
            "not a field of GPT2Config, the config of model.arch gpt2; did you mean n_layer "
            "or num_hidden_layers?",
        ),
    ],
    ids=["llama-n_layer", "gpt2-n_layers"],
)
def test_an_unknown_model_config_key_is_refused_with_a_suggestion(arch, key, expected):
    model = {"arch": arch, "config": {key: 3, "vocab_size": 400}, "tokenizer": "zoo:facts-gpt2"}
    config = _plan_config(model=model)
    message = _refused(ConfigError, lambda: plan_run(config))
    assert message == f"{SOURCE}: model.config.{key}: {expected}"


def test_known_model_config_keys_pass_including_aliases_and_legacy_names():
    from arrakis_ray.config import ModelConfig

    accepted = {
        "gpt2": {"n_layer": 2, "num_hidden_layers": 2, "intermediate_size": 32},
        "gpt-neox": {"rotary_pct": 0.5},  # a legacy name HF folds into rope_parameters
        "llama": {"rope_theta": 500.0, "rms_norm_eps": 1e-5},
    }
    for arch, overrides in accepted.items():
        check_config_overrides(ModelConfig(arch=arch, config=overrides), SOURCE)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"num_hidden_layers": 0}, "IndexError"),  # no block to hook
        ({"n_embd": 65}, "divisible by num_heads"),  # 65 wide, 4 heads
        ({"vocab_size": -1}, "negative dimension"),
    ],
    ids=["no-layers", "odd-width", "negative-vocab"],
)
def test_model_sizes_that_cannot_build_a_model_fail_in_one_line(overrides, needle):
    model = {"arch": "gpt2", "config": overrides, "tokenizer": "zoo:facts-gpt2"}
    config = _plan_config(model=model)
    _refused(ModelLoadError, lambda: plan_run(config), f"{SOURCE}: model.config: ", needle)


# --- 3. a context longer than the model's positions ---------------------------------


def test_a_context_longer_than_learned_positions_is_refused():
    config = _plan_config(context_length=65)  # facts-gpt2: n_positions 64
    message = _refused(ConfigError, lambda: plan_run(config))
    assert message == (
        f"{SOURCE}: data.context_length: 65 tokens, but the model has 64 positions "
        "(max_position_embeddings); use at most 64"
    )
    plan_run(_plan_config(context_length=64))  # the limit itself is fine


def test_a_context_longer_than_a_rotary_models_positions_is_refused():
    model = {
        "arch": "llama",
        "config": {"vocab_size": 400, "max_position_embeddings": 32},
        "tokenizer": "zoo:facts-gpt2",
    }
    config = _plan_config(model=model, context_length=48)
    _refused(ConfigError, lambda: plan_run(config), SOURCE, "data.context_length: 48", "32")


# --- 4. a tokenizer larger than the model's vocabulary ------------------------------


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_naming_both_sizes():
    model = {"arch": "gpt2", "tokenizer": "zoo:facts-gpt2"}  # tiny gpt2: vocab 128 < 386
    message = _refused(ConfigError, lambda: plan_run(_plan_config(model=model)))
    assert message == (
        f"{SOURCE}: model.tokenizer: the tokenizer has 386 tokens, but the model's "
        "vocabulary has 128 (vocab_size); token ids 128 and above have no embedding"
    )


def test_token_ids_need_only_bos_and_eos_inside_the_vocabulary(tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(2, 98, dtype=np.int64).reshape(8, 12) % 128)
    model = {"arch": "gpt2", "tokenizer": "zoo:facts-gpt2"}  # bos 0, eos 1: inside 128
    plan = plan_run(_plan_config(model=model, path=str(ids), context_length=12))
    assert plan.shape.d_vocab == 128


def test_the_missing_tokenizer_error_names_the_pipeline_file():
    config = _plan_config(model={"arch": "gpt2"})
    _refused(ConfigError, lambda: plan_run(config), f"{SOURCE}: model.tokenizer:")


# --- 5. non-UTF-8 bytes in text inputs ----------------------------------------------


def _with_bad_byte(tmp_path, suffix: str):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(4)]
    if suffix == ".txt":
        lines = [f"document {i}" for i in range(4)]
    data = [line.encode() + b"\n" for line in lines]
    data.insert(1, b"\n")  # a blank line: line numbers count it, document numbers do not
    data[3] = data[3].replace(b"document", b"docu\xffment")  # line 4
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(b"".join(data))
    offset = b"".join(data).index(b"\xff")
    return path, offset


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_non_utf8_byte_is_refused_at_plan_time_naming_line_and_offset(tmp_path, suffix):
    path, offset = _with_bad_byte(tmp_path, suffix)
    config = _plan_config(path=str(path))
    message = _refused(DataError, lambda: plan_run(config))
    column = 5 if suffix == ".txt" else 15  # after "docu", or {"text": "docu
    assert message == (
        f"{path}:4: not UTF-8 text: byte 0xff at byte offset {offset} (column {column}); "
        "re-encode the file as UTF-8"
    )


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_non_utf8_byte_written_after_planning_fails_in_the_tokenize_step(tmp_path, suffix):
    path, _ = _with_bad_byte(tmp_path, suffix)
    good = path.read_bytes().replace(b"\xff", b"x")
    path.write_bytes(good)
    config = _plan_config(path=str(path))
    shards = plan_shards(path, 16)
    path.write_bytes(good.replace(b"docuxment", b"docu\xffment"))  # same length, same offsets
    step = TokenizeShard(config)
    batch = {k: np.array([v]) for k, v in shards[0].to_dict().items()}
    _refused(DataError, lambda: step(batch), f"{path}:4: not UTF-8 text: byte 0xff")


# --- 6. actors the cluster can never place ------------------------------------------


@pytest.mark.parametrize(
    ("harvest", "resources", "expected"),
    [
        (
            {"num_gpus_per_actor": 1},
            {"CPU": 2.0, "memory": 1e9},
            "harvest.num_gpus_per_actor: 1 GPU per actor, but the cluster has 0 GPUs",
        ),
        (
            {"num_cpus_per_actor": 64},
            {"CPU": 2.0},
            "harvest.num_cpus_per_actor: 64 CPUs per actor, but the cluster has 2 CPUs",
        ),
        (
            {"num_gpus_per_actor": 1, "stages": 2},
            {"CPU": 8.0, "GPU": 1.0},
            "harvest.num_gpus_per_actor: 1 GPU per actor x 2 stages (one actor each, at "
            "once), but the cluster has 1 GPU",
        ),
    ],
)
def test_an_actor_the_cluster_cannot_place_is_refused(harvest, resources, expected):
    config = HarvestConfig(hooks=("hook_embed",), **harvest)
    message = _refused(ConfigError, lambda: check_cluster_fits(config, resources, SOURCE))
    assert message == f"{SOURCE}: {expected}"


@pytest.mark.parametrize(
    ("harvest", "resources"),
    [
        ({}, {"CPU": 2.0}),  # 0.5 CPU, no GPU
        ({"num_gpus_per_actor": 1, "actors": 4}, {"CPU": 2.0, "GPU": 1.0}),  # 1 of 4 fits
        ({"num_cpus_per_actor": 2, "layer_ranges": ((0, 2), (2, 4))}, {"CPU": 4.0}),
    ],
)
def test_actors_the_cluster_can_place_pass(harvest, resources):
    check_cluster_fits(HarvestConfig(hooks=("hook_embed",), **harvest), resources, SOURCE)


# --- through the CLI: exit code 2, one line, no run ----------------------------------


def test_the_cli_refuses_a_long_context_with_exit_2_and_no_run(tmp_path, capsys):
    raw = pipeline_dict()
    raw["data"]["context_length"] = 100
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    assert main(["harvest", str(path), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"arrakis-ray: error: {path}: data.context_length: 100 tokens")
    assert not store.exists()


def test_an_actor_larger_than_any_node_is_refused_though_the_cluster_is_larger():
    harvest_config = HarvestConfig(hooks=("hook_embed",), num_cpus_per_actor=64)
    eight_nodes = {"CPU": 128.0}
    with pytest.raises(ConfigError) as err:
        check_cluster_fits(harvest_config, eight_nodes, "p.yaml", largest_node={"CPU": 16.0})
    assert str(err.value) == (
        "p.yaml: harvest.num_cpus_per_actor: 64 CPUs per actor, but the largest node of "
        "the cluster has 16 CPUs"
    )
    check_cluster_fits(harvest_config, eight_nodes, "p.yaml", largest_node={"CPU": 64.0})
