"""Every tool gives the same result on a 2-stage run as on the whole-model run.

A staged run stores each shard of a hook family as one file part per pipeline stage;
tools read through ``RunReader``, which joins the parts, so nothing downstream of the
harvest may tell the two runs apart. The two runs harvest the same documents with the
same model; only the layout of their files differs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from support import REPO, pipeline_dict

from arrakis_ray.config import load_pipeline, pipeline_from_dict
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools import STUDY_TOOLS, TOOLS
from arrakis_ray.tools.runner import analyze, tool_class

DEMO_HOOKS = list(load_pipeline(REPO / "pipelines" / "demo.yaml").harvest.hooks)
# the demo pipeline's tools, with its parameters
EVERY_DEMO_TOOL = [
    (s.tool, s.params) for s in load_pipeline(REPO / "pipelines" / "demo.yaml").analyze
]
# of the live tools, one through Ray here: each live tool's 2-stage result is checked in
# one process in tests/live, and the Ray chain of stage actors by tests/live/test_live_runner
DEMO_TOOLS = [
    (tool, params)
    for tool, params in EVERY_DEMO_TOOL
    if TOOLS[tool].scope != "live" or tool == "activation_patching"
]
# columns that legitimately differ between two runs of the same computation
VOLATILE = {"run_id", "seconds", "seconds_per_forward", "weights_path"}  # timings; a call dir


@pytest.fixture(scope="module")
def two_runs(ray_session, tmp_path_factory):
    """(whole, staged) readers of the same 40 documents, harvested with the demo hooks."""
    store = tmp_path_factory.mktemp("staged") / "store"
    readers = []
    for stages in (1, 2):
        result = harvest(pipeline_from_dict(pipeline_dict(hooks=DEMO_HOOKS, stages=stages)), store)
        readers.append(RunReader.open(result.run_dir))
    whole, staged = readers
    assert staged.manifest.n_stages == 2 and whole.manifest.n_stages == 1
    return whole, staged


def test_the_demo_runs_every_registered_tool():
    built_in = {n for n, c in TOOLS.items() if c.__module__.startswith("arrakis_ray.tools.")}
    # the studies' tools need their own inputs (a curves file, all p^2 modular pairs)
    assert {name for name, _ in EVERY_DEMO_TOOL} == built_in - STUDY_TOOLS


@pytest.mark.parametrize(("tool", "params"), DEMO_TOOLS, ids=[t for t, _ in DEMO_TOOLS])
def test_a_tool_gives_the_same_result_on_a_staged_run(two_runs, tool, params):
    whole, staged = two_runs
    for reader in two_runs:
        analyze(reader.layout.root, tool, params)
    for output in tool_class(tool).output_names():
        a, b = _comparable(whole.result(output)), _comparable(staged.result(output))
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, output
        for name in a.column_names:
            x, y = a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4, err_msg=f"{output}.{name}")
            else:
                assert x.tolist() == y.tolist(), f"{output}.{name}"


def _comparable(table: pa.Table) -> pa.Table:
    """The table without run-specific columns, rows in a canonical order."""
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    keys = [
        f.name
        for f in table.schema
        if not pa.types.is_floating(f.type) and not pa.types.is_nested(f.type)
    ]
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table
