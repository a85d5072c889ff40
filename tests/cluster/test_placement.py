"""Placement checks on the suite's one-node Ray: stage actors spread over nodes are
refused, before the store is touched, where there is one node; the driver's store probe
is kept for a harvest or tool call and removed after it, and a worker that cannot see it
(a missing file, another token) refuses to write; tool names are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import pipeline_dict, store_snapshot

from arrakis_ray.config import pipeline_from_dict, to_dict
from arrakis_ray.errors import ClusterError, ConfigError, ToolError
from arrakis_ray.harvest.actor import HarvestStage
from arrakis_ray.harvest.driver import _run_shards, harvest
from arrakis_ray.harvest.placement import PROBE_PREFIX, StoreProbe, check_probe, store_probe
from arrakis_ray.ray_session import ray_errors
from arrakis_ray.store.layout import init_store
from arrakis_ray.store.location import store_path
from arrakis_ray.tools import TOOLS, Tool, register_tool
from arrakis_ray.tools.runner import _run_shard, analyze, make_tool


def _config(**harvest_overrides):
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], shard_size=8, **harvest_overrides)
    raw["data"]["max_documents"] = 8
    raw["analyze"] = []
    return pipeline_from_dict(raw)


def test_spread_stages_on_one_node_is_refused_before_the_store_is_touched(ray_session, tmp_path):
    store = tmp_path / "store"
    harvest(_config(), store)  # a store with a run in it: nothing of it may change
    before = store_snapshot(store)
    with pytest.raises(ConfigError) as refused:
        harvest(_config(stages=2, spread_stages=True), store)
    assert str(refused.value) == (
        "<dict>: harvest.spread_stages: 2 stages x 1 actor need 2 nodes with 0.5 CPU each, "
        "one actor per node, but the cluster has 1"
    )
    after = store_snapshot(store)
    # only the refused run's lease file, beside the runs (store/lease.py)
    assert {k: v for k, v in after.items() if not k.endswith(".harvest.lock")} == {
        k: v for k, v in before.items() if not k.endswith(".harvest.lock")
    }


def test_spread_stages_needs_actors_that_reserve_something(ray_session, tmp_path):
    config = _config(stages=2, spread_stages=True, num_cpus_per_actor=0)
    with pytest.raises(ConfigError, match="spread_stages: needs num_cpus_per_actor or num_gpus"):
        harvest(config, tmp_path / "store")


# ------------------------------------------------------------ the workers' store probe


def _probes(store) -> list[str]:
    return sorted(p.name for p in Path(store).glob(f"{PROBE_PREFIX}*"))


def _blind_line(store, reason: str) -> str:
    """The refusal a worker on this (the driver's) node gives, built from Ray's own
    view of the node."""
    import ray
    from ray.util import get_node_ip_address

    node = ray.get_runtime_context().get_node_id()
    return (
        f"store {store} is a local path that node {get_node_ip_address()} (node id "
        f"{node[:12]}…) cannot see ({reason}): rows would be written to that node's own "
        "disk; use a shared filesystem mounted at the same path on every node, or an "
        "s3:// store"
    )


def test_a_worker_that_does_not_see_the_probe_refuses_in_a_ray_task(ray_session, tmp_path):
    import ray

    store = init_store(tmp_path / "store")
    check = ray.remote(num_cpus=0, max_retries=0)(check_probe)
    with store_probe(store) as probe:
        assert (store / probe.name).read_text() == probe.token and len(probe.token) == 32
        ray.get(check.remote(store, probe))  # the driver's own probe: seen
        missing = StoreProbe(f"{PROBE_PREFIX}0000000000000000", probe.token)
        wrong = StoreProbe(probe.name, "0" * 32)  # a file of another driver's there
        for bad, reason in (
            (missing, f"the probe file {missing.name} is not there"),
            (wrong, "another directory is at that path"),
        ):
            with pytest.raises(ClusterError) as refused, ray_errors("probe"):
                ray.get(check.remote(store, bad))
            assert str(refused.value) == f"probe failed: {_blind_line(store, reason)}"
    assert _probes(store) == []
    check_probe(store, None)  # nothing to check (an object store)
    with store_probe(store_path("s3://bucket/store")) as none:  # nothing written there
        assert none is None


def test_a_harvest_stage_and_a_tool_task_refuse_before_writing(ray_session, tmp_path):
    import ray

    store = tmp_path / "store"
    result = harvest(_config(), store)
    before = store_snapshot(store)
    missing = StoreProbe(f"{PROBE_PREFIX}0000000000000000", "0" * 32)
    line = _blind_line(init_store(store), f"the probe file {missing.name} is not there")
    # the stage refuses before it loads the model or opens a writer
    with pytest.raises(ClusterError) as refused:
        HarvestStage(_config(), result.run_id, init_store(store), [], [(0, 2)], 0, "c", missing)
    assert str(refused.value) == line
    tool = make_tool("logit_lens")
    task = ray.remote(num_cpus=0.5, max_retries=0)(_run_shard)
    with pytest.raises(ClusterError) as refused, ray_errors("tool logit_lens"):
        args = (type(tool), to_dict(tool.params), init_store(store), result.run_id, "c1", 0)
        ray.get(task.remote(*args, probe=missing))
    assert str(refused.value) == f"tool logit_lens failed: {line}"
    assert store_snapshot(store) == before  # nothing written


def test_harvest_and_analyze_keep_the_probe_for_the_call_and_remove_it(ray_session, tmp_path):
    store = tmp_path / "store"
    seen = []

    def run_shards(plan, layout, pending, call, probe):
        # the probe is there, with its token, while the shards run
        seen.append((probe, (Path(layout.store_root) / probe.name).read_text()))
        return _run_shards(plan, layout, pending, call, probe=probe)

    result = harvest(_config(), store, run_shards=run_shards)
    assert result.status == "complete" and result.shards_done == 1
    [(probe, text)] = seen
    assert text == probe.token and _probes(store) == []
    done = analyze(result.run_dir, "logit_lens")
    assert done.rows > 0 and _probes(store) == []


def test_the_probe_is_removed_after_a_failed_harvest(ray_session, tmp_path):
    store = tmp_path / "store"
    seen = []

    def run_shards(plan, layout, pending, call, probe):
        seen.append(_probes(layout.store_root))
        raise RuntimeError("the shards failed")

    with pytest.raises(RuntimeError, match="the shards failed"):
        harvest(_config(), store, run_shards=run_shards)
    assert len(seen) == 1 and len(seen[0]) == 1  # it was there while the shards ran
    assert _probes(store) == []


def test_a_tool_name_with_a_dot_is_refused():
    class Dotted(Tool):
        name = "my.tool"

    with pytest.raises(ToolError) as refused:
        register_tool(Dotted)
    assert str(refused.value) == (
        f"tool class {__name__}.test_a_tool_name_with_a_dot_is_refused.<locals>.Dotted: name "
        "'my.tool' must be letters, digits and underscores only (it names the tool's "
        "records and results)"
    )
    assert "my.tool" not in TOOLS

    class Fine(Tool):
        name = "my_tool_2"

    try:
        assert register_tool(Fine) is Fine and TOOLS["my_tool_2"] is Fine
    finally:
        TOOLS.pop("my_tool_2", None)
