"""Exact, mergeable activation histograms of every neuron, on a dyadic grid.

Why not bins from the exact min to the exact max: their edges depend on the neuron's
global minimum and maximum, which no shard knows, so exact counts would need a second
pass over every activation; counts read off the percentile sketch would be off by up to
a bucket (2 a |x|) at every edge. Here every edge is a multiple of a power of two
instead, which lets a shard count into fine cells that each final bin is a union of:

- a shard maps a neuron's value ``x`` to the cell ``floor(x / 2^e)``, ``e`` chosen from
  the shard's own [min, max] of the neuron by the rule
  ``e = max(ceil(log2((max - min) / (C - 2))), E(max |x|) - 40)`` with
  ``C = CELLS_PER_BIN * bins`` and ``2^E(y) > y``: the range spans at most ``C`` cells,
  and cell numbers stay below ``2^40`` (exact in float64 and int64). It keeps the counts
  of its occupied cells: at most ``C`` per neuron, and never more than its tokens;
- the merge takes ``e*`` = the same rule on the neuron's global [min, max]. The rule is
  monotone in the range, so ``e*`` is at least every shard's ``e``, and a shard's cell
  coarsens exactly: ``floor(floor(x / 2^e) / 2^(e* - e)) = floor(x / 2^e*)``, an
  arithmetic shift. Cells are grouped ``m = ceil(span / bins)`` at a time from the
  minimum's cell ``c0`` (``span``: cells from the minimum's to the maximum's).

Bin ``j`` is ``[bin_low, bin_high) = [(c0 + j m) 2^e*, (c0 + (j + 1) m) 2^e*)``: every
bin has the same width ``m 2^e*``, ``count`` is exactly the number of values in it
(``numpy.histogram`` with these edges gives the same counts), and nothing depends on
how the run is sharded. The global span is at least ``32 bins`` cells (``e*`` is at
most one above ``log2`` of the range over ``C - 2`` cells), so ``m >= 32``: bin 0
starts less than one cell (< 1/32 of a bin) below the minimum, the last bin ends above
the maximum by less than a bin, and there are more than ``32/33 bins`` bins: exactly
``bins`` for ``bins <= 32``, 39 or 40 at the default 40. The exception is a range at
the float resolution of the values, where the ``2^-40`` floor sets ``e*``: fewer bins
(a constant neuron has one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.tools.neuron_sketch import neuron_groups, per_neuron_lists

if TYPE_CHECKING:
    import pyarrow as pa

CELLS_PER_BIN = 64  # a shard's cells per final bin: the bins-per-neuron guarantee above
PRECISION_BITS = 40  # cell numbers below 2^40: exact in float64 and int64


def cells_per_neuron(bins: int) -> int:
    """C: the most cells a shard keeps per neuron."""
    return CELLS_PER_BIN * bins


def cell_exponent(lo: np.ndarray, hi: np.ndarray, cells: int) -> np.ndarray:
    """The exponent e of the cell width 2^e for values in [lo, hi] (rule above)."""
    _, top = np.frexp(np.maximum(np.abs(lo), np.abs(hi)))  # max |x| < 2^top
    finest = top.astype(np.int64) - PRECISION_BITS
    spread = hi - lo
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(spread > 0, spread, 1.0) / (cells - 2)))
    return np.where(spread > 0, np.maximum(e.astype(np.int64), finest), finest)


def _cells(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """floor(x / 2^e) as int64: scaling by a power of two and flooring are exact."""
    return np.floor(np.ldexp(x.astype(np.float64), (-e).astype(np.int32))).astype(np.int64)


def _check_finite(lo: np.ndarray, hi: np.ndarray, where: str) -> None:
    bad = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))
    if len(bad):
        raise ToolError(f"{where}: neurons {bad[:5].tolist()} have non-finite activations")


def dense_cells(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int, where: str) -> dict:
    """Histogram partials of the columns of ``x`` [tokens, neurons] (their exact min
    ``lo`` and max ``hi``): per-neuron exponent, min, max and occupied cells' counts."""
    _check_finite(lo, hi, where)
    size = cells_per_neuron(bins)
    n, width = x.shape
    e = cell_exponent(lo, hi, size)
    base = _cells(lo, e)
    step = max(1, (1 << 22) // max(size, n))  # neuron blocks: bounded scratch memory
    parts = []
    for start in range(0, width, step):
        stop = min(width, start + step)
        rel = _cells(x[:, start:stop], e[start:stop]) - base[start:stop]
        assert rel.min() >= 0 and rel.max() < size, "cell rule broken"
        key = (rel + size * np.arange(stop - start)).ravel()
        counts = np.bincount(key, minlength=size * (stop - start))
        (cell,) = np.nonzero(counts)
        neuron = cell // size + start
        parts.append((neuron, cell % size + base[neuron], counts[cell]))
    neuron, cell, count = (np.concatenate(p) for p in zip(*parts, strict=True))
    return _partial(neuron, cell, count, e, lo, hi)


def sparse_cells(feature, value, zeros, lo, hi, bins: int, where: str) -> dict:
    """Like ``dense_cells`` for columns that are zero except at (row, ``feature``)
    entries with ``value``; ``zeros[f]`` counts column f's zeros, ``lo``/``hi`` include
    them."""
    _check_finite(lo, hi, where)
    size = cells_per_neuron(bins)
    e = cell_exponent(lo, hi, size)
    base = _cells(lo, e)
    some = np.flatnonzero(zeros > 0)  # features with implicit zeros: their cell 0
    rel = np.concatenate([_cells(value, e[feature]) - base[feature], -base[some]])
    key = np.concatenate([feature, some]) * size + rel
    weight = np.concatenate([np.ones(len(value)), zeros[some]])
    cell, inverse = np.unique(key, return_inverse=True)
    count = np.bincount(inverse.ravel(), weights=weight)
    keep = count > 0
    cell, count = cell[keep], count[keep].astype(np.int64)
    neuron = cell // size
    return _partial(neuron, cell % size + base[neuron], count, e, lo, hi)


def _partial(neuron, cell, count, e, lo, hi) -> dict:
    import pyarrow as pa

    lists = per_neuron_lists(
        neuron, {"cells": (cell, pa.int64()), "counts": (count, pa.int64())}, len(e)
    )
    return {
        "neuron": np.arange(len(e)),
        "exponent": e.astype(np.int16),
        "min": lo.astype(np.float64),
        "max": hi.astype(np.float64),
        **lists,
    }


def merge_histograms(table: pa.Table, bins: int) -> dict:
    """``neuron_histograms`` columns (no run_id) from every shard's partial rows."""
    import pyarrow.compute as pc

    keys, group = neuron_groups(table)
    size = len(keys)
    lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(lo, group, table["min"].to_numpy())
    np.maximum.at(hi, group, table["max"].to_numpy())
    shard_e = table["exponent"].to_numpy().astype(np.int64)
    e = cell_exponent(lo, hi, cells_per_neuron(bins))
    np.maximum.at(e, group, shard_e)  # a no-op unless log2 rounded unevenly
    lengths = pc.list_value_length(table["cells"]).to_numpy()
    owner = np.repeat(group, lengths)
    shift = np.repeat(e[group] - shard_e, lengths)
    cell = pc.list_flatten(table["cells"]).to_numpy() >> shift  # floor(x / 2^e*)
    first, last = np.full(size, np.iinfo(np.int64).max), np.full(size, np.iinfo(np.int64).min)
    np.minimum.at(first, owner, cell)
    np.maximum.at(last, owner, cell)
    span = last - first + 1
    m = -(-span // bins)  # cells per bin
    n_bins = -(-span // m)
    index = (cell - first[owner]) // m[owner]
    counts = np.bincount(
        owner * bins + index,
        weights=pc.list_flatten(table["counts"]).to_numpy(),
        minlength=size * bins,
    ).reshape(size, bins)
    j = np.tile(np.arange(bins), (size, 1))
    used = j < n_bins[:, None]  # every bin of a neuron, empty ones too
    which = np.repeat(np.arange(size), n_bins)
    low = first[which] + j[used] * m[which]
    return {
        "family": keys["f0"][which],
        "layer": keys["f1"][which],
        "neuron": keys["f2"][which],
        "bin": j[used],
        "bin_low": np.ldexp(low.astype(np.float64), e[which].astype(np.int32)),
        "bin_high": np.ldexp((low + m[which]).astype(np.float64), e[which].astype(np.int32)),
        "count": counts[used].astype(np.int64),
    }
