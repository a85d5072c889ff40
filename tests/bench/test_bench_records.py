"""The bench's experiment records: content-hash versions, one append-only file per call,
read back from other processes and through the store's SQL views."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from arrakis_ray.bench import BaseInterpretabilityBench, HookedAutoConfig, HookedAutoModel
from arrakis_ray.errors import DataError, RemoteTaskError
from arrakis_ray.store.catalog import Store

REPO = Path(__file__).resolve().parents[2]

CONFIG = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture
def bench(tmp_path):
    model = HookedAutoModel(HookedAutoConfig("gpt2", **CONFIG))
    return BaseInterpretabilityBench(model, save_dir=str(tmp_path / "store"))


def _files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


def test_a_version_is_its_source_arguments_and_model_and_every_call_is_recorded(bench):
    @bench.log_experiment
    def scaled(n, scale=2.0):
        print(f"scaling {n}")
        return {"values": np.arange(n) * scale, "n": n}

    assert scaled(3)["n"] == 3
    scaled(3)
    scaled(n=3, scale=2.0)  # the same bound arguments: the same version
    scaled(4)
    versions = bench.list_versions("scaled")
    assert len(versions) == 2
    first = bench.get_version("scaled", versions[0])
    assert first["arguments"] == {"n": 3, "scale": 2.0}
    assert "def scaled(n, scale=2.0):" in first["source"]
    assert len(first["calls"]) == 3 and {c["status"] for c in first["calls"]} == {"ok"}
    assert first["calls"][0]["stdout"] == "scaling 3\n"
    assert first["result"] == {"values": [0.0, 2.0, 4.0], "n": 3}
    assert bench.get_version("scaled", versions[0][:6])["version"] == versions[0]
    assert bench.get_version("scaled", "ffff") is None

    # a weight changed in place: a new model fingerprint, so a new version
    with torch.no_grad():
        next(bench.model.model.parameters()).mul_(2)
    scaled(3)
    assert len(bench.list_versions("scaled")) == 3
    next(bench.model.model.parameters()).data.mul_(3)  # no autograd version bump
    scaled(3)
    assert len(bench.list_versions("scaled")) == 4

    with Store(bench.store) as db:
        experiments = db.sql("SELECT * FROM experiments WHERE name = 'scaled' ORDER BY first_call")
        calls = db.sql("SELECT * FROM experiment_calls WHERE name = 'scaled'")
    assert experiments["n_calls"].to_list() == [3, 1, 1, 1]
    assert calls.height == 6 and calls["call_id"].n_unique() == 6
    packages = json.loads(calls["packages"][0])
    assert packages["torch"] == torch.__version__.split("+")[0] or packages["torch"].startswith(
        torch.__version__.split("+")[0]
    )


def test_tables_arrays_and_charts_are_stored_as_files(bench):
    import altair as alt

    @bench.log_experiment
    def frame():
        return pl.DataFrame({"layer": [0, 1], "score": [0.5, 0.25]})

    @bench.log_experiment
    def grid():
        return torch.arange(6, dtype=torch.float32).reshape(2, 3)

    @bench.log_experiment
    def chart():
        return alt.Chart(pl.DataFrame({"x": [1, 2]})).mark_point().encode(x="x")

    frame(), grid(), chart()
    table = bench.get_version("frame", bench.list_versions("frame")[0])["result"]
    assert table.to_dict(as_series=False) == {"layer": [0, 1], "score": [0.5, 0.25]}
    array = bench.get_version("grid", bench.list_versions("grid")[0])["result"]
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))
    spec = bench.get_version("chart", bench.list_versions("chart")[0])["result"]
    assert spec["mark"]["type"] == "point" and spec["encoding"]["x"]["field"] == "x"

    @bench.log_experiment
    def series():
        return pl.Series("s", [1.5, 2.5])

    np.testing.assert_array_equal(series(), [1.5, 2.5])  # the caller gets its result
    stored = bench.get_version("series", bench.list_versions("series")[0])["result"]
    np.testing.assert_array_equal(stored, [1.5, 2.5])


def test_a_result_that_cannot_be_stored_is_an_error_call_and_nothing_is_lost(bench):
    import pyarrow as pa

    from arrakis_ray.errors import StoreError

    union = pa.UnionArray.from_sparse(
        pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])]
    )

    @bench.log_experiment
    def unstorable():
        return pa.table({"u": union})  # Parquet has no union type

    with pytest.raises(StoreError, match="the result of unstorable could not be stored"):
        unstorable()
    (call,) = bench.get_version("unstorable", bench.list_versions("unstorable")[0])["calls"]
    assert call["status"] == "error" and call["result_file"] is None


def test_a_damaged_record_is_left_out_and_the_store_still_opens(bench):
    @bench.log_experiment
    def kept(x):
        return x

    kept(1), kept(2)
    victim = sorted((bench.store / "experiments" / "calls" / "kept").glob("*.parquet"))[0]
    victim.write_bytes(b"not parquet")
    with Store(bench.store) as db:
        assert db.sql("SELECT n_calls FROM experiments")["n_calls"].to_list() == [1]
        assert db.sql("SELECT count(*) AS n FROM runs")["n"][0] == 0


def test_a_failing_call_is_recorded_raised_and_changes_nothing_stored(bench):
    @bench.log_experiment
    def works():
        return 1

    @bench.log_experiment
    def fails(x):
        raise ValueError(f"no good: {x}\nsecond line")

    works()
    before = {p: p.read_bytes() for p in _files(bench.store)}
    with pytest.raises(ValueError, match="no good: 7"):
        fails(7)
    after = _files(bench.store)
    assert all(before[p] == p.read_bytes() for p in before)  # nothing stored changed
    assert len(after) == len(before) + 1  # one new record
    record = bench.get_version("fails", bench.list_versions("fails")[0])
    (call,) = record["calls"]
    assert call["status"] == "error" and call["error"] == "ValueError: no good: 7"
    assert "raise ValueError" in call["traceback"] and record["result"] is None


def test_an_argument_without_stable_content_is_refused_by_name(bench):
    @bench.log_experiment
    def takes(thing):
        return 1

    with pytest.raises(DataError, match="experiment takes: argument 'thing': a object"):
        takes(object())
    with pytest.raises(DataError, match="argument 'thing': an array of object"):
        takes(np.array([object(), object()]))

    def make(k):
        return lambda x: x * k

    takes(make(1)), takes(make(100))  # closures differ by what they close over
    assert len(bench.list_versions("takes")) == 2
    takes(float("nan")), takes("nan")  # a float is not its repr
    assert len(bench.list_versions("takes")) == 4
    # arrays and tensors are versioned by content, not identity
    takes(np.ones(1000))
    takes(np.ones(1000))
    takes(torch.ones(1000))
    takes(np.zeros(1000))
    assert len(bench.list_versions("takes")) == 7


def test_records_older_than_a_column_and_the_last_successful_result(bench):
    """A record written before ``profile_file`` existed reads it as null; the last
    successful call's result is its own, even when it is a table (no JSON)."""
    from arrakis_ray.bench import records

    old = records.call_schema()
    old = old.remove(old.get_field_index("profile_file"))
    row = {f.name: None for f in old}
    row.update(
        name="legacy", version="0" * 16, call_id="20200101T000000000000Z-00000000",
        kind="experiment", started_at=__import__("datetime").datetime(2020, 1, 1), wall_s=0.1,
        status="ok", source="def legacy(): ...", arguments="{}", result_kind="json",
        result_json="7", stdout="", host="h", pid=1, packages="{}",
    )  # fmt: skip
    path = bench.store / "experiments" / "calls" / "legacy" / f"{row['call_id']}.parquet"
    records.write_row(path, row, old)
    with Store(bench.store) as db:
        legacy = db.sql("SELECT profile_file, last_ok_result_json FROM experiment_calls "
                        "JOIN experiments USING (name, version)")  # fmt: skip
    assert legacy.row(0) == (None, "7")

    state = {"table": False}

    @bench.log_experiment
    def flips():  # one version: what it returns depends on state it does not take
        return pl.DataFrame({"a": [1]}) if state["table"] else 1

    flips()
    state["table"] = True
    flips()
    with Store(bench.store) as db:
        last = db.sql("SELECT n_calls, last_ok_result_json FROM experiments WHERE name = 'flips'")
    assert last.row(0) == (2, None)  # the last call's result is a table, not the first's 1


