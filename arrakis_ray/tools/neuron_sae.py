"""The run's sparse autoencoder as the neuron dashboard reads it: its metrics row, its
feature activations one shard's seq_id range at a time, and its decoder directions."""

from __future__ import annotations

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.store.reader import RunReader


def sae_metrics(inputs: RunReader, tool: str) -> tuple[str, int, int]:
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


def sae_directions(inputs: RunReader, hook: str, n_features: int, tool: str) -> np.ndarray:
    """[n_features, width] decoder directions of the run's SAE (results_sae_directions)."""
    if not inputs.has_result("sae_directions"):
        raise ToolError(
            f"{tool}: run {inputs.run_id} has no sae_directions results for the logit "
            "effects; run superposition_disentangler again, or pass logit_k: 0"
        )
    table = inputs.result("sae_directions", columns=["hook", "feature", "dim", "value"])
    feature, dim = table["feature"].to_numpy(), table["dim"].to_numpy()
    width = int(dim.max()) + 1 if len(dim) else 0
    if len(feature) != n_features * width or set(table["hook"].to_pylist()) != {hook}:
        raise ToolError(
            f"{tool}: run {inputs.run_id}: sae_directions do not hold {n_features} "
            f"features of {hook} (got {len(feature)} rows)"
        )
    out = np.zeros((n_features, width), np.float32)
    out[feature, dim] = table["value"].to_numpy()
    return out


def sae_entries(inputs: RunReader, seq: np.ndarray, pos: np.ndarray):
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
