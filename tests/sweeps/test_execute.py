"""Running a sweep: each harvest once on warm actors, tool settings side by side, only
what is missing on a rerun, failures retried and reported without stopping the rest."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from store.test_object_store import BUCKET, _s3fs, s3_endpoint, s3_env  # noqa: F401
from support import pipeline_dict, store_snapshot

from arrakis_ray.errors import ToolError
from arrakis_ray.tools.base import Tool

MLP = ["blocks.*.mlp.hook_post"]
MLP_RESID = ["blocks.*.mlp.hook_post", "blocks.*.hook_resid_post"]
THRESHOLDS = [0.0, 0.5]


def _write_sweep(directory, parameters: dict, retries: int = 0, analyze=None) -> str:
    base = pipeline_dict()
    base["data"]["max_documents"] = 16
    base["harvest"].update(shard_size=8, hooks=MLP)
    base["analyze"] = analyze or [
        {"tool": "sparsity_analyzer", "params": {"kurtosis_family": None}}
    ]
    (directory / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "sparsity-by-hooks",
        "base": "base.yaml",
        "method": "grid",
        "parameters": copy.deepcopy(parameters),
        "max_concurrent": 2,
        "retries": retries,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    """(sweep file, store, outcome) of a 2 hook sets x 2 thresholds sweep, run once."""
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    directory = tmp_path_factory.mktemp("sweep")
    path = _write_sweep(
        directory,
        {
            "harvest.hooks": {"values": [MLP, MLP_RESID]},
            "analyze.sparsity_analyzer.params.threshold": {"values": THRESHOLDS},
        },
    )
    store = directory / "store"
    sweep = load_sweep(path)
    lines: list[str] = []
    outcome = run_sweep(plan_sweep(sweep, store), store, echo=lines.append)
    return path, store, outcome, lines


def test_each_harvest_runs_once_on_one_warm_model(swept):
    _path, store, outcome, _lines = swept
    assert outcome.ran == [0, 1, 2, 3] and not outcome.failed
    assert outcome.harvests == 2  # 2 hook sets; the thresholds share each harvest
    assert outcome.model_loads == 1  # one warm actor, one model, four runs' shards
    runs = [p.name for p in (store / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 2


def test_each_tool_setting_keeps_its_own_results(swept):
    """Frequencies per threshold equal counts over the stored activations, per variant."""
    from arrakis_ray.store.catalog import Store

    _path, store, _outcome, _lines = swept
    with Store(store) as db:
        runs = db.sql(
            "SELECT point, run_id, status, variants['sparsity_analyzer'] AS variant, "
            "params['analyze.sparsity_analyzer.params.threshold'] AS threshold "
            "FROM sweep_runs ORDER BY point"
        )
        assert runs["status"].to_list() == ["complete"] * 4
        assert runs["threshold"].to_list() == [0.0, 0.5, 0.0, 0.5]
        for row in runs.iter_rows(named=True):
            got = db.sql(
                "SELECT n_active FROM results_sparsity_neurons WHERE family = 'mlp_post' "
                f"AND layer = 1 AND neuron = 3 AND run_id = '{row['run_id']}' "
                f"AND variant = '{row['variant']}'"
            )
            want = db.sql(
                f"SELECT count(*) FILTER (WHERE d3 > {row['threshold']}) AS n "
                f"FROM act_mlp_post WHERE run_id = '{row['run_id']}' AND layer = 1"
            )
            assert got["n_active"].to_list() == want["n"].to_list()
        # the two thresholds really differ on this neuron's counts
        counts = db.sql(
            "SELECT r.variant, r.n_active FROM results_sparsity_neurons r "
            "WHERE layer = 1 AND neuron = 3 ORDER BY n_active"
        )["n_active"].to_list()
        assert counts[0] < counts[-1]


def test_a_rerun_does_only_what_is_missing(swept):
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    path, store, _outcome, _lines = swept
    runs_before = store_snapshot(store / "runs")
    again = run_sweep(plan_sweep(load_sweep(path), store), store, echo=lambda _line: None)
    assert again.already_complete == [0, 1, 2, 3]
    assert again.ran == [] and again.harvests == 0 and again.model_loads == 0
    assert store_snapshot(store / "runs") == runs_before  # not a byte of a run changed


@dataclass(frozen=True)
class FlakyParams:
    tries_to_fail: int
    """How many calls fail before one succeeds (counted in ``counter``)."""
    counter: str
    """A file holding the calls made so far (the tasks run in other processes)."""


class Flaky(Tool):
    """Fails its first ``tries_to_fail`` calls, then counts each shard's tokens."""

    name = "test_flaky"
    summary = "fails, then counts tokens"
    Params = FlakyParams

    def required_hooks(self, manifest):
        return []

    def result_schema(self, output=None):
        return pa.schema([("run_id", pa.string()), ("tokens", pa.int64())])

    def compute_shard(self, inputs, model):
        counter = Path(self.params.counter)
        calls = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(calls + 1))
        if calls < self.params.tries_to_fail:
            raise ToolError(f"test_flaky: call {calls + 1} fails on purpose")
        return pa.table(
            {"run_id": [inputs.run_id], "tokens": [inputs.tokens.num_rows]},
            schema=self.result_schema(),
        )


