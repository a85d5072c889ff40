"""Residual tools: how long the residual stream is, and how much each block moves it.

The states are the stream after each block (``blocks.L.hook_resid_post``, layer L) and,
when the run harvested ``blocks.0.hook_resid_pre``, the embeddings before block 0
(layer -1), the logit lens' numbering. Per token and layer: the L2 norm, the relative
movement ``|r_L - r_{L-1}| / |r_{L-1}|`` (what block L added, relative to what it read)
and the cosine between ``r_L`` and ``r_{L-1}``. Output ``residual_tokens`` holds those
rows; ``residual_layers`` their mean and (sample) standard deviation per layer over the
whole run, combined from per-shard partial moments (``arrakis_ray.numerics.Moments``:
count, mean and central M2 per metric) by ``reduce``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.hooks import family_hook
from arrakis_ray.numerics import Moments
from arrakis_ray.tools.base import NoParams, ShardInputs, Tool
from arrakis_ray.tools.decompose import RowIndex, dense_matrix, sorted_tokens

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

METRICS = ("norm", "movement", "cosine")


class ResidualTools(Tool):
    """Residual norm, relative movement and cosine between consecutive layers."""

    name = "residual_tools"
    summary = "per token and layer: residual norm, relative movement and cosine to the layer before"
    Params = NoParams
    outputs = ("residual_tokens", "residual_layers")
    reduced_outputs = ("residual_layers",)  # per-token rows are written shard by shard

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [family_hook(family, layer) for family, layer in _states(manifest)]

    def compute_shard(self, inputs: ShardInputs, model) -> dict:
        import pyarrow as pa

        seq, pos, _ = sorted_tokens(inputs.tokens)
        index = RowIndex(seq, pos, inputs.shard)
        n = len(seq)
        parts, moments = [], []
        previous = None
        for family, layer in _states(inputs.manifest):
            current = dense_matrix(inputs, family, layer, index).astype(np.float64)
            norm = np.linalg.norm(current, axis=1)
            if previous is None:
                movement = cosine = None
            else:
                prev_norm = np.linalg.norm(previous, axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    movement = np.linalg.norm(current - previous, axis=1) / prev_norm
                    cosine = np.einsum("nd,nd->n", current, previous) / (norm * prev_norm)
            row_layer = -1 if family == "resid_pre" else layer
            nulls = np.full(n, previous is None)
            parts.append(
                pa.Table.from_arrays(
                    [
                        pa.array(np.full(n, inputs.run_id, dtype=object), pa.string()),
                        pa.array(seq.astype(np.int64)),
                        pa.array(pos.astype(np.int32)),
                        pa.array(np.full(n, row_layer, np.int16)),
                        pa.array(norm.astype(np.float32)),
                        pa.array(_or_zeros(movement, n), mask=nulls),
                        pa.array(_or_zeros(cosine, n), mask=nulls),
                    ],
                    schema=self.result_schema("residual_tokens"),
                )
            )
            moments.append(_moments(row_layer, norm, movement, cosine))
            previous = current
        return {
            "residual_tokens": pa.concat_tables(parts),
            "residual_layers": pa.Table.from_pylist(moments),
        }

    def reduce(self, partials: dict, manifest: RunManifest, model=None) -> dict:
        """Combine per-shard moments into per-layer mean and standard deviation."""
        import pyarrow as pa

        rows = [r for table in partials["residual_layers"] for r in table.to_pylist()]
        out = []
        for layer in sorted({r["layer"] for r in rows}):
            mine = [r for r in rows if r["layer"] == layer]
            row = {
                "run_id": manifest.run_id,
                "layer": layer,
                "n_tokens": sum(r["n"] for r in mine),
            }
            for metric in METRICS:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                    [r for r in mine if r[f"{metric}_mean"] is not None], metric
                )
            out.append(row)
        return {
            "residual_layers": pa.Table.from_pylist(
                out, schema=self.result_schema("residual_layers")
            )
        }


def _states(manifest: RunManifest) -> list[tuple[str, int]]:
    """(family, layer) of the residual states, in order: the embeddings (resid_pre 0)
    first when the run harvested them, then every block's resid_post."""
    states = [("resid_post", layer) for layer in range(manifest.shape.n_layers)]
    if family_hook("resid_pre", 0) in manifest.hooks:
        states.insert(0, ("resid_pre", 0))
    return states


def _or_zeros(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, np.float32) if values is None else values.astype(np.float32)


def _moments(layer: int, norm, movement, cosine) -> dict:
    """Count, mean and sum of squared deviations (M2) of each metric for one layer."""
    row: dict = {"layer": layer, "n": len(norm)}
    for metric, values in zip(METRICS, (norm, movement, cosine), strict=True):
        if values is None or not len(values):
            row[f"{metric}_mean"] = row[f"{metric}_m2"] = None
        else:
            moments = Moments.of(values, order=2)
            row[f"{metric}_mean"], row[f"{metric}_m2"] = float(moments.mean), float(moments.m2)
    return row


def _mean_std(rows: list[dict], metric: str) -> tuple[float | None, float | None]:
    """(mean, sample std) of one metric from per-shard partial rows (None when undefined)."""
    if not rows:
        return None, None
    total = Moments.merge_all(
        Moments.from_arrays({"n": r["n"], "mean": r[f"{metric}_mean"], "m2": r[f"{metric}_m2"]})
        for r in rows
    )
    if not total.n:
        return None, None
    return float(total.mean), (float(np.sqrt(total.sample_variance)) if total.n > 1 else None)
