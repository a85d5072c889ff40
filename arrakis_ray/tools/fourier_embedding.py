"""The token embedding of a modular-arithmetic model in the Fourier basis.

For a model trained on ``a + b mod p`` (Nanda et al. 2023), the embedding ``W_E`` of
the number tokens ``0..p-1`` is sparse in the Fourier basis over the tokens: a handful
of "key" frequencies hold almost all of its norm. Three outputs, from the weights alone:

- ``fourier_embedding``: per frequency k = 1..(p-1)/2, the norm^2 of W_E's cos k and
  sin k components, its share of ``|W_E|^2``, its rank, and the cumulative share of the
  top frequencies up to it (the top-k fraction);
- ``fourier_embedding_matrix``: ``B @ W_E`` itself (Fourier component x model dim);
- ``embedding_svd``: W_E's singular values and principal components over the tokens.

The constant component is not a frequency: it is in ``|W_E|^2`` but in no row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.tools.base import Tool
from arrakis_ray.tools.modular import check_modulus, check_vocab

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest


@dataclass(frozen=True)
class ModularParams:
    """Parameters of the modular-arithmetic tools."""

    p: int = 113
    """The modulus: token ids 0..p-1 are the numbers."""
    top_k: int = 5
    """Frequencies marked ``in_top_k`` (the share the top k hold is ``cumulative_fraction``)."""

    def __post_init__(self) -> None:
        check_modulus(self.p)
        if not 1 <= self.top_k <= (self.p - 1) // 2:
            raise ValueError(f"top_k must be in 1..{(self.p - 1) // 2}")


class FourierEmbedding(Tool):
    """W_E of the number tokens in the Fourier basis: norms per frequency, top-k share."""

    name = "fourier_embedding"
    summary = "embedding of the number tokens in the Fourier basis: norm per frequency, top-k share"
    reference = (
        "Nanda et al., 'Progress measures for grokking via mechanistic interpretability' (2023)"
    )
    Params = ModularParams
    needs_weights = True
    scope = "run"
    outputs = ("fourier_embedding", "fourier_embedding_matrix", "embedding_svd")

    def check(self, manifest: RunManifest) -> None:
        check_vocab(self.name, manifest, self.params.p)

    def compute_run(self, inputs, model) -> dict:
        from arrakis_ray.models.adapters import get_module

        weight = get_module(model.model, model.adapter.embed).weight
        w_e = weight.detach().float().cpu().numpy()[: self.params.p]
        return embedding_tables(w_e, self.params.top_k, inputs.run_id, self.result_schema)


def embedding_tables(w_e: np.ndarray, top_k: int, run_id: str, schema_of) -> dict:
    """The three outputs for ``w_e [p, d_model]`` (``schema_of(output)`` gives a schema)."""
    import pyarrow as pa

    from arrakis_ray.studies.grokking import fourier

    p, d = w_e.shape
    basis, labels = fourier.fourier_basis(p)
    coeffs = basis @ w_e.astype(np.float64)  # [p components, d]
    row_sq = (coeffs**2).sum(axis=1)
    cos_sq, sin_sq = row_sq[1::2], row_sq[2::2]
    norm_sq = cos_sq + sin_sq
    total = float(row_sq.sum())
    order = np.argsort(-norm_sq, kind="stable")
    rank = np.empty(len(norm_sq), dtype=np.int16)
    rank[order] = np.arange(1, len(norm_sq) + 1)
    cumulative = np.cumsum(norm_sq[order])[rank - 1] / total
    n = len(norm_sq)
    per_freq = pa.Table.from_pydict(
        {
            "run_id": [run_id] * n,
            "frequency": np.arange(1, n + 1, dtype=np.int16),
            "cos_norm_sq": cos_sq,
            "sin_norm_sq": sin_sq,
            "norm_sq": norm_sq,
            "fraction": norm_sq / total,
            "rank": rank,
            "cumulative_fraction": cumulative,
            "in_top_k": rank <= top_k,
        },
        schema=schema_of("fourier_embedding"),
    )
    comp, dim = np.divmod(np.arange(p * d), d)
    matrix = pa.Table.from_pydict(
        {
            "run_id": [run_id] * (p * d),
            "component": comp.astype(np.int16),
            "label": np.asarray(labels, dtype=object)[comp],
            "dim": dim.astype(np.int16),
            "value": coeffs.reshape(-1).astype(np.float32),
        },
        schema=schema_of("fourier_embedding_matrix"),
    )
    u, s, _ = np.linalg.svd(w_e.astype(np.float64), full_matrices=False)
    k = len(s)
    comp, token = np.divmod(np.arange(k * p), p)
    svd = pa.Table.from_pydict(
        {
            "run_id": [run_id] * (k * p),
            "component": comp.astype(np.int16),
            "singular_value": s[comp],
            "token": token.astype(np.int16),
            "value": u.T.reshape(-1).astype(np.float32),  # component c over the tokens
        },
        schema=schema_of("embedding_svd"),
    )
    return {"fourier_embedding": per_freq, "fourier_embedding_matrix": matrix, "embedding_svd": svd}
