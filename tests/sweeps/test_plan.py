"""Planning a sweep without Ray: run ids and tool variants per point, duplicates, what
a store already holds, one harvest for a sweep over tool parameters, and errors of
every point before anything runs."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import pipeline_dict

from arrakis_ray.config import pipeline_from_dict, to_dict
from arrakis_ray.errors import ConfigError, StoreError
from arrakis_ray.harvest.plan import plan_run
from arrakis_ray.sweeps.plan import plan_sweep
from arrakis_ray.sweeps.spec import load_sweep

RESID = ["blocks.*.hook_resid_post"]
RESID_MLP = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
SAE = {
    "tool": "superposition_disentangler",
    "params": {"hook": "blocks.1.hook_resid_post", "n_features": 16, "k": 2, "epochs": 1},
}


def base_dict() -> dict:
    base = pipeline_dict()
    base["data"]["max_documents"] = 16
    base["harvest"].update(hooks=RESID, shard_size=8)
    base["analyze"] = [SAE]
    return base


def write_sweep(directory: Path, parameters: dict, **extra) -> Path:
    (directory / "base.yaml").write_text(yaml.safe_dump(base_dict()))
    spec = {"name": "plan-test", "base": "base.yaml", "parameters": parameters, **extra}
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def config_with(**changes) -> object:
    """The base config with harvest hooks / SAE params changed, built by hand."""
    raw = base_dict()
    raw["harvest"]["hooks"] = changes.get("hooks", RESID)
    raw["analyze"] = [copy.deepcopy(SAE)]
    raw["analyze"][0]["params"].update(changes.get("sae", {}))
    return pipeline_from_dict(raw)


def test_a_sweep_over_tool_parameters_plans_one_harvest(tmp_path):
    from arrakis_ray.tools.runner import make_tool, tool_variant

    path = write_sweep(
        tmp_path,
        {
            "analyze.superposition_disentangler.params.k": {"values": [2, 4]},
            "analyze.superposition_disentangler.params.n_features": {"values": [16, 32]},
        },
    )
    plan = plan_sweep(load_sweep(path), tmp_path / "store")
    expected = plan_run(config_with())
    assert [p.status for p in plan.points] == ["pending"] * 4
    assert {p.run_id for p in plan.points} == {expected.run_id}
    assert plan.harvests_to_run == [expected.run_id]
    assert plan.predicted_bytes == expected.predicted_bytes  # counted once, not 4 times
    assert all(p.predicted_bytes == expected.predicted_bytes for p in plan.points)
    assert len({p.point_key for p in plan.points}) == 4
    point = plan.points[3]  # k 4, n_features 32
    tool = make_tool(SAE["tool"], {**SAE["params"], "k": 4, "n_features": 32})
    variant = tool_variant(tool)
    assert point.tools == ((SAE["tool"], variant, to_dict(tool.params)),)
    text = json.dumps(
        {"run_id": expected.run_id, "tools": [[SAE["tool"], variant]]}, sort_keys=True
    )
    assert point.point_key == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_hook_sets_plan_one_harvest_each(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "harvest.hooks": {"values": [RESID, RESID_MLP]},
            "analyze.superposition_disentangler.params.k": {"values": [2, 4]},
        },
    )
    plan = plan_sweep(load_sweep(path), tmp_path / "store")
    runs = [plan_run(config_with(hooks=hooks)) for hooks in (RESID, RESID_MLP)]
    assert [p.run_id for p in plan.points] == [runs[0].run_id] * 2 + [runs[1].run_id] * 2
    assert plan.harvests_to_run == [r.run_id for r in runs]
    assert plan.predicted_bytes == sum(r.predicted_bytes for r in runs)
    assert runs[1].predicted_bytes > runs[0].predicted_bytes


def test_identical_points_are_duplicates_of_the_first(tmp_path):
    # the batch size changes how the harvest runs, not what it writes: same run id
    path = write_sweep(
        tmp_path,
        {
            "harvest.batch_size": {"values": [4, 8]},
            "analyze.superposition_disentangler.params.k": {"values": [2, 4]},
        },
    )
    plan = plan_sweep(load_sweep(path), tmp_path / "store")
    assert [(p.status, p.duplicate_of) for p in plan.points] == [
        ("pending", None),
        ("pending", None),
        ("duplicate", 0),
        ("duplicate", 1),
    ]
    assert plan.points[2].point_key == plan.points[0].point_key
    text = plan.describe()
    assert "duplicate of 0" in text and "duplicate of 1" in text
    assert text.splitlines()[-1].startswith(
        "4 points: 2 distinct, 2 duplicates, 0 complete, 2 to run; 1 distinct harvest to run"
    )


def test_random_draws_repeat_as_duplicates(tmp_path):
    path = write_sweep(
        tmp_path,
        {"analyze.superposition_disentangler.params.k": {"values": [2, 4, 8]}},
        method="random",
        count=12,
        seed=3,
    )
    plan = plan_sweep(load_sweep(path), tmp_path / "store")
    ks = [p.params["analyze.superposition_disentangler.params.k"] for p in plan.points]
    first = {k: ks.index(k) for k in ks}
    assert [p.duplicate_of for p in plan.points] == [
        None if first[k] == i else first[k] for i, k in enumerate(ks)
    ]
    assert len(plan.pending) == len(set(ks))


def test_describe_lists_every_point_and_the_totals(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "harvest.hooks": {"values": [RESID, RESID_MLP]},
            "analyze.superposition_disentangler.params.k": {"values": [2, 4]},
        },
    )
    plan = plan_sweep(load_sweep(path), tmp_path / "store")
    lines = plan.describe().splitlines()
    assert lines[1].split() == ["index", "key", "run", "id", "status", "harvest", "hooks", "k"]
    rows = lines[2:6]
    for p, row in zip(plan.points, rows, strict=True):
        cells = row.split()
        hooks = "#0" if p.params["harvest.hooks"] == RESID else "#1"
        k = str(p.params["analyze.superposition_disentangler.params.k"])
        assert cells == [str(p.index), p.point_key, p.run_id, "pending", "to", "run", hooks, k]
    # the hook lists are too long for a column: numbered, and listed under the table
    assert lines[6] == f"hooks #0: {json.dumps(RESID)}"
    assert lines[7] == f"hooks #1: {json.dumps(RESID_MLP)}"
    size = plan.predicted_bytes
    assert lines[8].endswith(f"2 distinct harvests to run, predicted {size:,} bytes "
                             f"({size / 1e6:.1f} MB)")  # fmt: skip


def test_points_that_cannot_run_are_refused_together(tmp_path):
    mlp = ["blocks.*.mlp.hook_post"]
    path = write_sweep(
        tmp_path,
        {
            "harvest.hooks": {"values": [["blocks.*.hook_resid_postt"], mlp, RESID]},
            "analyze.superposition_disentangler.params.k": {"values": [2, 4]},
        },
    )
    with pytest.raises(ConfigError) as info:
        plan_sweep(load_sweep(path), tmp_path / "store")
    text = str(info.value)
    assert text.startswith(f"{path}: 4 of 6 points cannot be planned: points 0, 1: hook ")
    assert (
        "points 2, 3: analyze.0: tool superposition_disentangler: needs hooks the harvest "
        "does not capture: blocks.1.hook_resid_post; add blocks.*.hook_resid_post"
    ) in text
    assert not (tmp_path / "store").exists()


def test_a_directory_that_is_not_a_store_is_refused(tmp_path):
    path = write_sweep(tmp_path, {})
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not an arrakis-ray store"):
        plan_sweep(load_sweep(path), tmp_path / "notastore")
    (tmp_path / "empty").mkdir()  # an empty directory: a store not made yet
    assert plan_sweep(load_sweep(path), tmp_path / "empty").points[0].status == "pending"


def test_a_point_is_complete_once_harvested_and_analysed(ray_session, tmp_path):
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.tools.runner import analyze

    path = write_sweep(
        tmp_path, {"analyze.superposition_disentangler.params.k": {"values": [2, 4]}}
    )
    store = tmp_path / "store"
    sweep = load_sweep(path)
    before = plan_sweep(sweep, store)
    assert [p.status for p in before.points] == ["pending", "pending"]
    first, second = before.points

    result = harvest(first.config, store)
    assert result.run_id == first.run_id
    mid = plan_sweep(sweep, store)
    assert [(p.status, p.harvested) for p in mid.points] == [("pending", True)] * 2
    assert mid.harvests_to_run == [] and mid.predicted_bytes == 0

    (name, variant, params) = first.tools[0]
    analyze(result.run_dir, name, params, variant=variant)
    # the second setting as the run's own call, not as its variant: not the sweep's
    analyze(result.run_dir, name, second.tools[0][2])
    after = plan_sweep(sweep, store)
    assert [p.status for p in after.points] == ["complete", "pending"]
    assert after.points[0].point_key == first.point_key
    last = after.describe().splitlines()[-1]
    assert last.startswith("2 points: 2 distinct, 0 duplicates, 1 complete, 1 to run; 0 distinct")


def test_planning_starts_no_ray(tmp_path):
    path = write_sweep(tmp_path, {"analyze.superposition_disentangler.params.k": {"values": [2]}})
    code = (
        "import sys\n"
        "from arrakis_ray.sweeps.plan import plan_sweep\n"
        "from arrakis_ray.sweeps.spec import load_sweep\n"
        f"plan = plan_sweep(load_sweep({str(path)!r}), {str(tmp_path / 'store')!r})\n"
        "print(len(plan.points), 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]
