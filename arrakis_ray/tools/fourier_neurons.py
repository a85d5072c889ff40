"""The MLP neurons of a modular-arithmetic model in the 2D Fourier basis over (a, b).

Reads ``blocks.L.mlp.hook_post`` at the ``=`` position for the run's inputs, which must
be all ``p^2`` pairs ``a, b, =`` once each (``pipelines/data/grokking_pairs.npy``). Each
neuron's activation is a function on the (a, b) grid; its 2D Fourier transform
``B A B^T`` shows which frequencies it uses (Nanda et al. 2023: most neurons use one).

Outputs:

- ``fourier_neurons``: per neuron, its dominant frequency, the share of its variance
  that frequency holds (the components in ``{const, cos k, sin k}^2`` but the constant),
  and whether that share reaches ``threshold`` ("explained by one frequency");
- ``fourier_neuron_grid``: the activations of the first ``grid_neurons`` neurons over
  (a, b);
- ``fourier_neuron_spectrum``: their 2D Fourier coefficients (row: component over a,
  column: component over b; 0 = const, 2k-1 = cos k, 2k = sin k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook
from arrakis_ray.tools.base import Tool
from arrakis_ray.tools.modular import check_modulus, check_vocab

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest
    from arrakis_ray.store.reader import RunReader


@dataclass(frozen=True)
class FourierNeuronsParams:
    """Parameters of fourier_neurons."""

    p: int = 113
    """The modulus: token ids 0..p-1 are the numbers."""
    layer: int = 0
    """Block whose mlp.hook_post is read."""
    threshold: float = 0.85
    """A neuron is explained by one frequency when that frequency holds this share."""
    grid_neurons: int = 5
    """Neurons 0..grid_neurons-1 get their (a, b) grid and 2D spectrum stored."""

    def __post_init__(self) -> None:
        check_modulus(self.p)
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        if self.grid_neurons < 0:
            raise ValueError("grid_neurons must be >= 0")


def pair_matrix(reader: RunReader, family: str, layer: int, p: int, tool: str) -> np.ndarray:
    """``[p*p, width]`` float64: a dense family at the ``=`` (last) position of every
    input, row ``a * p + b``; ToolError unless the run holds every pair once."""
    from arrakis_ray.studies.grokking import task

    rows, parts = [], []
    for shard in reader.shards:
        tokens = reader.tokens(shard)
        seq, a, b = task.sequence_pairs(
            tokens.column("seq_id").to_numpy(),
            tokens.column("pos").to_numpy(),
            tokens.column("token_id").to_numpy(),
        )
        t_seq, t_pos, matrix = reader.matrix(family, layer, shard)
        last = np.zeros(len(t_seq), dtype=bool)
        last[:-1] = t_seq[1:] != t_seq[:-1]
        last[-1:] = True  # rows are sorted by (seq, pos): the last row of each sequence
        where = np.searchsorted(seq, t_seq[last])
        rows.append(a[where] * p + b[where])
        parts.append(matrix[last])
        if np.any(t_pos[last] != 2):
            raise ToolError(f"{tool}: the inputs must be 'a b =' (3 tokens); run has longer ones")
    if not rows:
        raise ToolError(f"{tool}: the run has no harvested shards")
    order = np.concatenate(rows)
    try:
        task.pair_rows(order // p, order % p, p)
    except ValueError as exc:
        raise ToolError(f"{tool}: {exc}") from None
    out = np.empty((p * p, parts[0].shape[1]))
    out[order] = np.concatenate(parts)
    return out


class FourierNeurons(Tool):
    """Each MLP neuron's 2D Fourier spectrum over (a, b) and the frequency explaining it."""

    name = "fourier_neurons"
    summary = (
        "per MLP neuron at '=': 2D Fourier spectrum over (a, b), dominant frequency and its share"
    )
    reference = (
        "Nanda et al., 'Progress measures for grokking via mechanistic interpretability' (2023)"
    )
    Params = FourierNeuronsParams
    scope = "run"
    outputs = ("fourier_neurons", "fourier_neuron_grid", "fourier_neuron_spectrum")

    def check(self, manifest: RunManifest) -> None:
        check_vocab(self.name, manifest, self.params.p)
        self.selected_layers(manifest, [self.params.layer])

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [family_hook("mlp_post", self.params.layer)]

    def compute_run(self, inputs, model=None) -> dict:
        acts = pair_matrix(inputs, "mlp_post", self.params.layer, self.params.p, self.name)
        return neuron_tables(acts, self.params, inputs.run_id, self.result_schema)


def neuron_tables(acts: np.ndarray, params: FourierNeuronsParams, run_id: str, schema_of) -> dict:
    """The three outputs for activations ``[p*p, n]`` ordered by ``a * p + b``."""
    import pyarrow as pa

    from arrakis_ray.studies.grokking import fourier

    p = params.p
    fractions = fourier.neuron_frequency_fractions(acts)
    best = fractions.argmax(axis=1)
    share = fractions[np.arange(len(best)), best]
    n = acts.shape[1]
    per_neuron = pa.Table.from_pydict(
        {
            "run_id": [run_id] * n,
            "layer": np.full(n, params.layer, dtype=np.int16),
            "neuron": np.arange(n, dtype=np.int32),
            "frequency": (best + 1).astype(np.int16),
            "fraction": share,
            "explained": share >= params.threshold,
            "variance": acts.var(axis=0),
        },
        schema=schema_of("fourier_neurons"),
    )
    g = min(params.grid_neurons, n)
    neuron, cell = np.divmod(np.arange(g * p * p), p * p)
    first, second = np.divmod(cell, p)
    common = {
        "run_id": [run_id] * len(cell),
        "layer": np.full(len(cell), params.layer, dtype=np.int16),
        "neuron": neuron.astype(np.int32),
    }
    grid = pa.Table.from_pydict(
        {
            **common,
            "a": first.astype(np.int16),
            "b": second.astype(np.int16),
            "activation": acts[:, :g].T.reshape(-1).astype(np.float32),
        },
        schema=schema_of("fourier_neuron_grid"),
    )
    spectra = fourier.neuron_spectra(acts[:, :g]) if g else np.zeros((0, p, p))
    spectrum = pa.Table.from_pydict(
        {
            **common,
            "a_component": first.astype(np.int16),
            "b_component": second.astype(np.int16),
            "value": spectra.reshape(-1).astype(np.float32),
        },
        schema=schema_of("fourier_neuron_spectrum"),
    )
    return {
        "fourier_neurons": per_neuron,
        "fourier_neuron_grid": grid,
        "fourier_neuron_spectrum": spectrum,
    }
