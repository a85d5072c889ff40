"""Neuron dashboards as tables: what a Neuronpedia-style feature page shows, per neuron.

For a dense hook family (``family``, default ``mlp_post``), or for the features of the
run's sparse autoencoder (``source: sae_features``, the results of
superposition_disentangler; neuron = feature id), every neuron of every chosen layer gets
what a feature dashboard shows (Bricken et al. 2023, "Towards Monosemanticity";
Neuronpedia), as five tables:

- ``neuron_stats``: density (activation > ``threshold``), mean, max and the 50th, 90th
  and 99th percentiles (exact moments; percentiles within a stated relative error:
  ``neuron_sketch.py``);
- ``neuron_top_contexts``: its ``k`` top activating tokens with ``window`` tokens each
  side, the centre in [brackets] (``neuron_contexts.py``);
- ``neuron_quantile_contexts``: a uniform sample of ``samples`` of its ACTIVE tokens,
  drawn by a hash of (seq_id, pos, layer, neuron) (bottom-k sampling), split by
  activation into ``intervals`` equal-count intervals (``neuron_contexts.py``);
- ``neuron_histograms``: its activation histogram, exact counts in about ``bins``
  equal-width bins whose edges are multiples of a power of two (``neuron_histograms.py``
  says why and how close to [min, max]);
- ``neuron_logit_effects``: the ``logit_k`` tokens it promotes and suppresses directly,
  ``C_V((gamma * P w) @ W_U)`` for the direction ``w`` it writes: ``W_out`` rows for
  mlp_post, basis vectors for residual-stream families, decoder rows for SAE features
  (``neuron_logit_effects.py``; mlp_pre gets none).

Streaming, one shard per Ray task, then ``reduce``: every shard returns sufficient
statistics, sketch buckets, histogram cells and its own top-k and bottom-k-by-hash
candidates; ``reduce`` merges them exactly (the result does not depend on the sharding)
and computes the logit effects from the model's weights (only the reduce task loads
the model; ``logit_k: 0`` skips it). The SAE source is one run-scope task doing the same
shard by shard.

Rows are sorted by (family, layer, neuron, ...) and the integer keys carry Parquet
statistics, so a feature page's ``WHERE layer = 4 AND neuron = 123`` lets DuckDB skip row
groups of a large result. The one reduce task holds every shard's candidates
(shards x layers x neurons x (k + samples) rows), buckets and cells: on a very large
run, summarise a few layers per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from arrakis_ray import hooks
from arrakis_ray.errors import ToolError
from arrakis_ray.numerics import rank_within_groups
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools import neuron_contexts as ctx
from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.neuron_histograms import (
    cells_per_neuron,
    dense_cells,
    merge_histograms,
    sparse_cells,
)
from arrakis_ray.tools.neuron_logit_effects import top_effects
from arrakis_ray.tools.neuron_sae import sae_directions, sae_entries, sae_metrics
from arrakis_ray.tools.neuron_sketch import QuantileSketch, merge_stats, sketch_lists

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

BLOCK_CELLS = 1 << 22  # neurons x buckets (or x tokens) handled at once: bounds memory
PARTIALS = ("neuron_stats", "neuron_top_contexts", "neuron_quantile_contexts", "neuron_histograms")


@dataclass(frozen=True)
class NeuronDashboardParams:
    """Parameters of the neuron dashboard."""

    family: str = "mlp_post"
    """Dense hook family whose neurons (columns d<i>) are summarised."""
    layers: tuple[int, ...] = ()
    """Layers to summarise; empty = every layer (ignored for sae_features)."""
    k: int = 20
    """Top activating contexts kept per neuron."""
    window: int = 8
    """Tokens of context on each side of a top or sampled token."""
    threshold: float = 0.0
    """A neuron fires on a token when its activation is strictly above this."""
    quantile_accuracy: float = 0.01
    """Relative error bound a of the percentiles (see neuron_sketch.py)."""
    samples: int = 60
    """Active tokens sampled per neuron (uniformly, by hash) for the quantile contexts."""
    intervals: int = 6
    """Equal-count activation intervals the sample is split into (0 = lowest)."""
    bins: int = 40
    """Histogram bins per neuron (at least 32/33 of this; see neuron_histograms.py)."""
    logit_k: int = 10
    """Promoted and suppressed tokens per neuron; 0 = no logit effects (no model load)."""
    source: Literal["activations", "sae_features"] = "activations"
    """activations: the stored family; sae_features: the run's SAE features (neuron =
    feature id), from superposition_disentangler's results."""

    def __post_init__(self) -> None:
        if self.family not in hooks.DENSE_BLOCK_FAMILIES:
            raise ValueError(
                f"family {self.family!r} is not one of {', '.join(hooks.DENSE_BLOCK_FAMILIES)}"
            )
        if self.k < 1 or self.window < 0:
            raise ValueError(f"k must be >= 1 and window >= 0, got k={self.k}, {self.window=}")
        if not 0 < self.quantile_accuracy < 0.5:
            raise ValueError(f"quantile_accuracy must be in (0, 0.5), got {self.quantile_accuracy}")
        if not 1 <= self.intervals <= self.samples:
            raise ValueError(
                f"need 1 <= intervals <= samples, got {self.intervals=}, {self.samples=}"
            )
        if self.bins < 1 or self.logit_k < 0:
            raise ValueError(
                f"bins must be >= 1 and logit_k >= 0, got {self.bins=}, {self.logit_k=}"
            )
        if self.source == "sae_features" and self.threshold < 0:
            raise ValueError(
                f"threshold {self.threshold} < 0 with source sae_features: SAE features "
                "are >= 0, so every token would be active"
            )


