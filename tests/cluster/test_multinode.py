"""Harvests across the nodes of a real multi-node Ray cluster (``ray.cluster_utils``).

``multinode.py`` builds the cluster in a child process (this process holds the suite's
one-node Ray) and harvests the same small pipeline there several ways; it reports the
node of every stage of every shard (the shard inventories) and of every actor (Ray's
actor table). Here those placements are checked, and the stored values against the
same pipeline harvested on the suite's one-node Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from support import family_table, pipeline_dict

SCRIPT = Path(__file__).with_name("multinode.py")
HOOKS = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_z"]
KEYS = {"resid_post": ["layer", "seq_id", "pos"], "attn_z": ["layer", "seq_id", "pos", "head"]}


def _pipeline() -> dict:
    raw = pipeline_dict(hooks=HOOKS, shard_size=8)  # 24 documents: 3 shards
    raw["data"]["max_documents"] = 24
    raw["analyze"] = []
    return raw


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The pipeline harvested on the suite's one-node Ray (one actor, one stage)."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest

    store = tmp_path_factory.mktemp("one-node") / "store"
    return harvest(pipeline_from_dict(_pipeline()), store).run_dir


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_s3):
    """What ``multinode.py`` observed on its cluster (one JSON report)."""
    base = tmp_path_factory.mktemp("multinode")
    spec = base / "spec.json"
    s3 = {"store": f"s3://{moto_s3['bucket']}/cluster", "env": moto_s3["env"]}
    spec.write_text(json.dumps({"pipeline": _pipeline(), "base": str(base), "s3": s3}))
    # Ray's own directory, private to the child: "ray_current_cluster" in it would send
    # any other process's ray.init() on this machine to the child's cluster; short,
    # since Ray's socket paths under it must fit in 107 bytes
    ray_tmp = tempfile.mkdtemp(prefix="arrakis-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"multinode.py failed:\n{done.stderr[-5000:]}"
    report = json.loads(lines[-1])
    report["stderr"] = done.stderr[-5000:]
    print("multinode seconds:", report["seconds"])  # shown with pytest -s
    return report


def _step(cluster: dict, name: str) -> dict:
    step = cluster[name]
    assert "failed" not in step, f"{name}: {step['failed']}\n{cluster['stderr']}"
    return step


def test_replicas_spread_one_per_gpu_node(cluster, reference, moto_s3, monkeypatch):
    step = _step(cluster, "replicas")
    workers = cluster["nodes"]["workers"]
    assert step["status"] == "complete" and step["shards_done"] == 3
    # two 1-GPU actors on two 1-GPU nodes: one on each
    assert sorted(step["actor_nodes"]) == workers
    for shard, nodes in step["shard_nodes"].items():
        assert len(nodes) == 1 and nodes[0] in workers, shard
    _assert_same_values(_run_dir(step, moto_s3, monkeypatch), reference)


def test_spread_stages_run_each_stage_on_its_own_node(cluster, reference):
    step = _step(cluster, "stages")
    workers = cluster["nodes"]["workers"]
    assert step["status"] == "complete" and len(step["shard_nodes"]) == 3
    for shard, nodes in step["shard_nodes"].items():  # both would fit on one node
        assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= set(workers), shard
    assert len(step["actor_nodes"]) == 2 and len(set(step["actor_nodes"])) == 2
    _assert_same_values(Path(step["run_dir"]), reference)


def test_a_local_store_a_node_cannot_see_is_refused_before_any_work(cluster):
    if cluster["nodes"]["blind"] is None:
        pytest.skip(f"no node that cannot see the store: {cluster['blind_skipped']}")
    step = _step(cluster, "unseen")
    blind = cluster["nodes"]["blind"]
    assert step["error"].startswith("ClusterError: store ") and "\n" not in step["error"]
    assert (
        f"is a local path that node {cluster['nodes']['ip']} (node id {blind[:12]}…)"
        in (step["error"])
    )
    assert "cannot see" in step["error"] and "an s3:// store" in step["error"]
    assert step["actors"] == 0
    # the store and the run's lease file beside the run (harvest_lease), no run, no probe
    assert [f for f in step["files"] if not f.endswith(".harvest.lock")] == ["arrakis-store.json"]


def test_an_s3_store_is_harvested_across_the_nodes(cluster, reference, moto_s3, monkeypatch):
    step = _step(cluster, "replicas")  # the replicas' harvest went to the bucket
    assert step["run_dir"].startswith(f"s3://{moto_s3['bucket']}/cluster/")
    assert len(set(step["actor_nodes"])) == 2  # an actor on each worker node
    # every shard was harvested by a worker node's actor; which one is Ray Data's choice
    # (an actor whose model loaded first may take every shard of this small run)
    shard_nodes = {n for nodes in step["shard_nodes"].values() for n in nodes}
    assert shard_nodes and shard_nodes <= set(cluster["nodes"]["workers"])
    _assert_same_values(_run_dir(step, moto_s3, monkeypatch), reference)


def _run_dir(step: dict, moto_s3: dict, monkeypatch):
    """A step's run directory: an S3 URI opened with the server's environment."""
    from arrakis_ray.store.location import store_path

    for key, value in moto_s3["env"].items():
        monkeypatch.setenv(key, value)
    return store_path(step["run_dir"])


def _assert_same_values(run_dir, reference: Path) -> None:
    """Every stored activation of ``run_dir`` equals the one-node harvest's (two Ray
    workers' float32 results may differ in their last bits)."""
    for family, keys in KEYS.items():
        got = family_table(run_dir, family).sort_by([(k, "ascending") for k in keys])
        want = family_table(reference, family).sort_by([(k, "ascending") for k in keys])
        assert got.num_rows == want.num_rows > 0, family
        for name in want.column_names:
            if name != "run_id":
                x, y = got[name].to_numpy(), want[name].to_numpy()
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{family}.{name}")
