"""A killed driver costs a rerun of the missing shards; a killed actor costs a retry.

Both leave every (sequence, position, hook) row exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq
import yaml
from support import family_table, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest

N_DOCS = 60  # one document per shard: many small shards, so a kill lands mid-run


def _raw():
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], shard_size=1, batch_size=1)
    raw["data"]["max_documents"] = N_DOCS
    return raw


def _wait_for_markers(store, n, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for done in (store / "runs").glob("*/completions"):
            if len(list(done.glob("shard-*.json"))) >= n:  # inventories: finished shards
                return done.parent.name
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} shards completed in {timeout} s")


def _assert_exactly_once(run_dir):
    tokens = pq.read_table(run_dir / "tokens")
    keys = list(zip(tokens["seq_id"].to_pylist(), tokens["pos"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    assert sorted({s for s, _ in keys}) == list(range(N_DOCS))
    resid = family_table(run_dir, "resid_post")
    for layer in range(4):
        rows = resid.filter(resid["layer"].to_numpy() == layer)
        got = list(zip(rows["seq_id"].to_pylist(), rows["pos"].to_pylist(), strict=True))
        assert sorted(got) == sorted(keys)


def test_a_killed_driver_resumes_where_it_stopped(ray_session, tmp_path):
    import ray

    store = tmp_path / "store"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(_raw()))
    # the driver joins this session's cluster, so killing it leaves no Ray processes behind
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "arrakis_ray.cli", "harvest", str(pipeline), "--store", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_id = _wait_for_markers(store, 3)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    layout = RunLayout(store, run_id)
    done_before = len(layout.completed_shards())
    assert 3 <= done_before < N_DOCS, "the driver finished before it could be killed"

    result = harvest(pipeline_from_dict(_raw()), store)
    assert result.run_id == run_id
    assert result.shards_done == N_DOCS - done_before  # only what was missing
    assert read_manifest(layout).harvest.resumed is True
    _assert_exactly_once(result.run_dir)


def test_a_killed_actor_costs_a_retry_not_the_run(ray_session, tmp_path):
    store = tmp_path / "store"
    outcome = {}

    def run():
        try:
            outcome["result"] = harvest(pipeline_from_dict(_raw()), store)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_markers(store, 3)
    victims = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "HarvestStage" in " ".join(p.info["cmdline"] or [])
    ]
    assert victims, "no harvest actor process found"
    for proc in victims:
        proc.kill()
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.shards_done == N_DOCS
    _assert_exactly_once(result.run_dir)