def test_a_failing_point_is_retried_then_reported_and_the_others_finish(ray_session, tmp_path):
    """One point fails more times than it may retry; another fails once, then succeeds on
    its retry; the failure stops neither, and the store says which is which."""
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    tool = f"{__name__}:Flaky"
    path = _write_sweep(
        tmp_path,
        {"analyze.0.params.tries_to_fail": {"values": [5, 1]}},
        retries=1,
        # one shard: one task per call, so the counter counts calls
        analyze=[{"tool": tool, "params": {"tries_to_fail": 0, "counter": "unset"}}],
    )
    raw = yaml.safe_load((tmp_path / "sweep.yaml").read_text())
    del raw["parameters"]  # a zip group instead: each point its own counter
    raw["zip"] = [
        {
            "analyze.0.params.tries_to_fail": [5, 1],
            "analyze.0.params.counter": [str(tmp_path / "a"), str(tmp_path / "b")],
        }
    ]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["harvest"]["shard_size"] = 16
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    store = tmp_path / "store"
    outcome = run_sweep(plan_sweep(load_sweep(path), store), store, echo=lambda _line: None)
    assert outcome.ran == [1]
    ((point, error),) = outcome.failed
    assert point == 0 and "call 2 fails on purpose" in error  # the retry's own error
    assert (tmp_path / "a").read_text() == "2" and (tmp_path / "b").read_text() == "2"
    with Store(store) as db:
        rows = db.sql("SELECT point, status, attempt, error FROM sweep_runs ORDER BY point")
        tokens = db.sql("SELECT sum(tokens) AS n FROM results_test_flaky")["n"].to_list()
        stored = db.sql("SELECT count(*) AS n FROM tokens")["n"].to_list()
    assert rows["status"].to_list() == ["failed", "complete"]
    assert rows["attempt"].to_list() == [2, 2]  # the first try and one retry, each
    assert "fails on purpose" in rows["error"].to_list()[0]
    assert tokens == stored  # the point that recovered computed its result


