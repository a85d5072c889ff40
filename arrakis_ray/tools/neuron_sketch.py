"""Per-neuron statistics of the neuron dashboard: exact moments and a log-bucket sketch.

Frequency, mean and max come from exact sufficient statistics (counts, float64 sums,
maxima) that shards add up, so they equal a direct computation over every value.

Percentiles come from a mergeable log-bucket histogram (the DDSketch mapping): a value
``x`` with ``|x| >= 1e-6`` falls in bucket ``sign(x) * ceil(log_g |x|)`` with
``g = (1 + a) / (1 - a)`` (``a = quantile_accuracy``); smaller values in one zero
bucket. The q-th percentile is the order statistic ``x_(r)``, ``r = ceil(q n / 100)``
(numpy's ``inverted_cdf``); the estimate is the midpoint ``2 g^i / (g + 1)`` of that
value's bucket, clamped to the exact [min, max], so
``|estimate - x_(r)| <= max(a |x_(r)|, 1e-6)``. Buckets merge by adding counts, so the
bound holds for any number of shards, with memory bounded by the buckets in use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

ZERO = 1e-6  # |x| below this lands in the zero bucket (absolute error < 1e-6)
PERCENTILES = (50, 90, 99)


class QuantileSketch:
    """The log-bucket mapping: value -> signed bucket code (0 = |x| < ZERO), and back."""

    def __init__(self, accuracy: float):
        self.gamma = (1 + accuracy) / (1 - accuracy)
        self.log_gamma = math.log(self.gamma)
        self.i_min = math.ceil(math.log(ZERO) / self.log_gamma)
        i_max = math.ceil(math.log(np.finfo(np.float32).max) / self.log_gamma)
        self.offset = i_max - self.i_min + 1  # largest |code|
        self.span = 2 * self.offset + 1  # codes per neuron

    def codes(self, x: np.ndarray) -> np.ndarray:
        a = np.abs(x.astype(np.float64))
        with np.errstate(divide="ignore"):
            i = np.ceil(np.log(np.maximum(a, ZERO)) / self.log_gamma)
        code = np.where(a < ZERO, 0, np.sign(x) * (np.maximum(i, self.i_min) - self.i_min + 1))
        return code.astype(np.int64)

    def value(self, code: np.ndarray) -> np.ndarray:
        i = np.abs(code) + self.i_min - 1
        mid = 2 * self.gamma**i / (self.gamma + 1)
        return np.where(code == 0, 0.0, np.sign(code) * mid)

    def quantile(self, group, code, count, n, q: int) -> np.ndarray:
        """Bucket midpoint of the order statistic x_(ceil(q n / 100)) of every group.

        ``group``/``code`` sorted (as np.unique returns them), ``n`` the group totals.
        """
        cum = np.cumsum(count)
        start = np.searchsorted(group, np.arange(len(n)), side="left")
        before = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0)
        rank = np.maximum(1, -(-(q * n.astype(np.int64)) // 100))  # integer ceil
        return self.value(code[np.searchsorted(cum, before + rank, side="left")])


def per_neuron_lists(neuron, values: dict[str, tuple[np.ndarray, object]], width: int) -> dict:
    """List columns, one list per neuron 0..width-1, from entries sorted by neuron.

    ``values``: column name -> (entry values, arrow type of the list items).
    """
    import pyarrow as pa

    offsets = np.r_[0, np.cumsum(np.bincount(neuron, minlength=width))].astype(np.int32)
    return {
        name: pa.ListArray.from_arrays(offsets, pa.array(v, type=t))
        for name, (v, t) in values.items()
    }


def sketch_lists(neuron, code, count, width: int) -> dict:
    """Per-neuron ``codes``/``counts`` list columns, from cells sorted by (neuron, code)."""
    import pyarrow as pa

    return per_neuron_lists(
        neuron, {"codes": (code, pa.int32()), "counts": (count, pa.int64())}, width
    )


def neuron_groups(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique (family, layer, neuron) records, each row's index into them)."""
    family = table["family"].to_numpy(zero_copy_only=False).astype(str)
    keys, group = np.unique(
        np.rec.fromarrays([family, table["layer"].to_numpy(), table["neuron"].to_numpy()]),
        return_inverse=True,
    )
    return keys, group.ravel()


def merge_stats(s: pa.Table, sketch: QuantileSketch) -> dict:
    """The ``neuron_stats`` columns (no run_id) from every shard's partial rows."""
    import pyarrow.compute as pc

    keys, group = neuron_groups(s)
    size = len(keys)
    n = np.bincount(group, weights=s["n"].to_numpy(), minlength=size)
    lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(lo, group, s["min"].to_numpy())
    np.maximum.at(hi, group, s["max"].to_numpy())
    lengths = pc.list_value_length(s["codes"]).to_numpy()
    cell = np.repeat(group, lengths) * sketch.span + sketch.offset
    cell += pc.list_flatten(s["codes"]).to_numpy()
    cells, inverse = np.unique(cell, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=pc.list_flatten(s["counts"]).to_numpy())
    group_of, code_of = cells // sketch.span, cells % sketch.span - sketch.offset
    columns = {
        "family": keys["f0"],
        "layer": keys["f1"],
        "neuron": keys["f2"],
        "freq": np.bincount(group, weights=s["n_active"].to_numpy(), minlength=size) / n,
        "mean": np.bincount(group, weights=s["sum"].to_numpy(), minlength=size) / n,
        "max": hi,
        **{f"p{q}": sketch.quantile(group_of, code_of, counts, n, q) for q in PERCENTILES},
        "n_tokens": n.astype(np.int64),
    }
    for q in PERCENTILES:  # the true order statistic lies in [min, max]
        columns[f"p{q}"] = np.clip(columns[f"p{q}"], lo, hi)
    return columns