def test_methods_recursive_functions_and_required_plot_arguments_are_versioned(bench):
    from arrakis_ray.bench import PlotSpec

    class Probe:
        def __init__(self, k):
            self.k = k

        def scaled(self, x):
            return x * self.k

    logged = bench.log_experiment(Probe(3).scaled)  # a bound method can be decorated
    assert logged(2) == 6

    @bench.log_experiment
    def takes(f):
        return f(3)

    def countdown(n):
        return 0 if n == 0 else countdown(n - 1)

    assert takes(countdown) == 0  # a function closing over itself ends

    def late():
        return later

    with pytest.raises(DataError, match="closes over a name not yet set"):
        takes(late)
    later = 1
    assert late() == later

    ids = torch.tensor([[1, 5, 9]])

    @bench.plot_results(PlotSpec("attention", "blocks.0.attn.hook_pattern"), input_ids=ids, scale=2)
    def required(fig, scale):  # no defaults: the decorator supplies both
        return scale

    assert required() == 2


def test_plot_results_records_the_decorator_arguments_and_returns_the_function_value(bench):
    from arrakis_ray.bench import PlotSpec

    ids = torch.tensor([[1, 5, 9, 2]])

    def plotted(scale):
        @bench.plot_results(
            PlotSpec("attention", "blocks.0.attn.hook_pattern"), input_ids=ids, scale=scale
        )
        def summary(fig=None, scale=1):
            return {"scale": scale, "charted": fig is not None}

        return summary

    assert plotted(5)() == {"scale": 5, "charted": True}
    plotted(1)()
    versions = bench.list_versions("summary")
    assert len(versions) == 2
    record = bench.get_version("summary", versions[0])
    assert record["arguments"]["scale"] == 5 and record["result"] == {"scale": 5, "charted": True}
    chart = json.loads((bench.store / record["calls"][0]["chart_file"]).read_text())
    assert "blocks.0.attn.hook_pattern" in json.dumps(chart)


