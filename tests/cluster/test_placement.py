"""Placement checks on the suite's one-node Ray: stage actors spread over nodes are
refused, before the store is touched, where there is one node."""

from __future__ import annotations

import pytest
from support import pipeline_dict, store_snapshot

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ConfigError
from arrakis_ray.harvest.driver import harvest


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
