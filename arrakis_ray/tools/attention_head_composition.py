"""Q-, K- and V-composition between attention heads, from the weights alone.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", measure how
much a later head B reads what an earlier head A writes. The paper writes matrices
acting on column vectors: ``W_OV = W_O W_V`` and ``W_QK = W_Q^T W_K`` (the attention
score is ``x_q^T W_QK x_k``). Head A's output ``W_OV^A x`` can enter head B's query,
key or value side:

- Q-composition: ``||W_QK^B^T W_OV^A||_F / (||W_QK^B^T||_F ||W_OV^A||_F)``
- K-composition: ``||W_QK^B W_OV^A||_F / (||W_QK^B||_F ||W_OV^A||_F)``
- V-composition: ``||W_OV^B W_OV^A||_F / (||W_OV^B||_F ||W_OV^A||_F)``

Here weights are TransformerLens-shaped (row vectors: ``x @ W``), where the same
matrices are transposed: ``W_OV = W_V[h] @ W_O[h]``, ``W_QK = W_Q[h] @ W_K[h]^T``. The
scores above are then ``||W_OV^A W_B|| / (||W_OV^A|| ||W_B||)`` with ``W_B = W_QK^B``
(Q), ``W_QK^B^T`` (K) or ``W_OV^B`` (V), which is TransformerLens' ``get_comp_score``.

Computed in factored form (``models/circuits.py``), never materialising a ``d_model x
d_model`` matrix: only the cross term ``R_A L_B`` of the factors ``W_OV^A = L_A R_A``,
``W_B = L_B R_B`` contracts over d_model, the rest are ``d_head``-sized products.

Layer norm (``fold_ln``, on by default): each reading layer's ln1 is folded into its
weights as ``models/circuits.py`` describes (gain into W_Q/W_K/W_V, LayerNorm's
centering into readers and W_O writers).

``baseline`` (the paper subtracts the composition of random matrices): the mean score
of ``BASELINE_SAMPLES`` pairs of random matrices of the same factored shapes (iid
Gaussian ``d_model x d_head`` factors, fixed seed). For ``d_model >> d_head`` it is
close to ``1 / sqrt(d_model)`` and the same for the three kinds.

Cost: per layer pair and kind, one ``[n_heads*d_head, d_model] @ [d_model,
n_heads*d_head]`` matmul (the cross terms of all head pairs) plus d_head-sized
products; each layer is read and QR-factored once. Memory: one float32 copy of every
layer's W_O (the size of the model's o_proj weights), plus one layer's Q/K/V at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.models.circuits import HeadFactors, Writer, frob, layer_factors
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel

log = logging.getLogger(__name__)

__all__ = [
    "AttentionHeadComposition",
    "CompositionParams",
    "composition_scores",
    "random_baseline",
]

KINDS = ("q", "k", "v")
BASELINE_SAMPLES = 32
BASELINE_SEED = 0


@dataclass(frozen=True)
class CompositionParams:
    """Parameters of attention head composition."""

    kinds: tuple[Literal["q", "k", "v"], ...] = KINDS
    """Which compositions to compute: q, k and/or v."""
    fold_ln: bool = True
    """Fold each reading layer's ln1 scale (and LayerNorm's centering) into the weights."""
    baseline: bool = True
    """Also report the mean score of random matrices of the same shapes, and score minus it."""

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("kinds is empty; choose some of q, k, v")


def composition_scores(
    a: Writer | HeadFactors, b: HeadFactors, kinds: tuple[str, ...] = KINDS
) -> dict[str, Tensor]:
    """``kind -> [n_heads_a, n_heads_b]`` composition scores of every head pair.

    ``a`` writes (its W_OV), ``b`` reads. A head whose matrices are zero scores 0.
    """
    import torch

    # W_OV^A = W_V^A W_O^A = L_A R_A;  W_B = L_B R_B per kind, with (L_B, T(L_B), T(R_B^T))
    sides = {"q": (b.W_Q, b.T_Q, b.T_K), "k": (b.W_K, b.T_K, b.T_Q), "v": (b.W_V, b.T_V, b.T_O)}
    n_a, d_head, d_model = a.W_O.shape
    norm_a = frob(a.T_V @ a.T_O.transpose(1, 2))  # ||W_OV^A|| (a may be a Writer)
    out = {}
    for kind in kinds:
        L_b, T_left, T_right = sides[kind]
        n_b = L_b.shape[0]
        # cross term R_A L_B for all head pairs in one matmul: [n_a*d_head, n_b*d_head]
        cross = a.W_O.reshape(n_a * d_head, d_model) @ L_b.permute(1, 0, 2).reshape(d_model, -1)
        cross = cross.reshape(n_a, d_head, n_b, d_head).permute(0, 2, 1, 3)
        core = torch.einsum("aij,abjk,blk->abil", a.T_V, cross, T_right)
        norm_b = frob(T_left @ T_right.transpose(1, 2))  # ||W_B||
        denom = norm_a[:, None] * norm_b[None, :]
        score = frob(core) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[kind] = torch.where(denom > 0, score, torch.zeros_like(score))
    return out


def random_baseline(
    d_model: int, d_head: int, samples: int = BASELINE_SAMPLES, seed: int = BASELINE_SEED
) -> dict[str, float]:
    """``kind -> mean score`` of ``samples`` random (iid Gaussian factor) head pairs."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rand_heads() -> HeadFactors:
        q, k, v = (torch.randn(samples, d_model, d_head, generator=gen) for _ in range(3))
        o = torch.randn(samples, d_head, d_model, generator=gen)
        return HeadFactors.of(q, k, v, o)

    a, b = rand_heads(), rand_heads()
    scores = composition_scores(a, b)
    # pairs (i, i) only: independent draws
    return {kind: float(s.diagonal().mean()) for kind, s in scores.items()}


