"""Superposition disentangler: a sparse autoencoder (dictionary learning) on one hook.

A standard SAE (Bricken et al. 2023; TopK variant after Gao et al. 2024) is trained on
the stored activations of ONE hook point, streamed shard by shard:

    f = act(W_enc^T (x - b_dec) + b_enc)        act = ReLU ("l1") or ReLU(TopK) ("topk")
    x_hat = W_dec^T f + b_dec                   every row of W_dec (a feature's
                                                decoder direction) has unit norm

Loss per token: ``||x - x_hat||^2`` (+ ``l1_coeff * sum(f)`` for "l1"; with unit-norm
decoder rows the L1 of ``f`` is the L1 of the feature contributions). Before every
Adam step the gradient component parallel to each decoder row is removed, and the
rows are renormalised after it. ``b_dec`` starts at the data mean and ``W_enc`` at
``W_dec^T`` (Gao et al.).

Training sees the inputs scaled by one constant ``s`` so that the mean squared
distance to the mean is ``width``: ``lr`` and ``l1_coeff`` then mean the same on every
hook whatever its norm. ReLU and TopK commute with a positive scale, so dividing the
trained biases by ``s`` gives the same SAE in the stored units: feature activations,
reconstructions and the saved weights are all in the hook's own units.

Memory: one shard in memory at a time. An epoch visits the shards in a seeded random
order and shuffles rows within each shard. A first pass gathers the mean and total
variance; a last pass (fixed order) computes the feature activations and the metrics.
The sparse feature table (n_tokens x L0 rows) is returned whole to the runner, which
writes a run-scope result as one file.

Outputs:
- ``sae_metrics``: one row (hook, kind, sizes, MSE, fraction of variance explained,
  L0, dead features).
- ``sae_features``: sparse feature activations, one row per (seq_id, pos, feature)
  with a nonzero activation; joins ``tokens`` on (run_id, seq_id, pos).
- ``sae_directions``: decoder directions in long form (feature, dim, value): ``dim``
  i is activation column ``d{i}``. Rebuild a vector in SQL with
  ``list(value ORDER BY dim)``.
The trained weights are also saved as the run's artifact ``results/
superposition_disentangler/<call>/<hook>.safetensors`` (W_enc [d, m], b_enc [m], W_dec
[m, d], b_dec [d]); ``sae_metrics.weights_path`` is its path relative to the run
directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from arrakis_ray import hooks
from arrakis_ray.errors import ToolError
from arrakis_ray.numerics import Moments
from arrakis_ray.store.reader import RunReader, dim_columns, layer_matrix
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 4096  # tokens encoded at once in the final pass: bounds the dense codes


@dataclass(frozen=True)
class SAEParams:
    """Parameters of the sparse autoencoder."""

    hook: str
    """Hook whose activations are decomposed (blocks.2.hook_resid_post, blocks.1.mlp.hook_post)."""
    n_features: int | None = None
    """Dictionary size (number of features); default 4 x the hook's width."""
    kind: Literal["topk", "l1"] = "topk"
    """"topk": keep the k largest pre-activations; "l1": ReLU with an L1 penalty."""
    k: int = 32
    """Active features per token for kind "topk"."""
    l1_coeff: float = 1.0
    """L1 penalty weight for kind "l1", on inputs scaled to mean squared norm = width."""
    epochs: int = 10
    """Passes over the stored activations."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 256
    """Tokens per optimisation step."""
    seed: int = 0
    """Seeds the initialisation, the shard order of each epoch and the row shuffles."""

    def __post_init__(self) -> None:
        spec = hooks.spec_of(self.hook)  # unknown hook names fail here
        if spec.kind != "dense":
            raise ValueError(f"hook {self.hook!r}: only dense hooks (one vector per token)")
        for name in ("k", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.n_features is not None and self.n_features < 1:
            raise ValueError("n_features must be at least 1")
        if self.lr <= 0 or self.l1_coeff < 0:
            raise ValueError("lr must be > 0 and l1_coeff >= 0")


class SuperpositionDisentangler(Tool):
    """A sparse autoencoder trained on one hook's stored activations."""

    name = "superposition_disentangler"
    summary = "sparse autoencoder (TopK or L1) on one hook: features, directions, metrics"
    reference = (
        "Bricken et al. 2023, 'Towards Monosemanticity'; Gao et al. 2024, "
        "'Scaling and evaluating sparse autoencoders' (TopK)"
    )
    Params = SAEParams
    scope = "run"
    outputs = ("sae_metrics", "sae_features", "sae_directions")

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [self.params.hook]

    def compute_run(self, inputs: RunReader, model) -> dict:
        p = self.params
        started = time.perf_counter()
        family = hooks.hook_family(p.hook)
        layer = hooks.hook_layer(p.hook, inputs.shape.n_layers)
        stream = _LayerStream(inputs, family, layer)
        n, mean, total_var = stream.moments()
        width = len(mean)
        m = p.n_features or 4 * width
        if p.kind == "topk" and p.k > m:
            raise ToolError(f"{self.name}: k={p.k} exceeds n_features={m}")
        log.info("%s: %s, %d tokens, width %d -> %d features", self.name, p.hook, n, width, m)

        scale = float(np.sqrt(n * width / total_var)) if total_var > 0 else 1.0
        weights, train_loss = _train(stream, p, m, mean, scale)
        final = _final_pass(stream, weights, p, self.result_schema("sae_features"))
        weights_path = _save_weights(inputs, p, weights)

        sse, l0_sum, counts = final["sse"], final["active"], final["counts"]
        metrics = {
            "run_id": inputs.run_id,
            "hook": p.hook,
            "layer": layer,
            "kind": p.kind,
            "width": width,
            "n_features": m,
            "k": p.k if p.kind == "topk" else None,
            "l1_coeff": p.l1_coeff if p.kind == "l1" else None,
            "epochs": p.epochs,
            "n_tokens": n,
            "mse": sse / (n * width),
            "fraction_of_variance_explained": 1.0 - sse / total_var if total_var > 0 else None,
            "l0": l0_sum / n,
            "dead_features": int((counts == 0).sum()),
            "train_loss": train_loss,
            "weights_path": weights_path,
            "seconds": time.perf_counter() - started,
        }
        return {
            "sae_metrics": _table(
                self.result_schema("sae_metrics"), {k: [v] for k, v in metrics.items()}
            ),
            "sae_features": final["features"],
            "sae_directions": _directions(
                self.result_schema("sae_directions"), inputs.run_id, p.hook, weights
            ),
        }


