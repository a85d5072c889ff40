"""Sweep files: expansion (grid, random, zip) into validated configs, every error naming
the sweep file, the parameter and the value, and a content-derived sweep id."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from support import DEMO_DATA, pipeline_dict

from arrakis_ray.config import load_pipeline, pipeline_from_dict
from arrakis_ray.errors import ConfigError
from arrakis_ray.sweeps.spec import expand, load_sweep

SAE = {"tool": "superposition_disentangler", "params": {"hook": "blocks.1.hook_resid_post"}}
LENS = {"tool": "logit_lens"}
HOOKS_A = ["blocks.*.hook_resid_post"]
HOOKS_B = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]


def base_dict() -> dict:
    base = pipeline_dict()
    base["analyze"] = [LENS, SAE]
    return base


def write(directory: Path, sweep: dict | str, base: dict | None = None, name="sweep.yaml"):
    """Write base.yaml (unless given None and present) and the sweep file; its path."""
    if base is not None or not (directory / "base.yaml").exists():
        (directory / "base.yaml").write_text(yaml.safe_dump(base or base_dict()))
    path = directory / name
    text = sweep if isinstance(sweep, str) else yaml.safe_dump(sweep, sort_keys=False)
    path.write_text(text)
    return path


def sweep_dict(parameters: dict, **extra) -> dict:
    return {"name": "t", "base": "base.yaml", "method": "grid", "parameters": parameters, **extra}


def expected_config(base: dict, values: dict, source: str):
    """The config of a point built by hand: the base dict with the values set."""
    raw = copy.deepcopy(base)
    for path, value in values.items():
        node = raw
        *head, last = path.split(".")
        for part in head:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value
    return pipeline_from_dict(raw, source=source)


def test_grid_is_the_product_in_spec_order(tmp_path):
    path = write(
        tmp_path,
        sweep_dict(
            {
                "harvest.batch_size": {"values": [4, 8, 16]},
                "analyze.1.params.k": {"values": [2, 4]},
                "data.context_length": {"value": 20},
            }
        ),
    )
    sweep = load_sweep(path)
    points = expand(sweep)
    assert sweep.size == len(points) == 6
    combos = list(itertools.product([4, 8, 16], [2, 4]))
    for i, (point, (batch, k)) in enumerate(zip(points, combos, strict=True)):
        values = {"harvest.batch_size": batch, "analyze.1.params.k": k, "data.context_length": 20}
        assert point.index == i
        assert point.params == values
        assert list(point.params) == list(values)  # spec order
        want = expected_config(base_dict(), values, point.config.source)
        assert point.config == want
    assert points[3].config.source == f"{path} (point 3)"
    assert sweep.parameters == {
        "harvest.batch_size": (4, 8, 16),
        "analyze.1.params.k": (2, 4),
        "data.context_length": (20,),
    }


def test_a_step_by_tool_name_is_the_step_by_index(tmp_path):
    by_name = write(
        tmp_path,
        sweep_dict({"analyze.superposition_disentangler.params.k": {"values": [3]}}),
        name="a.yaml",
    )
    by_index = write(tmp_path, sweep_dict({"analyze.1.params.k": {"values": [3]}}), name="b.yaml")
    (a,), (b,) = expand(load_sweep(by_name)), expand(load_sweep(by_index))
    assert a.config.analyze == b.config.analyze
    assert a.config.analyze[1].params == {"hook": "blocks.1.hook_resid_post", "k": 3}


def test_a_zip_group_is_one_axis(tmp_path):
    spec = {
        "name": "zipped",
        "base": "base.yaml",
        "zip": [
            {
                "harvest.hooks": [HOOKS_A, HOOKS_B],
                "analyze.1.params.hook": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
            }
        ],
        "parameters": {"analyze.1.params.k": {"values": [1, 2, 3]}},
    }
    points = expand(load_sweep(write(tmp_path, spec)))
    got = [
        (
            p.params["harvest.hooks"],
            p.params["analyze.1.params.hook"],
            p.params["analyze.1.params.k"],
        )
        for p in points
    ]
    # the zip comes first in the file: its axis is the outer one
    pairs = [(HOOKS_A, "blocks.1.hook_resid_post"), (HOOKS_B, "blocks.2.hook_resid_post")]
    assert got == [(h, hook, k) for (h, hook), k in itertools.product(pairs, [1, 2, 3])]
    assert points[4].config.harvest.hooks == tuple(HOOKS_B)
    assert points[4].config.analyze[1].params["hook"] == "blocks.2.hook_resid_post"


def test_random_draws_count_points_reproducibly(tmp_path):
    params = {
        "harvest.batch_size": {"values": [4, 8, 16]},
        "analyze.1.params.k": {"values": [2, 4]},
    }
    one = write(tmp_path, sweep_dict(params, method="random", count=300, seed=7), name="a.yaml")
    same = write(tmp_path, sweep_dict(params, method="random", count=300, seed=7), name="b.yaml")
    other = write(tmp_path, sweep_dict(params, method="random", count=300, seed=8), name="c.yaml")

    def draws(path):
        return [tuple(p.params.values()) for p in expand(load_sweep(path))]

    first = draws(one)
    assert len(first) == 300
    assert first == draws(same)
    assert first != draws(other)
    # with replacement, over the whole product: all 6 combinations, each about 300 / 6
    counts = Counter(first)
    assert set(counts) == set(itertools.product([4, 8, 16], [2, 4]))
    assert all(20 <= n <= 80 for n in counts.values())


def test_relative_paths_resolve_against_their_own_file(tmp_path):
    (tmp_path / "pipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "facts.jsonl").write_bytes(DEMO_DATA.read_bytes())
    base = base_dict()
    base["data"]["path"] = "../data/facts.jsonl"  # relative to the base, in pipes/
    (tmp_path / "pipes" / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "pipes/base.yaml", "parameters": {"analyze.1.params.k": {"values": [2]}}}
    (point,) = expand(load_sweep(write(tmp_path, spec, base=None)))
    assert point.config.data.path == str((tmp_path / "data" / "facts.jsonl").resolve())
    assert point.config.data == load_pipeline(tmp_path / "pipes" / "base.yaml").data
    # a path given by the sweep resolves against the sweep file
    spec = {"base": "pipes/base.yaml", "parameters": {"data.path": {"value": "data/facts.jsonl"}}}
    (point,) = expand(load_sweep(write(tmp_path, spec, base=None, name="s2.yaml")))
    assert point.config.data.path == str((tmp_path / "data" / "facts.jsonl").resolve())


def test_sweep_id_follows_content_not_formatting(tmp_path):
    spec = sweep_dict({"harvest.batch_size": {"values": [4, 8]}}, max_concurrent=2)
    first = load_sweep(write(tmp_path, spec))
    flow = (
        "# the same sweep, written otherwise\n"
        "max_concurrent: 2   # a comment\n"
        "parameters: {harvest.batch_size: {values: [4, 8]}}\n"
        "base: ./sub/../base.yaml\n"
        "method: grid\n"
        "name: t\n"
    )
    (tmp_path / "sub").mkdir()
    assert load_sweep(write(tmp_path, flow, base=None, name="flow.yaml")).sweep_id == first.sweep_id
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    assert load_sweep(write(moved, spec)).sweep_id == first.sweep_id  # same files, elsewhere
    other = sweep_dict({"harvest.batch_size": {"values": [4, 16]}}, max_concurrent=2)
    assert load_sweep(write(tmp_path, other, base=None, name="o.yaml")).sweep_id != first.sweep_id
    changed = base_dict()
    changed["data"]["context_length"] = 16  # the base's content is part of the id
    assert load_sweep(write(moved, spec, base=changed)).sweep_id != first.sweep_id
    assert len(first.sweep_id) == 16 and int(first.sweep_id, 16) >= 0
    assert first.text == (tmp_path / "sweep.yaml").read_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            sweep_dict({}, metric={"name": "loss"}),
            "metric: unknown key; allowed: name, base, method, parameters",
        ),
        (sweep_dict({}, methd="grid"), "methd: unknown key (did you mean method?)"),
        (
            sweep_dict({"harvest.batchsize": {"values": [4]}}),
            "parameters.harvest.batchsize: harvest.batchsize: no such field (did you mean "
            "batch_size?)",
        ),
        (
            sweep_dict({"harvest.batch_size.x": {"values": [4]}}),
            "parameters.harvest.batch_size.x: harvest.batch_size has no fields",
        ),
        (
            sweep_dict({"analyze.superposition_disentangler.params.kk": {"values": [4]}}),
            "tool superposition_disentangler has no parameter 'kk' (did you mean k?)",
        ),
        (
            sweep_dict({"analyze.neuron_dashboard.params.k": {"values": [4]}}),
            "no analyze step of the base runs tool 'neuron_dashboard' (its steps: "
            "logit_lens, superposition_disentangler)",
        ),
        (
            sweep_dict({"analyze.5.params.k": {"values": [4]}}),
            "analyze.5: the base pipeline has 2 analyze step(s)",
        ),
        (
            sweep_dict({"harvest.batch_size": {"min": 1, "max": 8}}),
            "parameters.harvest.batch_size: expected {values: [...]} or {value: x}",
        ),
        (sweep_dict({"harvest.batch_size": {"values": []}}), "expected a non-empty list"),
        (
            sweep_dict({"data": {"value": {}}, "data.path": {"value": "x"}}),
            "parameters.data.path: sets what parameters.data sets",
        ),
        (sweep_dict({}, method="bayes"), "method: 'bayes' is not one of grid, random"),
        (sweep_dict({}, method="random"), "count: method random needs count"),
        (sweep_dict({}, count=3), "count: applies to method random only"),
        (sweep_dict({}, max_concurrent=0), "max_concurrent: expected an integer >= 1, got 0"),
        (sweep_dict({}, retries=-1), "retries: expected an integer >= 0, got -1"),
        (
            sweep_dict({}, base="missing.yaml"),
            "base: pipeline file ",
        ),
        (
            {
                "base": "base.yaml",
                "zip": [{"harvest.batch_size": [1, 2], "analyze.1.params.k": [3]}],
            },
            "zip[0]: lists of unequal lengths (harvest.batch_size: 2, analyze.1.params.k: 1)",
        ),
    ],
)
def test_a_bad_spec_is_refused_naming_file_and_field(tmp_path, spec, message):
    path = write(tmp_path, spec)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_a_step_named_by_an_ambiguous_tool_is_refused(tmp_path):
    base = base_dict()
    base["analyze"] = [LENS, SAE, copy.deepcopy(SAE)]
    path = write(
        tmp_path,
        sweep_dict({"analyze.superposition_disentangler.params.k": {"values": [2]}}),
        base=base,
    )
    with pytest.raises(ConfigError, match=r"runs at analyze steps 1, 2: address one by index"):
        load_sweep(path)


def test_a_bad_value_names_the_parameter_value_and_point(tmp_path):
    params = {
        "harvest.batch_size": {"values": [4, "big"]},
        "analyze.1.params.k": {"values": [2, 3]},
    }
    path = write(tmp_path, sweep_dict(params))
    sweep = load_sweep(path)  # values are checked when the points are built
    with pytest.raises(ConfigError) as info:
        expand(sweep)
    assert str(info.value) == (
        f"{path}: parameters.harvest.batch_size: value 'big' (points 2, 3): expected an integer"
    )


def test_bad_tool_values_and_combinations_are_all_listed(tmp_path):
    params = {
        "analyze.1.params.k": {"values": [0, 2, -1, 4, -2, -3]},
        "analyze.1.params.hook": {"values": ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]},
    }
    path = write(tmp_path, sweep_dict(params))
    with pytest.raises(ConfigError) as info:
        expand(load_sweep(path))
    # 12 points, the hook varying fastest: the attention hook (odd points) is refused
    # first; with the residual hook, k = 0, -1, -2, -3 (points 0, 4, 8, 10)
    k = "parameters.analyze.1.params.k"
    assert str(info.value) == (
        f"{path}: 10 of 12 points are invalid: {k}: value 0 (point 0): k must be at least 1; "
        "parameters.analyze.1.params.hook: value 'blocks.1.attn.hook_z' (points 1, 3, 5 and "
        "3 more): hook 'blocks.1.attn.hook_z': only dense hooks (one vector per token); "
        f"{k}: value -1 (point 4): k must be at least 1; and 2 more"
    )


def test_a_cross_field_error_names_the_point(tmp_path):
    path = write(
        tmp_path,
        sweep_dict(
            {
                "harvest.stages": {"values": [1, 2]},
                "harvest.layer_ranges": {"value": [[0, 2], [2, 4]]},
            }
        ),
    )
    with pytest.raises(ConfigError) as info:
        expand(load_sweep(path))
    assert str(info.value) == (
        f"{path}: parameters harvest.stages=2, harvest.layer_ranges=[[0, 2], [2, 4]] "
        "(point 1): harvest: give stages or layer_ranges, not both"
    )


def test_an_invalid_base_is_refused_naming_the_base(tmp_path):
    base = base_dict()
    base["harvest"]["batch_size"] = "x"
    path = write(tmp_path, sweep_dict({}), base=base)
    with pytest.raises(ConfigError, match=r"base\.yaml: harvest\.batch_size: expected an integer"):
        load_sweep(path)


def test_a_sweep_without_parameters_is_its_base(tmp_path):
    path = write(tmp_path, sweep_dict({}))
    (point,) = expand(load_sweep(path))
    assert point.params == {}
    assert replace(point.config, source="x") == replace(
        load_pipeline(tmp_path / "base.yaml"), source="x"
    )


def test_the_shipped_sweeps_expand():
    repo = Path(__file__).resolve().parents[2] / "pipelines" / "sweeps"
    sizes = {"demo.yaml": 4, "bench.yaml": 8, "grid1000.yaml": 1000}
    for name, size in sizes.items():
        assert len(expand(load_sweep(repo / name))) == size
