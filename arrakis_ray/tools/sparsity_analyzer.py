"""Sparsity analysis: how often neurons fire, how concentrated tokens are, heavy tails.

For a dense hook family (``family``, default ``mlp_post``), per layer:

- per neuron: firing frequency (fraction of tokens with activation ``> threshold``),
  dead (never fires over the run), mean, std (population), min, max;
- per token: L0 = number of active neurons, and the Gini index of the token's absolute
  activations over the neurons (Hurley & Rickard 2009: 0 = all neurons equally active,
  1 - 1/n = one neuron carries everything); summarised per layer (mean, std, min, max of
  L0; mean and std of Gini over tokens whose activations are not all zero) and as
  histograms. Gini is per token because a token's whole vector lives in one row, so it
  streams; a per-neuron Gini over tokens would need every token of the run sorted.

For ``kurtosis_family`` (default ``resid_post``), per layer and dimension: mean, std,
skewness and excess kurtosis (``m4 / m2**2 - 3``; 0 for a Gaussian). Heavy tails in a
few dimensions are the signature of a privileged basis (Elhage et al. 2023); the mean
over dimensions per layer is ``AVG(kurtosis) ... GROUP BY layer``.

Histograms of both families' values use fixed global bin edges (``hist_range``,
``kurtosis_hist_range``, ``hist_bins``), plus one underflow bin ``[-inf, lo)`` and one
overflow bin ``(hi, inf]``, so the counts add up to every stored value.

Streaming: each shard task returns sufficient statistics (counts, min, max, and per
column the mean and *central* moment sums ``sum (x - mean_shard)^p`` for p = 2..4,
computed in float64), which ``reduce`` combines exactly with the parallel-moments shift
(Pebay 2008), both by ``arrakis_ray.numerics.Moments``. Central sums, not raw power
sums: ``sum x^4 / n - ...`` cancels catastrophically when a dimension's mean is large
next to its spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray import hooks
from arrakis_ray.errors import ToolError
from arrakis_ray.numerics import Moments
from arrakis_ray.tools.base import ShardInputs, Tool

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

_KEYS = ("family", "layer")


@dataclass(frozen=True)
class SparsityParams:
    """Parameters of the sparsity analyzer."""

    family: str = "mlp_post"
    """Dense hook family whose neurons (columns) are analysed."""
    threshold: float = 0.0
    """A neuron is active on a token when its activation is strictly above this."""
    kurtosis_family: str | None = "resid_post"
    """Family whose per-dimension kurtosis is measured; null skips it."""
    layers: tuple[int, ...] = ()
    """Layers to analyse; empty = every layer."""
    hist_bins: int = 64
    """Bins of every histogram (plus an underflow and an overflow bin for values)."""
    hist_range: tuple[float, ...] = (-1.0, 5.0)
    """[lo, hi] of the value histogram of ``family``."""
    kurtosis_hist_range: tuple[float, ...] = (-10.0, 10.0)
    """[lo, hi] of the value histogram of ``kurtosis_family``."""

    def __post_init__(self) -> None:
        for name in ("family", "kurtosis_family"):
            value = getattr(self, name)
            if value is not None and value not in hooks.DENSE_BLOCK_FAMILIES:
                raise ValueError(
                    f"{name} {value!r} is not one of {', '.join(hooks.DENSE_BLOCK_FAMILIES)}"
                )
        if self.hist_bins < 1:
            raise ValueError(f"hist_bins must be >= 1, got {self.hist_bins}")
        for name in ("hist_range", "kurtosis_hist_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{name} must be [lo, hi] with lo < hi, got {list(lo_hi)}")


class SparsityAnalyzer(Tool):
    """Neuron firing frequencies, dead neurons, L0 and Gini per token, kurtosis per dim."""

    name = "sparsity_analyzer"
    summary = "per neuron: firing frequency, dead; per layer: L0, Gini; per dim: kurtosis"
    reference = "Hurley & Rickard, 'Comparing Measures of Sparsity' (2009); Elhage et al., 'Privileged Bases in the Transformer Residual Stream' (2023)"  # noqa: E501
    Params = SparsityParams
    outputs = ("sparsity_neurons", "sparsity_layers", "sparsity_kurtosis", "sparsity_histograms")

    def _layers(self, manifest: RunManifest) -> list[int]:
        return self.selected_layers(manifest, self.params.layers)

    def _families(self) -> list[str]:
        extra = self.params.kurtosis_family
        return [self.params.family] + ([extra] if extra and extra != self.params.family else [])

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [
            hooks.family_hook(family, layer)
            for family in self._families()
            for layer in self._layers(manifest)
        ]

    def compute_shard(self, inputs: ShardInputs, model=None) -> dict:
        """Sufficient statistics of one shard, one partial table per output."""

        p = self.params
        parts: dict[str, list[dict]] = {name: [] for name in self.outputs}
        for layer in self._layers(inputs.manifest):
            x = _matrix(inputs, p.family, layer)
            keys = {"family": p.family, "layer": layer}
            active = x > p.threshold
            neuron = {"neuron": np.arange(x.shape[1]), "n_active": active.sum(0)}
            parts["sparsity_neurons"].append({**keys, **neuron, **_moments(x, 2)})
            l0 = active.sum(1)
            gini = gini_index(x)
            nonzero = ~np.isnan(gini)
            gini_stats = _moments(gini[nonzero, None], 2)
            parts["sparsity_layers"].append(
                {
                    **keys,
                    **{f"l0_{k}": v for k, v in _moments(l0[:, None].astype(float), 2).items()},
                    **{f"gini_{k}": v for k, v in gini_stats.items()},
                }
            )
            n = x.shape[1]
            for quantity, values, lo, hi, bins in (
                ("activation", x, *p.hist_range, p.hist_bins),
                ("l0", l0, 0, n, min(p.hist_bins, n)),
                ("gini", gini[nonzero], 0.0, 1.0, p.hist_bins),
            ):
                parts["sparsity_histograms"].append(
                    {**keys, "quantity": quantity, **histogram(values, lo, hi, bins)}
                )
            family = p.kurtosis_family
            if family:
                y = x if family == p.family else _matrix(inputs, family, layer)
                keys = {"family": family, "layer": layer}
                parts["sparsity_kurtosis"].append(
                    {**keys, "dim": np.arange(y.shape[1]), **_moments(y, 4)}
                )
                if family != p.family:
                    hist = histogram(y, *p.kurtosis_hist_range, p.hist_bins)
                    parts["sparsity_histograms"].append({**keys, "quantity": "activation", **hist})
        return {name: _table(rows) for name, rows in parts.items() if rows}

    def reduce(self, partials: dict, manifest: RunManifest, model=None) -> dict:
        """Combine every shard's statistics into the final tables."""
        import pyarrow as pa

        run_id = manifest.run_id
        out = {}
        neurons = _merge(partials["sparsity_neurons"], ("neuron",), {"": 2})
        n = neurons["n"]
        out["sparsity_neurons"] = _final(
            self,
            "sparsity_neurons",
            run_id,
            {
                **{k: neurons[k] for k in (*_KEYS, "neuron")},
                "n_tokens": n,
                "n_active": neurons["n_active"],
                "freq": neurons["n_active"] / n,
                "dead": neurons["n_active"] == 0,
                "mean": neurons["mean"],
                "std": neurons["moments"].std,
                "min": neurons["min"],
                "max": neurons["max"],
            },
        )
        layers = _layer_summary(partials["sparsity_layers"], neurons)
        out["sparsity_layers"] = _final(self, "sparsity_layers", run_id, layers)
        if "sparsity_kurtosis" in partials:
            k = _merge(partials["sparsity_kurtosis"], ("dim",), {"": 4})
            constant = k["min"] == k["max"]  # no spread: skew and kurtosis are undefined
            moments = k["moments"]
            out["sparsity_kurtosis"] = _final(
                self,
                "sparsity_kurtosis",
                run_id,
                {
                    **{c: k[c] for c in (*_KEYS, "dim")},
                    "n_tokens": k["n"],
                    "mean": k["mean"],
                    "std": moments.std,
                    "skewness": pa.array(moments.skewness, mask=constant),
                    "kurtosis": pa.array(moments.excess_kurtosis, mask=constant),
                },
            )
        hist = pa.concat_tables(partials["sparsity_histograms"])
        keys = ["family", "quantity", "layer", "bin", "bin_lo", "bin_hi"]
        hist = (
            hist.group_by(keys)
            .aggregate([("count", "sum")])
            .sort_by([(c, "ascending") for c in keys[:4]])
        )
        out["sparsity_histograms"] = _final(
            self,
            "sparsity_histograms",
            run_id,
            {**{c: hist.column(c) for c in keys}, "count": hist.column("count_sum")},
        )
        return out