class AttentionHeadComposition(Tool):
    """Q/K/V composition score of every (earlier head, later head) pair."""

    name = "attention_head_composition"
    summary = "per head pair (A earlier, B later): Q-, K-, V-composition scores from weights"
    reference = "Elhage et al. 2021, 'A Mathematical Framework for Transformer Circuits'"
    Params = CompositionParams
    needs_weights = True
    scope = "run"

    def compute_run(self, inputs: RunReader, model: HookedModel | None) -> pa.Table:
        import torch

        if model is None:
            raise ToolError(f"tool {self.name} needs the model's weights, but got none")
        kinds = tuple(dict.fromkeys(self.params.kinds))  # deduplicated, in the given order
        base = random_baseline(model.d_model, model.d_head) if self.params.baseline else None
        writers: list[Writer] = []
        parts: list[dict[str, np.ndarray]] = []
        with torch.inference_mode():
            for layer_b in range(model.n_layers):
                b = layer_factors(model, layer_b, self.params.fold_ln)
                for layer_a, a in enumerate(writers):
                    for kind, score in composition_scores(a, b, kinds).items():
                        parts.append(_rows(kind, layer_a, layer_b, score.cpu().numpy()))
                writers.append(b.writer())  # keeps W_O only, not Q/K/V
        return self._table(inputs.run_id, parts, base)

    def _table(self, run_id: str, parts: list[dict], base: dict[str, float] | None) -> pa.Table:
        import pyarrow as pa

        schema = self.result_schema()
        if not parts:  # a one-layer model has no head pairs
            return schema.empty_table()
        cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        n = len(cols["score"])
        if base is None:
            baseline = pa.nulls(n, pa.float32())
            adjusted = pa.nulls(n, pa.float32())
        else:
            values = np.array([base[k] for k in cols["kind"]], dtype=np.float32)
            baseline = pa.array(values)
            adjusted = pa.array(cols["score"] - values)
        return pa.Table.from_arrays(
            [
                pa.array(np.full(n, run_id, dtype=object), pa.string()),
                pa.array(cols["kind"], pa.string()),
                pa.array(cols["layer_a"]),
                pa.array(cols["head_a"]),
                pa.array(cols["layer_b"]),
                pa.array(cols["head_b"]),
                pa.array(cols["score"]),
                baseline,
                adjusted,
            ],
            schema=schema,
        )


def _rows(kind: str, layer_a: int, layer_b: int, score: np.ndarray) -> dict[str, np.ndarray]:
    """Long-format columns of one layer pair's ``[n_heads_a, n_heads_b]`` scores."""
    n_a, n_b = score.shape
    head_a, head_b = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
    size = n_a * n_b
    return {
        "kind": np.full(size, kind, dtype=object),
        "layer_a": np.full(size, layer_a, dtype=np.int16),
        "head_a": head_a.ravel().astype(np.int16),
        "layer_b": np.full(size, layer_b, dtype=np.int16),
        "head_b": head_b.ravel().astype(np.int16),
        "score": score.ravel().astype(np.float32),
    }
