"""The live runner: slices of prompts over replicas of stage chains in Ray actors."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from support import REPO, with_run_id

from arrakis_ray.config import to_dict
from arrakis_ray.live.prompts import read_prompts
from arrakis_ray.live.runner import run_live
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools import patching
from arrakis_ray.tools.runner import make_tool

PAIRS = REPO / "pipelines" / "data" / "facts_pairs.jsonl"


def test_two_replicas_of_two_stages_write_every_slice_once(harvested, demo_live, tmp_path):
    """The run's layout, changed to 2 replicas x 2 stages (4 actors on 2 CPUs): every
    slice is written once, by one of the replicas, and equals the tool run here."""
    reader = RunReader.open(harvested[2].run_dir)
    config = {**reader.manifest.config}
    config["harvest"] = {**config["harvest"], "actors": 2, "num_cpus_per_actor": 0.5}
    manifest = dataclasses.replace(reader.manifest, config=config, stages=((0, 2), (2, 4)))
    staged = RunReader(reader.layout, manifest)
    pairs = read_prompts(PAIRS, patching.PAIR_COLUMNS).slice(0, 12)
    pq.write_table(pairs.drop(["item"]), tmp_path / "pairs.parquet")
    params = {"prompts": str(tmp_path / "pairs.parquet"), "families": ["attn_z", "mlp_out"]}
    tool = make_tool("attribution_patching", params)
    tool.items_per_task = 5  # 3 slices: 5, 5 and 2 pairs
    payload = (type(tool), to_dict(tool.params), reader.layout.store_root, reader.run_id, "t1")
    files, slices = run_live(tool, staged, payload)
    assert slices == 3
    assert sorted(e.path for e in files) == [
        f"results/attribution_patching/t1/shard-{i:05d}.parquet" for i in range(3)
    ]
    stored = pl.concat([pl.read_parquet(e.location(reader.layout)) for e in files])
    want = pl.from_arrow(tool.compute_live(with_run_id(pairs, reader.run_id), demo_live))
    keys = ["item", "family", "layer", "pos", "head"]
    stored, want = stored.sort(keys, nulls_last=True), want.sort(keys, nulls_last=True)
    assert stored.select(keys).equals(want.select(keys))
    np.testing.assert_allclose(stored["logit_diff"], want["logit_diff"], atol=1e-4)
    for entry in files:  # not recorded: the files of this direct call are removed
        entry.location(reader.layout).unlink()