def test_a_profile_is_read_back_with_its_version(bench):
    @bench.profile_model
    def two_forwards():
        ids = torch.tensor([[1, 2, 3]])
        bench.model.run_with_cache(ids)
        bench.model.run_with_cache(ids)

    two_forwards()
    record = bench.get_version("two_forwards", bench.list_versions("two_forwards")[0])
    profile = record["profile"]
    assert profile.equals(bench.last_profile)
    assert set(profile["calls"]) == {2} and "blocks.1.mlp" in profile["module"].to_list()
    with pytest.raises(Exception, match="granularity is for the decorator"):
        bench.profile_model(granularity="layer", input_ids=None)


_LOGGER = textwrap.dedent(
    """
    import sys
    from arrakis_ray.bench import BaseInterpretabilityBench, HookedAutoConfig, HookedAutoModel
    model = HookedAutoModel(HookedAutoConfig("gpt2", vocab_size=64, hidden_size=16,
                                             num_hidden_layers=2, num_attention_heads=4))
    exp = BaseInterpretabilityBench(model, save_dir=sys.argv[1])

    @exp.log_experiment
    def square(x):
        return x * x

    for i in range(int(sys.argv[2])):
        square(i % 3)
    print(sorted(exp.list_versions("square")))
    """
)


def test_two_processes_logging_at_once_lose_and_duplicate_nothing(tmp_path):
    script = tmp_path / "logger.py"
    script.write_text(_LOGGER)
    store = tmp_path / "shared"
    n = 15
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store), str(n)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    with Store(store) as db:
        calls = db.sql("SELECT version, call_id, result_json FROM experiment_calls")
        versions = db.sql("SELECT version, n_calls FROM experiments ORDER BY version")
    assert calls.height == 2 * n and calls["call_id"].n_unique() == 2 * n
    assert versions.height == 3  # x = 0, 1, 2: one version each, whoever logged it
    assert versions["n_calls"].sum() == 2 * n
    # both processes computed the same versions
    assert outputs[0].strip().splitlines()[-1] == outputs[1].strip().splitlines()[-1]
    assert sorted(set(calls["result_json"].to_list())) == ["0", "1", "4"]