def _matrix(inputs: ShardInputs, family: str, layer: int) -> np.ndarray:
    """[tokens, width] float32 values of one layer of a family in this shard."""
    import pyarrow.compute as pc

    table = inputs.activations.get(family)
    if table is None:
        raise ToolError(f"sparsity_analyzer: shard {inputs.shard} has no {family} table")
    table = table.filter(pc.equal(table.column("layer"), layer))
    if table.num_rows == 0:
        raise ToolError(
            f"sparsity_analyzer: shard {inputs.shard} of run {inputs.run_id} has no "
            f"{family} rows for layer {layer}"
        )
    dims = [c for c in table.column_names if c.startswith("d") and c[1:].isdigit()]
    return np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in dims])


def _moments(x: np.ndarray, order: int) -> dict[str, np.ndarray]:
    """Per column: n, min, max, mean and central sums m2..m{order}, in float64."""
    stats = Moments.of(x, order=order).to_arrays()
    if x.shape[0] == 0:  # e.g. no token with a defined Gini in this shard
        return {**stats, "min": np.full(x.shape[1], np.nan), "max": np.full(x.shape[1], np.nan)}
    return {**stats, "min": x.min(0).astype(np.float64), "max": x.max(0).astype(np.float64)}


def _merge(tables: list, columns: tuple[str, ...], prefixes: dict[str, int]) -> dict:
    """Merge partial tables over shards, grouped by (family, layer, *columns).

    ``prefixes`` maps a column prefix ("" or "l0_") to the moment order of its
    statistics; returns the group keys and, per prefix, n, mean, m2.., min and max, and
    the merged ``Moments`` as ``{prefix}moments``.
    """
    import pyarrow as pa

    table = pa.concat_tables(tables)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    names = [*_KEYS, *columns]
    keys = np.rec.fromarrays(
        [cols[c].astype(str) if c == "family" else cols[c] for c in names], names=names
    )
    unique, group = np.unique(keys, return_inverse=True)
    group = group.ravel()
    out = {c: unique[c] for c in names}
    for prefix, order in prefixes.items():
        n = cols[f"{prefix}n"]
        merged = Moments.from_arrays(cols, prefix).merge_groups(group, len(unique))
        assert merged.order == order, (prefix, merged.order)
        out.update(merged.to_arrays(prefix))
        out[f"{prefix}moments"] = merged
        lo, hi = np.full(len(unique), np.inf), np.full(len(unique), -np.inf)
        np.minimum.at(lo, group, np.where(n > 0, cols[f"{prefix}min"], np.inf))
        np.maximum.at(hi, group, np.where(n > 0, cols[f"{prefix}max"], -np.inf))
        out[f"{prefix}min"], out[f"{prefix}max"] = lo, hi
    if "n_active" in cols:
        out["n_active"] = np.bincount(group, weights=cols["n_active"]).astype(np.int64)
    return out