def test_warm_actors_harvest_what_ray_data_actors_harvest(ray_session, tmp_path):
    """The same run through the warm pool and through the default Ray Data pools."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.warm import WarmPool

    raw = pipeline_dict(hooks=MLP_RESID, shard_size=8)
    raw["data"]["max_documents"] = 16
    config = pipeline_from_dict(raw)
    with WarmPool() as pool:
        warm = harvest(config, tmp_path / "warm", run_shards=pool.run_shards)
        assert pool.loads() == 1
    cold = harvest(config, tmp_path / "cold")
    assert warm.run_id == cold.run_id and warm.tokens == cold.tokens > 0
    query = "SELECT * EXCLUDE (block) FROM act_resid_post ORDER BY layer, seq_id, pos"
    with Store(tmp_path / "warm") as a, Store(tmp_path / "cold") as b:
        assert a.sql(query).equals(b.sql(query))


def test_a_tool_setting_shared_by_points_is_computed_once(ray_session, tmp_path):
    """Two points differ in one tool's threshold and share another tool's setting: the
    shared setting runs once (its counter counts one call of its one shard)."""
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    counter = tmp_path / "calls"
    path = _write_sweep(
        tmp_path,
        {"analyze.sparsity_analyzer.params.threshold": {"values": THRESHOLDS}},
        analyze=[
            {"tool": "sparsity_analyzer", "params": {"kurtosis_family": None}},
            {"tool": f"{__name__}:Flaky", "params": {"tries_to_fail": 0, "counter": str(counter)}},
        ],
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["harvest"]["shard_size"] = 16  # one shard: one task per call
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    store = tmp_path / "store"
    outcome = run_sweep(plan_sweep(load_sweep(path), store), store, echo=lambda _line: None)
    assert outcome.ran == [0, 1] and not outcome.failed
    assert counter.read_text() == "1"


@pytest.mark.usefixtures("s3_env")  # a moto server on loopback (tests/store)
def test_a_sweep_into_an_s3_store(ray_session, tmp_path):
    """The whole sweep on an object store: warm harvest, tool variants, events, views."""
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    path = _write_sweep(
        tmp_path, {"analyze.sparsity_analyzer.params.threshold": {"values": THRESHOLDS}}
    )
    store = f"s3://{BUCKET}/sweep-store"
    outcome = run_sweep(plan_sweep(load_sweep(path), store), store, echo=lambda _line: None)
    assert outcome.ran == [0, 1] and outcome.harvests == 1 and not outcome.failed
    with Store(store) as db:
        runs = db.sql(
            "SELECT run_id, variants['sparsity_analyzer'] AS variant, "
            "params['analyze.sparsity_analyzer.params.threshold'] AS threshold "
            "FROM sweep_runs WHERE status = 'complete' ORDER BY point"
        )
        assert runs["threshold"].to_list() == THRESHOLDS
        for row in runs.iter_rows(named=True):
            got = db.sql(
                "SELECT n_active FROM results_sparsity_neurons WHERE layer = 0 AND neuron = 5 "
                f"AND variant = '{row['variant']}'"
            )["n_active"].to_list()
            want = db.sql(
                f"SELECT count(*) FILTER (WHERE d5 > {row['threshold']}) AS n "
                f"FROM act_mlp_post WHERE run_id = '{row['run_id']}' AND layer = 0"
            )["n"].to_list()
            assert got == want
    again = plan_sweep(load_sweep(path), store)
    assert [p.status for p in again.points] == ["complete", "complete"]


def test_a_staged_point_goes_through_the_stages_after_the_warm_pools(ray_session, tmp_path):
    """harvest.stages 1 and 2: two runs, the staged one through Ray Data's stage actors
    once the warm pool is ended; their activations are equal."""
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    path = _write_sweep(tmp_path, {"harvest.stages": {"values": [1, 2]}})
    store = tmp_path / "store"
    outcome = run_sweep(plan_sweep(load_sweep(path), store), store, echo=lambda _line: None)
    assert outcome.ran == [0, 1] and outcome.harvests == 2 and not outcome.failed
    assert outcome.model_loads == 1  # the unstaged run's warm actor only
    query = (
        "SELECT layer, seq_id, pos, d0, d7 FROM act_mlp_post "
        "WHERE run_id = '{run}' ORDER BY layer, seq_id, pos"
    )
    with Store(store) as db:
        runs = db.sql("SELECT run_id FROM sweep_runs ORDER BY point")["run_id"].to_list()
        assert len(set(runs)) == 2
        whole, staged = (db.sql(query.format(run=run)) for run in runs)
    assert whole.height > 0
    keys = ["layer", "seq_id", "pos"]
    assert whole.select(keys).equals(staged.select(keys))
    # two processes' float32 forwards may differ in their last bits (as across nodes)
    for column in ("d0", "d7"):
        np.testing.assert_allclose(
            staged[column].to_numpy(), whole[column].to_numpy(), rtol=1e-5, atol=1e-6
        )
