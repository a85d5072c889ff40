"""Neuron dashboards as tables: per-neuron statistics and top activating contexts.

For a dense hook family (``family``, default ``mlp_post``), or for the features of the
run's sparse autoencoder (``source: sae_features``, the results of
superposition_disentangler; neuron = feature id), every neuron of every chosen layer gets
what a feature dashboard shows (Bricken et al. 2023, "Towards Monosemanticity";
Neuronpedia): activation frequency (value > ``threshold``), mean, max, the 50th, 90th and
99th percentiles, and its ``k`` top activating tokens with ``window`` tokens each side.

Streaming, one shard per Ray task, then ``reduce``:

- frequency, mean and max come from exact sufficient statistics (counts, float64 sums,
  maxima), so they equal a direct computation over every value;
- percentiles come from a mergeable log-bucket histogram (the DDSketch mapping): a value
  ``x`` with ``|x| >= 1e-6`` falls in bucket ``sign(x) * ceil(log_g |x|)`` with
  ``g = (1 + a) / (1 - a)`` (``a = quantile_accuracy``, default 0.01); smaller values in
  one zero bucket. The q-th percentile is the order statistic ``x_(r)``,
  ``r = ceil(q n / 100)`` (numpy's ``inverted_cdf``); the estimate is the midpoint
  ``2 g^i / (g + 1)`` of that value's bucket, clamped to the exact [min, max], so
  ``|estimate - x_(r)| <= max(a |x_(r)|, 1e-6)``. Buckets merge by adding counts, so the
  bound holds for any number of shards, with memory bounded by the buckets in use;
- top contexts: each shard keeps its own top ``k`` per neuron (ties: lower seq_id, then
  lower pos first) with the context text, and ``reduce`` keeps the global top ``k`` by the
  same order. The context is the tokens from ``pos - window`` to ``pos + window`` of the
  sequence, the centre token in ``[brackets]`` and ``…`` where the sequence goes on; texts
  are concatenated when the vocabulary carries its own spaces (GPT-2 style ``" the"``),
  else joined with a space. It equals the catalog's ``context_window`` macro.

Rows are sorted by (layer, neuron[, rank]) and the integer keys carry Parquet statistics,
so ``WHERE layer = 4 AND neuron = 123`` lets DuckDB skip row groups of a large result.
The one reduce task holds every shard's candidates (shards x layers x neurons x k rows)
and bucket counts: on a very large run, summarise a few layers per call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from arrakis_ray import hooks
from arrakis_ray.errors import ToolError
from arrakis_ray.numerics import rank_within_groups
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import ShardInputs, Tool

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

ZERO = 1e-6  # |x| below this lands in the zero bucket (absolute error < 1e-6)
PERCENTILES = (50, 90, 99)
BLOCK_CELLS = 1 << 22  # neurons x buckets (or x tokens) handled at once: bounds memory
_SPACED = re.compile(r"^ \S")  # a token text that carries its own leading space


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
    """Tokens of context on each side of a top token."""
    threshold: float = 0.0
    """A neuron fires on a token when its activation is strictly above this."""
    quantile_accuracy: float = 0.01
    """Relative error bound a of the percentiles (see the module docstring)."""
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


class NeuronDashboard(Tool):
    """Per-neuron frequency, mean, max, percentiles and top-k contexts with their text."""

    name = "neuron_dashboard"
    summary = "per neuron: firing frequency, mean, max, p50/p90/p99, top-k contexts"
    reference = "Bricken et al. 2023, 'Towards Monosemanticity' (feature dashboards); Neuronpedia"
    Params = NeuronDashboardParams
    outputs = ("neuron_stats", "neuron_top_contexts")

    def __init__(self, params: NeuronDashboardParams):
        super().__init__(params)
        # SAE features are one run-wide result, read one shard's seq_id range at a time
        self.scope = "run" if params.source == "sae_features" else "shard"
        self.sketch = _Sketch(params.quantile_accuracy)

    def _layers(self, manifest: RunManifest) -> list[int]:
        return self.selected_layers(manifest, self.params.layers)

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        if self.params.source == "sae_features":
            return []
        family = self.params.family
        return [hooks.family_hook(family, layer) for layer in self._layers(manifest)]

    def compute_shard(self, inputs: ShardInputs, model=None) -> dict:
        """One shard's sufficient statistics and top-k candidates, per layer."""
        import pyarrow as pa
        import pyarrow.compute as pc

        family = self.params.family
        table = inputs.activations.get(family)
        if table is None:
            raise ToolError(f"{self.name}: shard {inputs.shard} has no {family} table")
        contexts = _Contexts(inputs.tokens, inputs.vocab, self.params.window)
        stats, tops = [], []
        for layer in self._layers(inputs.manifest):
            rows = table.filter(pc.equal(table["layer"], layer))
            if rows.num_rows == 0:
                raise ToolError(
                    f"{self.name}: shard {inputs.shard} of run {inputs.run_id} has no "
                    f"{family} rows for layer {layer}"
                )
            rows = rows.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
            dims = [c for c in rows.column_names if c[0] == "d" and c[1:].isdigit()]
            x = np.column_stack([rows[c].to_numpy().astype(np.float32) for c in dims])
            keys = (rows["seq_id"].to_numpy(), rows["pos"].to_numpy())
            stat, top = self._dense(x, *keys, contexts)
            stats.append(_with_keys(stat, family, layer))
            tops.append(_with_keys(top, family, layer))
        return {
            "neuron_stats": pa.concat_tables(stats),
            "neuron_top_contexts": pa.concat_tables(tops),
        }

    def compute_run(self, inputs: RunReader, model=None) -> dict:
        """The SAE source: every shard's tokens with their feature activations, reduced."""
        hook, layer, n_features = _sae_metrics(inputs, self.name)
        family = f"sae:{hook}"
        stats, tops = [], []
        for shard in inputs.shards:
            tokens = inputs.tokens(shard).sort_by([("seq_id", "ascending"), ("pos", "ascending")])
            seq, pos = tokens["seq_id"].to_numpy(), tokens["pos"].to_numpy()
            row, feature, value = _sae_entries(inputs, seq, pos)
            contexts = _Contexts(tokens, inputs.vocab, self.params.window)
            stat, top = self._sparse(len(seq), n_features, row, feature, value, seq, pos, contexts)
            stats.append(_with_keys(stat, family, layer))
            tops.append(_with_keys(top, family, layer))
        if not stats:
            raise ToolError(f"{self.name}: run {inputs.run_id} has no completed shard")
        return self.reduce({"neuron_stats": stats, "neuron_top_contexts": tops}, inputs.manifest)

    # -- per shard ------------------------------------------------------------------

    def _dense(self, x: np.ndarray, seq, pos, contexts) -> tuple[dict, dict]:
        n, width = x.shape
        k, sk = min(self.params.k, n), self.sketch
        stat = {
            "neuron": np.arange(width),
            "n": np.full(width, n),
            "n_active": (x > self.params.threshold).sum(0),
            "sum": x.sum(0, dtype=np.float64),
            "min": x.min(0).astype(np.float64),
            "max": x.max(0).astype(np.float64),
        }
        # neuron blocks keep the bucket counts and tie scans within BLOCK_CELLS cells
        step = max(1, BLOCK_CELLS // max(sk.span, n))
        cells, top_rows, top_cols = [], [], []
        for lo in range(0, width, step):
            block = x[:, lo : lo + step]
            counts = np.bincount(
                (sk.codes(block) + sk.offset + sk.span * np.arange(block.shape[1])).ravel(),
                minlength=sk.span * block.shape[1],
            )
            (cell,) = np.nonzero(counts)
            cells.append((cell // sk.span + lo, cell % sk.span - sk.offset, counts[cell]))
            r, c = _top_rows(block, k)
            top_rows.append(r)
            top_cols.append(c + lo)
        neuron, code, count = (np.concatenate(parts) for parts in zip(*cells, strict=True))
        stat.update(_sketch_lists(neuron, code, count, width))
        rows, cols = np.concatenate(top_rows), np.concatenate(top_cols)
        return stat, _candidates(cols, rows, x[rows, cols], seq, pos, contexts)

    def _sparse(self, n, width, row, feature, value, seq, pos, contexts) -> tuple[dict, dict]:
        """Like ``_dense`` for a [n, width] matrix that is zero except at (row, feature)."""
        thr, sk = self.params.threshold, self.sketch
        nnz = np.bincount(feature, minlength=width)
        zeros = n - nnz  # absent entries are exact zeros
        hi = np.full(width, -np.inf)
        lo = np.full(width, np.inf)
        np.maximum.at(hi, feature, value)
        np.minimum.at(lo, feature, value)
        stat = {
            "neuron": np.arange(width),
            "n": np.full(width, n),
            "n_active": np.bincount(feature, weights=value > thr, minlength=width).astype(int)
            + (zeros if 0.0 > thr else 0),
            "sum": np.bincount(feature, weights=value.astype(np.float64), minlength=width),
            "min": np.where(zeros > 0, np.minimum(lo, 0.0), lo),
            "max": np.where(zeros > 0, np.maximum(hi, 0.0), hi),
        }
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
        stat.update(_sketch_lists(cell // sk.span, cell % sk.span - sk.offset, count, width))
        # top-k per feature among its nonzero tokens: value desc, then token order
        take, _ = rank_within_groups([feature], [-value, row], k=self.params.k)
        return stat, _candidates(feature[take], row[take], value[take], seq, pos, contexts)

    # -- reduce ---------------------------------------------------------------------

    def reduce(self, partials: dict, manifest: RunManifest, model=None) -> dict:
        """Merge every shard's statistics and candidates into the final tables."""
        import pyarrow as pa
        import pyarrow.compute as pc

        run_id, sk = manifest.run_id, self.sketch
        s = pa.concat_tables(partials["neuron_stats"])
        family = s["family"].to_numpy(zero_copy_only=False)
        layer, neuron = s["layer"].to_numpy(), s["neuron"].to_numpy()
        keys, group = np.unique(
            np.rec.fromarrays([family.astype(str), layer, neuron]), return_inverse=True
        )
        group, size = group.ravel(), len(keys)
        n = np.bincount(group, weights=s["n"].to_numpy(), minlength=size)
        lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
        np.minimum.at(lo, group, s["min"].to_numpy())
        np.maximum.at(hi, group, s["max"].to_numpy())
        lengths = pc.list_value_length(s["codes"]).to_numpy()
        cell = np.repeat(group, lengths) * sk.span + sk.offset
        cell += pc.list_flatten(s["codes"]).to_numpy()
        cells, inverse = np.unique(cell, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=pc.list_flatten(s["counts"]).to_numpy())
        columns = {
            "family": keys["f0"],
            "layer": keys["f1"],
            "neuron": keys["f2"],
            "freq": np.bincount(group, weights=s["n_active"].to_numpy(), minlength=size) / n,
            "mean": np.bincount(group, weights=s["sum"].to_numpy(), minlength=size) / n,
            "max": hi,
            **{
                f"p{q}": sk.quantile(cells // sk.span, cells % sk.span - sk.offset, counts, n, q)
                for q in PERCENTILES
            },
            "n_tokens": n.astype(np.int64),
        }
        for q in PERCENTILES:  # the true order statistic lies in [min, max]
            columns[f"p{q}"] = np.clip(columns[f"p{q}"], lo, hi)
        top = pa.concat_tables(partials["neuron_top_contexts"])
        col = {c: top[c].to_numpy(zero_copy_only=False) for c in top.column_names}
        rows, rank = rank_within_groups(
            [col["family"].astype(str), col["layer"], col["neuron"]],
            [-col["activation"], col["seq_id"], col["pos"]],
            k=self.params.k,
        )
        top = top.take(pa.array(rows)).append_column("rank", pa.array(rank))
        return {
            "neuron_stats": _final(self, "neuron_stats", run_id, columns),
            "neuron_top_contexts": _final(
                self, "neuron_top_contexts", run_id, {c: top[c] for c in top.column_names}
            ),
        }


class _Sketch:
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


class _Contexts:
    """Context text of a token: its window of the sequence, the centre in brackets."""

    def __init__(self, tokens, vocab, window: int):
        tokens = tokens.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        seq = tokens["seq_id"].to_numpy()
        self.texts = tokens["token_text"].to_pylist()
        first = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
        ends = np.r_[first[1:], len(seq)]
        self.spans = {int(seq[i]): (int(i), int(e)) for i, e in zip(first, ends, strict=True)}
        spaced = any(isinstance(v, str) and _SPACED.match(v) for v in vocab)
        self.sep = "" if spaced else " "
        self.window = window
        self._cache: dict[tuple[int, int], str] = {}

    def __call__(self, seq: int, pos: int) -> str:
        key = (seq, pos)
        if key not in self._cache:
            start, end = self.spans[seq]  # positions run 0..length-1 within a sequence
            lo, hi = max(0, pos - self.window), min(end - start - 1, pos + self.window)
            words = self.texts[start + lo : start + hi + 1]
            words[pos - lo] = f"[{words[pos - lo]}]"
            text = self.sep.join(words)
            left = "…" + self.sep if lo > 0 else ""
            right = self.sep + "…" if hi < end - start - 1 else ""
            self._cache[key] = left + text + right
        return self._cache[key]


def _top_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the k largest values of each column; ties: lower row first."""
    n = x.shape[0]
    kth = np.partition(x, n - k, axis=0)[n - k]  # k-th largest per column
    above = x > kth
    tie = x == kth
    need = k - above.sum(0)
    return np.nonzero(above | (tie & (np.cumsum(tie, axis=0) <= need)))


def _candidates(neuron, row, value, seq, pos, contexts) -> dict:
    import pyarrow as pa

    return {
        "neuron": neuron,
        "seq_id": seq[row],
        "pos": pos[row],
        "activation": value.astype(np.float32),
        "context": pa.array(
            [contexts(int(s), int(p)) for s, p in zip(seq[row], pos[row], strict=True)],
            pa.string(),
        ),
    }


def _sketch_lists(neuron, code, count, width: int) -> dict:
    """Per-neuron list columns of (code, count), from cells sorted by (neuron, code)."""
    import pyarrow as pa

    offsets = np.r_[0, np.cumsum(np.bincount(neuron, minlength=width))].astype(np.int32)
    return {
        "codes": pa.ListArray.from_arrays(offsets, pa.array(code.astype(np.int32))),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(count.astype(np.int64))),
    }


def _with_keys(columns: dict, family: str, layer: int):
    import pyarrow as pa

    n = len(columns["neuron"])
    keys = {"family": pa.array([family] * n, pa.string()), "layer": np.full(n, layer, np.int16)}
    return pa.table({**keys, **columns})


def _sae_metrics(inputs: RunReader, tool: str) -> tuple[str, int, int]:
    """(hook, layer, n_features) of the run's sparse autoencoder."""
    if not all(inputs.has_result(name) for name in ("sae_metrics", "sae_features")):
        raise ToolError(
            f"{tool}: run {inputs.run_id} has no sae_features results; "
            "run superposition_disentangler first"
        )
    metrics = inputs.result("sae_metrics").to_pylist()
    if len(metrics) != 1:
        raise ToolError(f"{tool}: run {inputs.run_id} has {len(metrics)} SAEs; expected one")
    m = metrics[0]
    return m["hook"], m["layer"], m["n_features"]


def _sae_entries(inputs: RunReader, seq: np.ndarray, pos: np.ndarray):
    """(token row, feature, value) of the SAE activations of the tokens (seq, pos),
    which are sorted by (seq, pos)."""
    if len(seq) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    # only this shard's seq_id range is read (pushdown), never the whole run's table
    table = inputs.result(
        "sae_features",
        columns=["seq_id", "pos", "feature", "activation"],
        filters=[("seq_id", ">=", int(seq.min())), ("seq_id", "<=", int(seq.max()))],
    )
    # tokens are sorted by (seq, pos): a token's row is the rank of its combined key
    key = seq.astype(np.int64) * (int(pos.max()) + 1) + pos
    got_pos = table["pos"].to_numpy()
    got = table["seq_id"].to_numpy().astype(np.int64) * (int(pos.max()) + 1) + got_pos
    row = np.searchsorted(key, got)
    ok = (row < len(key)) & (key[np.minimum(row, len(key) - 1)] == got)
    ok &= got_pos <= pos.max()  # a larger pos could alias another token's key
    feature = table["feature"].to_numpy().astype(np.int64)
    return row[ok], feature[ok], table["activation"].to_numpy()[ok].astype(np.float32)


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
