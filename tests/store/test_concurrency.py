"""Two harvests write different runs into one store while SQL reads it in a loop.

Both harvests must succeed, and every query must see a consistent store: whole
sequences only (a file is either absent or complete), and for every shard whose
completion marker existed before the query, as many activation rows per layer as tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import yaml
from support import pipeline_dict

from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout, init_store, list_run_ids
from arrakis_ray.store.manifest import read_manifest

N_LAYERS = 4  # facts-gpt2
DOCS = (6, 8)  # two different inputs -> two different runs


def _snapshot(store) -> dict[str, dict[int, range]]:
    """Per run: the document (= seq_id) range of every shard completed right now."""
    done = {}
    for run_id in list_run_ids(store):
        layout = RunLayout(store, run_id)
        shards = layout.completed_shards()
        if not shards:
            continue
        plan = {p.shard: p for p in read_manifest(layout).shard_plan}
        done[run_id] = {
            s: range(plan[s].first_doc, plan[s].first_doc + plan[s].count) for s in shards
        }
    return done


def _check(store) -> tuple[int, int]:
    """One consistency check with a freshly opened Store; returns (runs seen, shards seen)."""
    completed = _snapshot(store)  # before the query: these shards are fully written
    with Store(store) as s:
        if "act_resid_post" not in s.views() or "tokens" not in s.views():
            return 0, 0
        acts = s.sql(
            "SELECT run_id, layer, seq_id, count(*) AS n, count(DISTINCT pos) AS d, "
            "max(pos) AS m FROM act_resid_post GROUP BY ALL"
        )
        tokens = s.sql("SELECT run_id, seq_id, count(*) AS n FROM tokens GROUP BY ALL")
    # a sequence is there whole or not at all: one row per position 0..m, per layer
    assert (acts["n"] == acts["d"]).all() and (acts["n"] == acts["m"] + 1).all()
    rows = {
        (r, layer, q): n for r, layer, q, n in acts.select("run_id", "layer", "seq_id", "n").rows()
    }
    n_tokens = dict(((r, q), n) for r, q, n in tokens.rows())
    for run_id, shards in completed.items():
        for docs in shards.values():
            for seq in docs:
                assert n_tokens[(run_id, seq)] > 0
                for layer in range(N_LAYERS):
                    assert rows[(run_id, layer, seq)] == n_tokens[(run_id, seq)]
    return len(completed), sum(len(s) for s in completed.values())


def _start(tmp_path, store, i: int, docs: int, env: dict) -> subprocess.Popen:
    """An ``arrakis-ray harvest`` process of ``docs`` documents, logging to harvest-<i>.log."""
    # compact: false keeps this test about shards landing while a reader queries (the
    # switch to parts under an open Store: test_wide_layout.py)
    raw = pipeline_dict(
        hooks=["blocks.*.hook_resid_post"], shard_size=1, batch_size=1, compact=False
    )
    raw["data"]["max_documents"] = docs
    pipeline = tmp_path / f"pipeline-{i}.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "arrakis_ray.cli", "harvest", str(pipeline)]
    with open(tmp_path / f"harvest-{i}.log", "w") as log:
        return subprocess.Popen(
            [*command, "--store", str(store)], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def test_two_harvests_and_a_reader(ray_session, tmp_path):
    import ray

    # the store exists beforehand: two harvests creating one store at once can race (report)
    store = init_store(tmp_path / "store")
    # the drivers join this session's cluster: no second Ray instance on this machine
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    drivers = [_start(tmp_path, store, i, docs, env) for i, docs in enumerate(DOCS)]
    checks, while_both_ran = 0, 0
    deadline = time.monotonic() + 120
    try:
        while any(p.poll() is None for p in drivers):
            assert time.monotonic() < deadline, "the harvests did not finish in 120 s"
            both = all(p.poll() is None for p in drivers)
            _runs, shards = _check(store)
            checks += 1
            # shards were readable while both writers were still running
            while_both_ran += both and shards > 0 and all(p.poll() is None for p in drivers)
            time.sleep(0.1)  # leave the harvests most of this 2-core machine
    finally:
        for proc in drivers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    for i, proc in enumerate(drivers):
        assert proc.returncode == 0, (tmp_path / f"harvest-{i}.log").read_text()[-3000:]

    runs, shards = _check(store)  # the finished store
    assert runs == 2 and shards == sum(DOCS)
    assert checks >= 3 and while_both_ran >= 1, (checks, while_both_ran)
    for run_id in list_run_ids(store):
        assert read_manifest(RunLayout(store, run_id)).status == "complete"
    with Store(store) as s:
        counts = s.sql(
            "SELECT run_id, count(DISTINCT seq_id) AS seqs FROM tokens GROUP BY ALL ORDER BY 2"
        )
    assert counts["seqs"].to_list() == list(DOCS)