def test_map_runs_a_grid_as_ray_tasks_and_records_each_call(bench, ray_session):
    @bench.log_experiment
    def power(base, exponent=1):
        return base**exponent

    results = bench.map(power, {"base": [2, 3], "exponent": [1, 2]})
    assert results == [2, 4, 3, 9]
    assert len(bench.list_versions("power")) == 4
    with Store(bench.store) as db:
        pids = db.sql("SELECT DISTINCT pid FROM experiment_calls WHERE name = 'power'")
    import os

    assert os.getpid() not in pids["pid"].to_list()  # they ran in Ray workers

    @bench.log_experiment
    def picky(x):
        if x == 2:
            raise ValueError("two is not allowed")
        return x

    with pytest.raises(RemoteTaskError, match=r"1 of 3 calls of picky failed .*two is not allowed"):
        bench.map(picky, [{"x": 1}, {"x": 2}, {"x": 3}])
    with Store(bench.store) as db:
        status = db.sql(
            "SELECT status, count(*) AS n FROM experiment_calls "
            "WHERE name = 'picky' GROUP BY 1 ORDER BY 1"
        )
    assert status.to_dict(as_series=False) == {"status": ["error", "ok"], "n": [1, 2]}
    # every point is checked before any task starts
    with pytest.raises(TypeError, match=r"picky\(\): missing a required argument: 'x'"):
        bench.map(picky, [{"x": 1}, {"y": 2}])
    with pytest.raises(DataError, match="grid parameter 'x' has no values"):
        bench.map(picky, {"x": []})


def test_map_records_each_decorator_as_a_direct_call_does(bench, ray_session):
    @bench.test_hypothesis(n_permutations=99, n_bootstrap=99)
    def samples(shift):
        return {"shifted": [shift + i for i in range(6)], "base": list(range(6))}

    @bench.log_experiment
    @bench.use_tools("write_read")
    def heads(layer, write_read=None):
        return [h.head for h in write_read.identify_write_heads(layer)]

    @bench.use_tools("write_read")
    @bench.log_experiment
    def heads_outer(layer, write_read=None):
        return [h.head for h in write_read.identify_write_heads(layer)]

    direct = samples(3)
    mapped = bench.map(samples, {"shift": [3, 0]})
    assert mapped[0] == direct and mapped[1].difference == 0.0
    assert bench.map(heads, {"layer": [0, 1]}) == [heads(0), heads(1)]
    assert bench.map(heads_outer, {"layer": [1]}) == [heads_outer(1)]
    with Store(bench.store) as db:
        found = db.sql(
            "SELECT name, count(DISTINCT version) AS versions, count(*) AS calls "
            "FROM experiment_calls GROUP BY name ORDER BY name"
        )
        tests = db.sql("SELECT count(*) AS n FROM hypotheses")
    assert found.to_dict(as_series=False) == {
        "name": ["heads", "heads_outer", "samples"],
        "versions": [2, 1, 2],  # mapped and direct calls share versions
        "calls": [4, 2, 3],
    }
    assert tests["n"][0] == 3


def test_the_walkthrough_runs_twice_in_fresh_processes_without_duplicates(tmp_path):
    store = tmp_path / "walk"
    script = REPO / "pipelines" / "coming_from_arrakis.py"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert "This is the version hash of the experiment:" in done.stdout
    with Store(store) as db:
        experiments = db.sql("SELECT name, kind, n_calls, n_ok FROM experiments ORDER BY name")
        hypotheses = db.sql("SELECT welch_p, permutation_p, reject FROM hypotheses")
        chart = db.sql(
            "SELECT last_ok_chart_file AS chart_file FROM experiments "
            "WHERE name = 'attention_heatmap'"
        )
    assert experiments["n_calls"].to_list() == [2] * experiments.height  # no new versions
    assert experiments["n_ok"].to_list() == [2] * experiments.height
    assert set(experiments["name"]) == {
        "attention_experiment",
        "read_write_analysis",
        "attention_heatmap",
        "residual_grows_through_the_layers",
        "forward_pass",
    }
    assert hypotheses.height == 2
    spec = json.loads((store / chart["chart_file"][0]).read_text())
    assert "blocks.1.attn.hook_pattern" in json.dumps(spec)
