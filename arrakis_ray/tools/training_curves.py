"""Training curves: a Parquet file of per-step (or per-epoch) metrics, stored with the run.

A checkpoint's training history lives next to it as a Parquet file; this tool copies it
into the store so that SQL can join it with everything else (view
``results_training_curves``: one row per step, split and metric). Two layouts are read:

- long: columns ``step`` (or ``epoch``), ``split``, ``metric``, ``value``;
- wide: a ``step`` (or ``epoch``) column and one numeric column per series, named
  ``split/metric`` (``train/loss``, ``test/accuracy``, ``progress/excluded_loss``); a
  column without a ``/`` is a metric of split ``""``. Missing values (a measure taken
  every 100 epochs in a table of every 10) are dropped.

No activations and no weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa

STEP_COLUMNS = ("step", "epoch")
LONG_COLUMNS = {"split", "metric", "value"}


@dataclass(frozen=True)
class TrainingCurvesParams:
    """Parameters of training_curves."""

    path: str = ""
    """The Parquet file of metrics (relative paths resolve against the pipeline file)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: give the Parquet file of training metrics")


class TrainingCurves(Tool):
    """The training history shipped with a checkpoint, as rows (step, split, metric, value)."""

    name = "training_curves"
    summary = "per-step training metrics from a Parquet file shipped with the checkpoint"
    Params = TrainingCurvesParams
    scope = "run"

    def compute_run(self, inputs, model=None) -> pa.Table:
        return read_curves(self.params.path, inputs.run_id, self.result_schema())


def read_curves(path: str | Path, run_id: str, schema: pa.Schema | None = None) -> pa.Table:
    """The file's metrics as a long table ``(run_id, step, split, metric, value)``."""
    import pyarrow as pa
    from pyarrow import parquet as pq  # the curves file the user names (not a store file)

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ToolError(f"training_curves: cannot read {path}: {exc}") from None
    names = table.column_names
    step_col = next((c for c in STEP_COLUMNS if c in names), None)
    if step_col is None:
        raise ToolError(f"training_curves: {path} has no 'step' or 'epoch' column ({names})")
    steps = table.column(step_col).to_numpy().astype(np.int64)
    if LONG_COLUMNS <= set(names):
        split = np.asarray(table.column("split").to_pylist(), dtype=object)
        metric = np.asarray(table.column("metric").to_pylist(), dtype=object)
        value = table.column("value").to_numpy(zero_copy_only=False).astype(np.float64)
    else:
        parts = [_series(table, col, steps) for col in names if col != step_col]
        if not parts:
            raise ToolError(f"training_curves: {path} has no metric columns")
        steps, split, metric, value = (np.concatenate(x) for x in zip(*parts, strict=True))
    keep = ~np.isnan(value)
    columns = {
        "run_id": np.full(int(keep.sum()), run_id, dtype=object),
        "step": steps[keep],
        "split": split[keep],
        "metric": metric[keep],
        "value": value[keep],
    }
    if schema is None:
        return pa.table(columns)
    return pa.Table.from_pydict(columns, schema=schema)


def _series(table: pa.Table, column: str, steps: np.ndarray):
    """(steps, split, metric, value) of one wide column named ``split/metric``."""
    import pyarrow.types as pt

    if not (
        pt.is_integer(table.schema.field(column).type)
        or pt.is_floating(table.schema.field(column).type)
    ):
        raise ToolError(f"training_curves: column {column!r} is not numeric")
    split, _, metric = column.rpartition("/")
    n = len(steps)
    value = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return steps, np.full(n, split, dtype=object), np.full(n, metric, dtype=object), value