class _LayerStream:
    """One layer of one hook family, read one shard at a time (through the RunReader,
    which opens only the file part holding the layer in a layer-staged run)."""

    def __init__(self, inputs: RunReader, family: str, layer: int):
        if not inputs.shards:
            raise ToolError(f"run {inputs.run_id}: no completed shard to train on")
        self.inputs, self.family, self.layer = inputs, family, layer
        first = inputs.activations(family, inputs.shards[0], layer=layer)
        self.columns = ["layer", "seq_id", "pos", *dim_columns(first.column_names)]

    def read(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = self.inputs.activations(self.family, shard, self.columns, layer=self.layer)
        return layer_matrix(table, self.layer)

    def moments(self) -> tuple[int, np.ndarray, float]:
        """(tokens, mean vector, total sum of squared deviations from the mean)."""
        moments = Moments.merge_all(
            Moments.of(self.read(shard)[2], order=2) for shard in self.inputs.shards
        )
        n = int(moments.n)
        if n == 0:
            raise ToolError(
                f"run {self.inputs.run_id}: no rows of {self.family} layer {self.layer}"
            )
        return n, moments.mean.astype(np.float32), float(moments.m2.sum())


def _encode(w: dict, x, kind: str, k: int):
    """Feature activations [rows, m] of inputs x [rows, d]."""
    import torch

    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if kind == "l1":
        return torch.relu(pre)
    values, index = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))


def _decode(w: dict, f):
    return f @ w["W_dec"] + w["b_dec"]