class NeuronDashboard(Tool):
    """Feature-page tables per neuron: stats, top and quantile contexts, histogram, logits."""

    name = "neuron_dashboard"
    summary = (
        "per neuron: density, mean, max, p50/p90/p99, top-k and activation-quantile "
        "contexts, histogram, promoted/suppressed tokens"
    )
    reference = "Bricken et al. 2023, 'Towards Monosemanticity' (feature dashboards); Neuronpedia"
    Params = NeuronDashboardParams
    outputs = (*PARTIALS, "neuron_logit_effects")

    def __init__(self, params: NeuronDashboardParams):
        super().__init__(params)
        sae = params.source == "sae_features"
        # SAE features are one run-wide result, read one shard's seq_id range at a time
        self.scope = "run" if sae else "shard"
        # the weights are read once: by the reduce task, or by the one SAE task
        self.reduce_needs_weights = params.logit_k > 0 and not sae
        self.needs_weights = params.logit_k > 0 and sae
        self.sketch = QuantileSketch(params.quantile_accuracy)

    def _layers(self, manifest: RunManifest) -> list[int]:
        return self.selected_layers(manifest, self.params.layers)

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        if self.params.source == "sae_features":
            return []
        family = self.params.family
        return [hooks.family_hook(family, layer) for layer in self._layers(manifest)]

    def compute_shard(self, inputs: ShardInputs, model=None) -> dict:
        """One shard's partials (statistics, buckets, cells, candidates), per layer."""
        import pyarrow as pa
        import pyarrow.compute as pc

        family = self.params.family
        table = inputs.activations.get(family)
        if table is None:
            raise ToolError(f"{self.name}: shard {inputs.shard} has no {family} table")
        contexts = ctx.ContextText(inputs.tokens, inputs.vocab, self.params.window)
        parts: dict[str, list] = {name: [] for name in PARTIALS}
        for layer in self._layers(inputs.manifest):
            rows = table.filter(pc.equal(table["layer"], layer))
            where = f"{self.name}: shard {inputs.shard} of run {inputs.run_id}, layer {layer}"
            if rows.num_rows == 0:
                raise ToolError(f"{where}: no {family} rows")
            rows = rows.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
            dims = [c for c in rows.column_names if c[0] == "d" and c[1:].isdigit()]
            x = np.column_stack([rows[c].to_numpy().astype(np.float32) for c in dims])
            keys = (rows["seq_id"].to_numpy(), rows["pos"].to_numpy())
            partial = self._dense(x, *keys, layer, contexts, where)
            for name, part in zip(PARTIALS, partial, strict=True):
                parts[name].append(_with_keys(part, family, layer))
        return {name: pa.concat_tables(tables) for name, tables in parts.items()}

    def compute_run(self, inputs: RunReader, model=None) -> dict:
        """The SAE source: every shard's tokens with their feature activations, reduced,
        and the features' logit effects from their decoder directions."""
        hook, layer, n_features = sae_metrics(inputs, self.name)
        family = f"sae:{hook}"
        parts: dict[str, list] = {name: [] for name in PARTIALS}
        for shard in inputs.shards:
            tokens = inputs.tokens(shard).sort_by([("seq_id", "ascending"), ("pos", "ascending")])
            seq, pos = tokens["seq_id"].to_numpy(), tokens["pos"].to_numpy()
            if len(seq) == 0:
                continue
            row, feature, value = sae_entries(inputs, seq, pos)
            contexts = ctx.ContextText(tokens, inputs.vocab, self.params.window)
            where = f"{self.name}: shard {shard} of run {inputs.run_id}, {family}"
            partial = self._sparse(
                len(seq), n_features, row, feature, value, seq, pos, layer, contexts, where
            )
            for name, part in zip(PARTIALS, partial, strict=True):
                parts[name].append(_with_keys(part, family, layer))
        if not parts["neuron_stats"]:
            raise ToolError(f"{self.name}: run {inputs.run_id} has no completed shard")
        tables = self._merge(parts, inputs.run_id)
        units = []
        if self.params.logit_k > 0:
            vectors = sae_directions(inputs, hook, n_features, self.name)
            units = [(hooks.hook_family(hook), layer, vectors, family)]
        tables["neuron_logit_effects"] = self._logit_effects(
            model, inputs.run_id, units, inputs.vocab
        )
        return tables

    # -- per shard ------------------------------------------------------------------

    def _dense(self, x: np.ndarray, seq, pos, layer: int, contexts, where: str) -> tuple:
        """Partials of one layer's [tokens, neurons] values (rows in (seq, pos) order)."""
        p, sk = self.params, self.sketch
        n, width = x.shape
        active = x > p.threshold
        stat = {
            "neuron": np.arange(width),
            "n": np.full(width, n),
            "n_active": active.sum(0),
            "sum": x.sum(0, dtype=np.float64),
            "min": x.min(0).astype(np.float64),
            "max": x.max(0).astype(np.float64),
        }
        hist = dense_cells(x, stat["min"], stat["max"], p.bins, where)
        # neuron blocks keep the bucket counts, hashes and tie scans within BLOCK_CELLS
        step = max(1, BLOCK_CELLS // max(sk.span, cells_per_neuron(p.bins), n))
        cells, tops, picks = [], [], []
        for lo in range(0, width, step):
            block = x[:, lo : lo + step]
            counts = np.bincount(
                (sk.codes(block) + sk.offset + sk.span * np.arange(block.shape[1])).ravel(),
                minlength=sk.span * block.shape[1],
            )
            (cell,) = np.nonzero(counts)
            cells.append((cell // sk.span + lo, cell % sk.span - sk.offset, counts[cell]))
            r, c = ctx.top_rows(block, min(p.k, n))
            tops.append((r, c + lo))
            neurons = np.arange(lo, lo + block.shape[1])
            priority = ctx.sample_hash(seq[:, None], pos[:, None], layer, neurons[None, :])
            r, c = ctx.sample_rows(active[:, lo : lo + step], priority, p.samples)
            picks.append((r, c + lo, priority[r, c]))
        neuron, code, count = (np.concatenate(parts) for parts in zip(*cells, strict=True))
        stat.update(sketch_lists(neuron, code, count, width))
        rows, cols = (np.concatenate(parts) for parts in zip(*tops, strict=True))
        top = ctx.candidates(cols, rows, x[rows, cols], seq, pos, contexts)
        rows, cols, prio = (np.concatenate(parts) for parts in zip(*picks, strict=True))
        sample = ctx.candidates(cols, rows, x[rows, cols], seq, pos, contexts, prio)
        return stat, top, sample, hist

    def _sparse(self, n, width, row, feature, value, seq, pos, layer, contexts, where) -> tuple:
        """Like ``_dense`` for a [n, width] matrix that is zero except at (row, feature)."""
        p, sk = self.params, self.sketch
        nnz = np.bincount(feature, minlength=width)
        zeros = n - nnz  # absent entries are exact zeros
        hi = np.full(width, -np.inf)
        lo = np.full(width, np.inf)
        np.maximum.at(hi, feature, value)
        np.minimum.at(lo, feature, value)
        active = value > p.threshold  # threshold >= 0: the zeros are never active
        stat = {
            "neuron": np.arange(width),
            "n": np.full(width, n),
            "n_active": np.bincount(feature, weights=active, minlength=width).astype(int),
            "sum": np.bincount(feature, weights=value.astype(np.float64), minlength=width),
            "min": np.where(zeros > 0, np.minimum(lo, 0.0), lo),
            "max": np.where(zeros > 0, np.maximum(hi, 0.0), hi),
        }
        hist = sparse_cells(feature, value, zeros, stat["min"], stat["max"], p.bins, where)
        key = np.concatenate(
            [
                feature * sk.span + sk.codes(value) + sk.offset,
                np.arange(width) * sk.span + sk.offset,
            ]
        )
        cell, inverse = np.unique(key, return_inverse=True)
        count = np.bincount(
            inverse.ravel(), weights=np.concatenate([np.ones(len(key) - width), zeros])
        )
        keep = count > 0
        cell, count = cell[keep], count[keep].astype(np.int64)
        stat.update(sketch_lists(cell // sk.span, cell % sk.span - sk.offset, count, width))
        # top-k per feature among its nonzero tokens: value desc, then token order
        take, _ = rank_within_groups([feature], [-value, row], k=p.k)
        top = ctx.candidates(feature[take], row[take], value[take], seq, pos, contexts)
        # the quantile sample among its active tokens: priority, then token order
        (on,) = np.nonzero(active)
        prio = ctx.sample_hash(seq[row[on]], pos[row[on]], layer, feature[on])
        pick, _ = rank_within_groups([feature[on]], [prio, row[on]], k=p.samples)
        on = on[pick]
        sample = ctx.candidates(feature[on], row[on], value[on], seq, pos, contexts, prio[pick])
        return stat, top, sample, hist

    # -- reduce ---------------------------------------------------------------------

    def reduce(self, partials: dict, manifest: RunManifest, model=None) -> dict:
        """Merge every shard's partials into the final tables; add the logit effects."""
        tables = self._merge(partials, manifest.run_id)
        family = self.params.family
        units = [(family, layer, None, None) for layer in self._layers(manifest)]
        tables["neuron_logit_effects"] = self._logit_effects(model, manifest.run_id, units)
        return tables

    def _merge(self, partials: dict, run_id: str) -> dict:
        import pyarrow as pa

        p = self.params
        stats = merge_stats(pa.concat_tables(partials["neuron_stats"]), self.sketch)
        top = ctx.merge_top(pa.concat_tables(partials["neuron_top_contexts"]), p.k)
        quantiles = ctx.merge_quantiles(
            pa.concat_tables(partials["neuron_quantile_contexts"]), p.samples, p.intervals
        )
        histograms = merge_histograms(pa.concat_tables(partials["neuron_histograms"]), p.bins)
        return {
            "neuron_stats": _final(self, "neuron_stats", run_id, stats),
            "neuron_top_contexts": _final(
                self, "neuron_top_contexts", run_id, {c: top[c] for c in top.column_names}
            ),
            "neuron_quantile_contexts": _final(self, "neuron_quantile_contexts", run_id, quantiles),
            "neuron_histograms": _final(self, "neuron_histograms", run_id, histograms),
        }

    def _logit_effects(self, model, run_id: str, units: list[tuple], vocab=None):
        """The ``neuron_logit_effects`` table of ``units``: (family, layer, vectors,
        label) per layer; empty with logit_k 0 or a family without a path to the logits."""
        import pyarrow as pa

        empty = self.result_schema("neuron_logit_effects").empty_table()
        if self.params.logit_k == 0:
            return empty
        if model is None:
            raise ToolError(
                f"{self.name}: neuron_logit_effects needs the model's weights; "
                "pass the model, or logit_k: 0"
            )
        tables = []
        for family, layer, vectors, label in units:
            columns = top_effects(model, family, layer, self.params.logit_k, vocab, vectors, label)
            if columns is None:
                return empty
            tables.append(_final(self, "neuron_logit_effects", run_id, columns))
        return pa.concat_tables(tables) if tables else empty


def _with_keys(columns: dict, family: str, layer: int):
    import pyarrow as pa

    n = len(columns["neuron"])
    keys = {"family": pa.array([family] * n, pa.string()), "layer": np.full(n, layer, np.int16)}
    return pa.table({**keys, **columns})


def _final(tool: Tool, output: str, run_id: str, columns: dict):
    """A result table in its schema's column order and types, run_id first."""
    import pyarrow as pa

    schema = tool.result_schema(output)
    n = len(next(iter(columns.values())))
    arrays = [pa.array([run_id] * n, pa.string())]
    for field in list(schema)[1:]:
        value = columns[field.name]
        array = value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.array(value)
        arrays.append(array.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
