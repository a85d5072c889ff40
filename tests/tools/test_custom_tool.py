"""A researcher's own tool, defined outside the package, runs like a built-in one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from support import family_table

from arrakis_ray.store.catalog import Store
from arrakis_ray.tools import Tool, register_tool
from arrakis_ray.tools.runner import analyze


@dataclass(frozen=True)
class NormParams:
    """Parameters of the example tool."""

    layer: int = 0
    """Block whose hook_resid_post is measured."""


class ResidNorm(Tool):
    """L2 norm of the residual stream after one block, per token."""

    name = "example_resid_norm"
    summary = "L2 norm of blocks.L.hook_resid_post per token"
    Params = NormParams

    def required_hooks(self, manifest):
        return [f"blocks.{self.params.layer}.hook_resid_post"]

    def result_schema(self, output=None):
        # a custom tool may define its schema in code instead of a schemas/ JSON file
        return pa.schema(
            [
                ("run_id", pa.string()),
                ("seq_id", pa.int64()),
                ("pos", pa.int32()),
                ("norm", pa.float32()),
            ]
        )

    def compute_shard(self, inputs, model):
        table = inputs.activations["resid_post"]
        table = table.filter(pc.equal(table["layer"], self.params.layer))
        dims = [c for c in table.column_names if c[0] == "d" and c[1:].isdigit()]
        values = np.column_stack([table[c].to_numpy() for c in dims]).astype(np.float32)
        return pa.table(
            {
                "run_id": table["run_id"],
                "seq_id": table["seq_id"],
                "pos": table["pos"],
                "norm": pa.array(np.linalg.norm(values, axis=1), pa.float32()),
            },
            schema=self.result_schema(),
        )


register_tool(ResidNorm)


def test_a_tool_from_the_users_own_module_runs_on_ray(harvested):
    _, store, result = harvested
    done = analyze(result.run_dir, "example_resid_norm", {"layer": 2})
    stored = family_table(result.run_dir, "resid_post")
    stored = stored.filter(pc.equal(stored["layer"], 2))
    dims = [c for c in stored.column_names if c[0] == "d" and c[1:].isdigit()]
    expected = np.linalg.norm(np.column_stack([stored[c].to_numpy() for c in dims]), axis=1)
    assert done.rows == stored.num_rows
    with Store(store) as db:
        got = db.sql("SELECT sum(norm) AS s, count(*) AS n FROM results_example_resid_norm")
    assert got["n"][0] == stored.num_rows
    assert abs(got["s"][0] - expected.sum()) < 1e-3 * expected.sum()