def _train(
    stream: _LayerStream, p: SAEParams, m: int, mean: np.ndarray, scale: float
) -> tuple[dict, float]:
    """Weights after ``p.epochs`` epochs on inputs times ``scale``, back in stored units,
    and the mean training loss of the last epoch (in the scaled units)."""
    import torch

    d = len(mean)
    gen = torch.Generator().manual_seed(p.seed)
    w_dec = torch.randn(m, d, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w = {
        "W_enc": w_dec.T.contiguous(),
        "b_enc": torch.zeros(m),
        "W_dec": w_dec,
        "b_dec": torch.from_numpy(mean * scale),
    }
    for t in w.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(w.values()), lr=p.lr)
    rng = np.random.default_rng(p.seed)
    loss_sum, steps = 0.0, 0
    for epoch in range(p.epochs):
        loss_sum, steps = 0.0, 0
        for shard in rng.permutation(stream.inputs.shards):
            x = stream.read(int(shard))[2]
            x = torch.from_numpy(x[rng.permutation(len(x))] * np.float32(scale))
            for lo in range(0, len(x), p.batch_size):
                xb = x[lo : lo + p.batch_size]
                f = _encode(w, xb, p.kind, p.k)
                loss = ((_decode(w, f) - xb) ** 2).sum(-1).mean()
                if p.kind == "l1":
                    loss = loss + p.l1_coeff * f.sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    # keep the step tangent to the unit sphere of each decoder row
                    g, rows = w["W_dec"].grad, w["W_dec"]
                    g -= (g * rows).sum(-1, keepdim=True) * rows
                opt.step()
                with torch.no_grad():
                    w["W_dec"] /= w["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
                loss_sum += loss.item() * len(xb)
                steps += len(xb)
        log.info("sae epoch %d/%d: loss %.5g", epoch + 1, p.epochs, loss_sum / max(steps, 1))
    out = {name: t.detach() for name, t in w.items()}
    out["b_enc"] = out["b_enc"] / scale
    out["b_dec"] = out["b_dec"] / scale
    return out, loss_sum / max(steps, 1)


def _final_pass(stream: _LayerStream, w: dict, p: SAEParams, schema) -> dict:
    """Sparse feature activations of every token, squared error, L0 and feature counts."""
    import pyarrow as pa
    import torch

    run_id = stream.inputs.run_id
    m = w["W_dec"].shape[0]
    counts = np.zeros(m, dtype=np.int64)
    sse, active, parts = 0.0, 0, []
    with torch.inference_mode():
        for shard in stream.inputs.shards:
            seq, pos, x = stream.read(shard)
            for lo in range(0, len(x), ROWS_PER_CHUNK):
                xb = torch.from_numpy(x[lo : lo + ROWS_PER_CHUNK])
                f = _encode(w, xb, p.kind, p.k)
                sse += float(((_decode(w, f) - xb).double() ** 2).sum())
                row_idx, feat_idx = torch.nonzero(f, as_tuple=True)
                values = f[row_idx, feat_idx].numpy()
                rows, feats = row_idx.numpy(), feat_idx.numpy()
                active += len(rows)
                counts += np.bincount(feats, minlength=m)
                rows_abs = rows + lo
                n = len(rows)
                parts.append(
                    pa.Table.from_arrays(
                        [
                            pa.array(np.full(n, run_id, dtype=object), pa.string()),
                            pa.array(np.full(n, p.hook, dtype=object), pa.string()),
                            pa.array(seq[rows_abs].astype(np.int64)),
                            pa.array(pos[rows_abs].astype(np.int32)),
                            pa.array(feats.astype(np.int32)),
                            pa.array(values.astype(np.float32)),
                        ],
                        schema=schema,
                    )
                )
    features = pa.concat_tables(parts) if parts else schema.empty_table()
    return {"sse": sse, "active": active, "counts": counts, "features": features}


def _directions(schema, run_id: str, hook: str, w: dict):
    """The decoder rows in long form: one row per (feature, dim)."""
    import pyarrow as pa

    dec = w["W_dec"].numpy().astype(np.float32)
    m, d = dec.shape
    n = m * d
    return pa.Table.from_arrays(
        [
            pa.array(np.full(n, run_id, dtype=object), pa.string()),
            pa.array(np.full(n, hook, dtype=object), pa.string()),
            pa.array(np.repeat(np.arange(m, dtype=np.int32), d)),
            pa.array(np.tile(np.arange(d, dtype=np.int32), m)),
            pa.array(dec.ravel()),
        ],
        schema=schema,
    )


def _table(schema, columns: dict[str, list]):
    import pyarrow as pa

    return pa.Table.from_pydict(columns, schema=schema)


def _save_weights(inputs: RunReader, p: SAEParams, w: dict) -> str:
    """Save the weights as a safetensors artifact of the run; returns its path relative
    to the run directory."""
    from safetensors.numpy import save

    metadata = {
        "run_id": inputs.run_id,
        "hook": p.hook,
        "kind": p.kind,
        "k": str(p.k),
        "l1_coeff": str(p.l1_coeff),
        "layout": "f = act((x - b_dec) @ W_enc + b_enc); x_hat = f @ W_dec + b_dec",
    }
    # safetensors copies raw buffers: a transposed (Fortran-order) array would be garbled
    tensors = {n: np.ascontiguousarray(t.numpy(), dtype=np.float32) for n, t in w.items()}
    return inputs.writer().write_artifact(
        SuperpositionDisentangler.name, f"{p.hook}.safetensors", save(tensors, metadata)
    )
