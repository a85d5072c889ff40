"""The progress measures of grokking (Nanda et al. 2023) for one checkpoint.

Run once per checkpoint (a sweep over ``model.checkpoint``), they trace how the
Fourier algorithm forms and the memorisation goes. The model is run on all ``p^2``
inputs ``a, b, =``; with ``key_frequencies`` given (the final model's, so that every
checkpoint is measured on the same ones) or else the checkpoint's own (the frequencies
its neurons cluster on):

- ``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy`` on the seeded
  split (``train_fraction``, ``data_seed``);
- ``restricted_loss`` (all inputs: the logits keep only their components along
  ``cos/sin(w (a + b))`` for the key frequencies, plus each output's mean) and
  ``excluded_loss`` (training inputs: the logits with those components removed);
- ``gini_embed``, ``gini_neuron_logit``: Gini coefficients of the per-frequency norms of
  W_E and of the neuron-logit map W_U W_out;
- ``weight_norm_sq``: the total sum of squared parameters; ``top5_fraction``: the share
  of W_E's norm^2 in its top 5 frequencies;
- ``key_frequency``: one row per key frequency used (value = the frequency).

The model must have one layer and no norms (the grokking transformer): the neurons are
its ``mlp.hook_post`` at ``=``, and the neuron-logit map W_U W_out is then their whole
path to the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.tools.base import Tool
from arrakis_ray.tools.modular import (
    check_modulus,
    check_one_layer_without_norms,
    check_vocab,
)

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

ROWS_PER_BATCH = 4096  # inputs per forward pass


@dataclass(frozen=True)
class ProgressMeasuresParams:
    """Parameters of progress_measures."""

    p: int = 113
    """The modulus: token ids 0..p-1 are the numbers, p is '='."""
    key_frequencies: tuple[int, ...] = ()
    """Frequencies the restricted/excluded losses keep/remove (empty: this model's own)."""
    train_fraction: float = 0.3
    """Share of the p^2 pairs the model trained on (the split is re-drawn from data_seed)."""
    data_seed: int = 598
    """Seed of the train/test split."""

    def __post_init__(self) -> None:
        check_modulus(self.p)
        bad = [k for k in self.key_frequencies if not 1 <= k <= (self.p - 1) // 2]
        if bad:
            raise ValueError(f"key_frequencies {bad} outside 1..{(self.p - 1) // 2}")
        if not 0 < self.train_fraction < 1:
            raise ValueError("train_fraction must be in (0, 1)")


class ProgressMeasures(Tool):
    """Restricted and excluded loss, Gini of the Fourier norms, weight norm, accuracy."""

    name = "progress_measures"
    summary = "grokking progress measures: restricted/excluded loss, Fourier Gini, weight norm"
    reference = (
        "Nanda et al., 'Progress measures for grokking via mechanistic interpretability' (2023)"
    )
    Params = ProgressMeasuresParams
    needs_weights = True
    scope = "run"

    def check(self, manifest: RunManifest) -> None:
        check_vocab(self.name, manifest, self.params.p, equals=True)
        check_one_layer_without_norms(self.name, manifest)

    def compute_run(self, inputs, model):
        import pyarrow as pa

        values = measure(model, self.params)
        n = len(values)
        return pa.Table.from_pydict(
            {
                "run_id": [inputs.run_id] * n,
                "metric": [m for m, _ in values],
                "value": [v for _, v in values],
            },
            schema=self.result_schema(),
        )


def measure(model, params: ProgressMeasuresParams) -> list[tuple[str, float]]:
    """(metric, value) rows for a ``HookedModel`` (see the module docstring)."""
    import torch

    from arrakis_ray.models.adapters import get_module
    from arrakis_ray.models.weights import mlp_out_weights, unembed_weights
    from arrakis_ray.studies.grokking import fourier, task

    p, last = params.p, model.n_layers - 1
    ids = torch.from_numpy(task.all_pairs(p)).to(model.device)
    hook = f"blocks.{last}.mlp.hook_post"
    logits, acts = [], []
    with torch.inference_mode():
        for lo in range(0, len(ids), ROWS_PER_BATCH):
            out, cache = model.run_with_cache(ids[lo : lo + ROWS_PER_BATCH], hooks=[hook, "logits"])
            logits.append(out[:, -1, :p].double().cpu().numpy())
            acts.append(cache[hook][:, -1].double().cpu().numpy())
    logits, acts = np.concatenate(logits), np.concatenate(acts)
    labels = task.labels(p)
    train = task.train_mask(p, params.train_fraction, params.data_seed)
    freqs = list(params.key_frequencies) or fourier.key_frequencies(acts)
    w_e = get_module(model.model, model.adapter.embed).weight.detach().double().cpu().numpy()[:p]
    w_u, _ = unembed_weights(model)  # [d_model, vocab]
    w_out, _ = mlp_out_weights(model, last)  # [d_mlp, d_model]
    w_nl = (w_out @ w_u[:, :p]).T.double().cpu().numpy()  # [p, d_mlp]
    weight_norm = float(sum((w.detach().double() ** 2).sum() for w in model.model.parameters()))
    rows = fourier.progress_measures(logits, w_e, w_nl, weight_norm, labels, train, freqs)
    predicted = logits.argmax(axis=1) == labels
    for split, rows_of in (("train", train), ("test", ~train)):
        rows[f"{split}_loss"] = fourier.cross_entropy(logits[rows_of], labels[rows_of])
        rows[f"{split}_accuracy"] = float(predicted[rows_of].mean())
    return [*rows.items(), *(("key_frequency", float(k)) for k in freqs)]