def _layer_summary(tables: list, neurons: dict) -> dict:
    """Per-layer L0 and Gini summaries, plus the dead neurons of the merged neurons."""
    import pyarrow as pa

    s = _merge(tables, (), {"l0_": 2, "gini_": 2})
    # neurons come sorted by (family, layer, neuron): group ids line up with s's rows
    _, per_layer = np.unique(
        np.rec.fromarrays([neurons["family"], neurons["layer"]], names=list(_KEYS)),
        return_inverse=True,
    )
    dead = np.bincount(per_layer.ravel(), weights=neurons["n_active"] == 0).astype(np.int64)
    l0_std, gini_std = s["l0_moments"].std, s["gini_moments"].std
    undefined = s["gini_n"] == 0
    return {
        "family": s["family"],
        "layer": s["layer"],
        "n_tokens": s["l0_n"],
        "n_neurons": np.bincount(per_layer.ravel()),
        "dead_neurons": dead,
        "l0_mean": s["l0_mean"],
        "l0_std": l0_std,
        "l0_min": s["l0_min"].astype(np.int64),
        "l0_max": s["l0_max"].astype(np.int64),
        "gini_tokens": s["gini_n"],
        "gini_mean": pa.array(s["gini_mean"], mask=undefined),
        "gini_std": pa.array(gini_std, mask=undefined),
    }


def gini_index(x: np.ndarray) -> np.ndarray:
    """Gini index of each row's absolute values; NaN for an all-zero row.

    ``G = 1 - 2 sum_k (a_(k) / ||a||_1) (n - k + 1/2) / n`` over the row sorted ascending
    (k = 1..n): 0 when all entries are equal, ``1 - 1/n`` when one entry holds all.
    """
    a = np.sort(np.abs(x.astype(np.float64)), axis=1)
    n = a.shape[1]
    total = a.sum(1)
    weights = (n - np.arange(1, n + 1) + 0.5) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1.0 - 2.0 * (a @ weights) / total
    return np.where(total > 0, g, np.nan)


def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> dict[str, np.ndarray]:
    """Counts over ``bins`` equal bins of [lo, hi] plus [-inf, lo) and (hi, inf] (NaN dropped).

    Bins are half-open ``[edge_i, edge_i+1)`` except the last, which includes ``hi``
    (numpy's convention). Bin index -1 is the underflow, ``bins`` the overflow.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(flat, bins=edges)
    return {
        "bin": np.arange(-1, bins + 1),
        "bin_lo": np.concatenate([[-np.inf], edges[:-1], [hi]]),
        "bin_hi": np.concatenate([[lo], edges[1:], [np.inf]]),
        "count": np.concatenate([[(flat < lo).sum()], counts, [(flat > hi).sum()]]).astype(
            np.int64
        ),
    }


def _table(rows: list[dict]):
    """One partial table from dicts of per-row arrays and broadcast scalars."""
    import pyarrow as pa

    parts = []
    for row in rows:
        length = max(len(v) for v in row.values() if isinstance(v, np.ndarray | list))
        parts.append(
            pa.table(
                {
                    k: (np.asarray(v) if isinstance(v, np.ndarray | list) else np.full(length, v))
                    for k, v in row.items()
                }
            )
        )
    return pa.concat_tables(parts)


def _final(tool: Tool, output: str, run_id: str, columns: dict):
    """A result table in its schema's column order and types, with run_id first."""
    import pyarrow as pa

    schema = tool.result_schema(output)
    n = len(next(iter(columns.values())))
    arrays = [pa.array(np.full(n, run_id, dtype=object), pa.string())]
    for field in schema:
        if field.name == "run_id":
            continue
        value = columns[field.name]
        array = value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.array(value)
        arrays.append(array.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
