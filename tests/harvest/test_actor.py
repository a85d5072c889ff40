"""The harvest step in-process (no Ray): concurrent shards, and a failing write.

HarvestStage overlaps one shard's writes with the next shard's forward (two calls at
once, a lock around the model). These tests drive it from threads the way Ray Data's
two concurrent calls do, and check the stored rows against a sequential run.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import HarvestError
from arrakis_ray.harvest.actor import HarvestStage
from arrakis_ray.harvest.inputs import plan_shards
from arrakis_ray.harvest.model_source import describe_model
from arrakis_ray.harvest.tokenize import TokenizeShard
from arrakis_ray.store.layout import RunLayout, init_store

HOOKS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]


@pytest.fixture(scope="module")
def shards():
    """(config, hooks, tokenized batches of 4 shards of 10 documents)."""
    config = pipeline_from_dict(pipeline_dict(hooks=HOOKS, shard_size=10, batch_size=4))
    hooks = describe_model(config.model).resolve_hooks(config.harvest.hooks)
    tokenize = TokenizeShard(config)
    plan = plan_shards(config.data.path, 10, config.data.max_documents)
    batches = [tokenize({k: np.array([v]) for k, v in s.to_dict().items()}) for s in plan]
    return config, hooks, batches


def _step(config, hooks, store, run_id="run") -> HarvestStage:
    n_layers = describe_model(config.model).n_layers
    return HarvestStage(config, run_id, init_store(store), hooks, [(0, n_layers)], 0)


def _rows(store, run_id, family):
    # every (layer, block) file of the family: one block each at these widths
    files = sorted(RunLayout(store, run_id).activation_dir(family).rglob("shard-*.parquet"))
    table = pq.read_table(files, partitioning=None).drop_columns(["run_id"])
    return table.sort_by([("seq_id", "ascending"), ("layer", "ascending"), ("pos", "ascending")])


def test_concurrent_calls_store_what_sequential_calls_store(shards, tmp_path):
    config, hooks, batches = shards
    sequential = _step(config, hooks, tmp_path / "a")
    for batch in batches:
        sequential(batch)
    concurrent = _step(config, hooks, tmp_path / "b")
    errors = []

    def work(mine):
        try:
            for batch in mine:
                concurrent(batch)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(batches[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for family in ("resid_post", "mlp_post", "tokens"):
        if family == "tokens":
            a = pq.read_table(RunLayout(tmp_path / "a", "run").tokens_dir)
            b = pq.read_table(RunLayout(tmp_path / "b", "run").tokens_dir)
            keys = [("seq_id", "ascending"), ("pos", "ascending")]
            a, b = a.sort_by(keys), b.sort_by(keys)
        else:
            a, b = _rows(tmp_path / "a", "run", family), _rows(tmp_path / "b", "run", family)
        assert a.num_rows > 0 and a.equals(b), family
    assert RunLayout(tmp_path / "b", "run").completed_shards() == {0, 1, 2, 3}


def test_a_failed_write_leaves_no_completion_marker(shards, tmp_path):
    config, hooks, batches = shards
    step = _step(config, hooks, tmp_path / "store")
    layout = RunLayout(tmp_path / "store", "run")
    layout.tokens_dir.parent.mkdir(parents=True)
    layout.tokens_dir.write_text("a file where the tokens directory should be")
    with pytest.raises(HarvestError, match="shard 0"):
        step(batches[0])
    assert layout.completed_shards() == set()
    # the activation files that could be written are whole and readable; the shard
    # is redone on resume because it has no marker
    for family in ("resid_post", "mlp_post"):
        files = list(layout.activation_dir(family).rglob("*.parquet"))
        assert files and {f.name for f in files} == {"shard-00000.parquet"}
        assert all(pq.read_metadata(f).num_rows > 0 for f in files)
