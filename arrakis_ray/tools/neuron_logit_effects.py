"""Direct logit effects of neurons and SAE features: the tokens each one promotes.

A unit (neuron, residual dimension or SAE feature) adds ``a w`` to the residual stream
when its activation is ``a``, for a direction ``w [d_model]`` (TransformerLens shapes):

- ``mlp_post`` neuron i of layer L: ``w = W_out[L][i, :]`` (``mlp_post @ W_out + b_out``
  is ``hook_mlp_out``);
- dimension i of a residual-stream family (resid_pre, resid_mid, resid_post, attn_out,
  mlp_out, and for SAEs embed and pos_embed): ``w = e_i``, the basis vector: the
  standard direct-logit readout of a dimension (the residual basis is not privileged:
  read these with care);
- SAE feature f trained on hook H: its unit-norm decoder row ``d_f``
  (``results_sae_directions``) for a residual-stream family, ``d_f @ W_out[L]`` for
  ``mlp_post``; for ``ln_final`` (after the final norm) ``d_f`` meets ``W_U`` directly.

Its effect on the logits, per unit of activation, with the final norm's ``1/scale(x)``
frozen at 1 (multiply by a token's ``1/scale`` for the actual direct effect there):

    effect = C_V( (gamma * P w) @ W_U )

``gamma``: the final norm's gain (``1 + weight`` for gemma; ``models/norms.py``); ``P``
removes the mean over d_model for LayerNorm families (identity for RMSNorm); ``C_V``
subtracts the mean over the vocabulary (softmax ignores a shift of every logit, as in
read_write_heads' ``center_unembed``); ``b_U`` is such a shift and drops out. The
``logit_k`` tokens with the largest effect are ``promoted`` (rank 1 = largest), those
with the smallest ``suppressed`` (rank 1 = most negative); ties at the k-th place are
broken by torch.topk. ``mlp_pre`` (a pre-activation or gate: no linear path to the
logits) and families outside the residual stream get no rows, with the reason logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel

log = logging.getLogger(__name__)

RESIDUAL_FAMILIES = (
    "embed",
    "pos_embed",
    "resid_pre",
    "attn_out",
    "resid_mid",
    "mlp_out",
    "resid_post",
)
"""Families whose vectors live in the residual stream: dimension i is direction e_i."""
BLOCK_CELLS = 1 << 22  # units x vocabulary logits computed at once: bounds memory


def unit_directions(
    model: HookedModel, family: str, layer: int, vectors: np.ndarray | None = None
) -> Tensor | None:
    """``[units, d_model]`` residual directions of the family's units (its dimensions,
    or the rows of ``vectors`` in the family's space); None when there is no linear
    path to the logits (logged)."""
    import torch

    from arrakis_ray.models.weights import mlp_out_weights

    if family in RESIDUAL_FAMILIES or family == "ln_final":
        width = model.d_model
    elif family == "mlp_post":
        width = model.d_mlp
    else:
        log.info("no logit effects for %s: no linear path from it to the logits", family)
        return None
    if vectors is not None and vectors.shape[1] != width:
        raise ToolError(
            f"logit effects: {family} vectors have width {vectors.shape[1]}, the model's is {width}"
        )
    units = None if vectors is None else torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
    if family == "mlp_post":
        W_out, _ = mlp_out_weights(model, layer)  # neuron i writes row i
        return W_out if units is None else units.to(W_out) @ W_out
    return (torch.eye(width) if units is None else units).to(model.device)


class LogitReadout:
    """The unembedding with the final norm's gain and centring folded in, read once."""

    def __init__(self, model: HookedModel):
        from arrakis_ray.models.norms import final_norm
        from arrakis_ray.models.weights import unembed_weights

        self.W_U, _ = unembed_weights(model)  # b_U: a shift of every logit, drops out
        self.norm = final_norm(model)

    def __call__(self, directions: Tensor, after_norm: bool = False) -> Tensor:
        """``[units, vocab]``: ``C_V((gamma * P w) @ W_U)`` for each row ``w`` of
        ``directions`` (``after_norm``: ``C_V(w @ W_U)``, for directions past the norm)."""
        w = directions.to(self.W_U)
        if not after_norm:
            w = self.norm.gain.to(self.W_U) * self.norm.centre(w)
        effect = w @ self.W_U
        return effect - effect.mean(dim=-1, keepdim=True)


def top_effects(
    model: HookedModel,
    family: str,
    layer: int,
    k: int,
    vocab: np.ndarray | None,
    vectors: np.ndarray | None = None,
    label: str | None = None,
) -> dict | None:
    """``neuron_logit_effects`` columns (no run_id) of every unit of ``family`` at
    ``layer``: its ``k`` promoted then ``k`` suppressed tokens; None when the family has
    no linear path to the logits.

    ``vectors``: the units' vectors in the family's space (SAE decoder rows; default
    its basis). ``label``: the table's family value (default ``family``). ``vocab``:
    token id -> text (the run's vocabulary); None: decoded with the model's tokenizer
    by the run vocabulary's rule, or null without one.
    """
    import torch

    directions = unit_directions(model, family, layer, vectors)
    if directions is None:
        return None
    readout = LogitReadout(model)
    n_units, n_vocab = directions.shape[0], readout.W_U.shape[1]
    k = min(k, n_vocab)
    chunk = max(1, BLOCK_CELLS // n_vocab)
    ids, effects = [], []
    with torch.inference_mode():
        for start in range(0, n_units, chunk):
            effect = readout(directions[start : start + chunk], family == "ln_final")
            up = torch.topk(effect, k, dim=-1)
            down = torch.topk(effect, k, dim=-1, largest=False)
            # per unit: promoted ranks 1..k, then suppressed ranks 1..k
            ids.append(torch.cat([up.indices, down.indices], dim=1).cpu().numpy())
            effects.append(torch.cat([up.values, down.values], dim=1).float().cpu().numpy())
    token_id = np.concatenate(ids).ravel()
    direction = np.tile(np.repeat(np.array(["promoted", "suppressed"], object), k), n_units)
    rows = n_units * 2 * k
    return {
        "family": np.full(rows, label or family, dtype=object),
        "layer": np.full(rows, layer),
        "neuron": np.repeat(np.arange(n_units), 2 * k),
        "direction": direction,
        "rank": np.tile(np.arange(1, k + 1), 2 * n_units),
        "token_id": token_id,
        "token": _token_texts(model, token_id, vocab),
        "effect": np.concatenate(effects).ravel(),
    }


def _token_texts(model: HookedModel, ids: np.ndarray, vocab: np.ndarray | None) -> list:
    if vocab is not None:
        return [vocab[i] if i < len(vocab) else None for i in ids.tolist()]
    tokenizer = model.tokenizer
    if tokenizer is None:
        return [None] * len(ids)
    known = len(tokenizer)
    # the rule of the run's vocab table (harvest.model_source.vocab_texts)
    texts = {i: tokenizer.decode([i]) if i < known else f"<id {i}>" for i in set(ids.tolist())}
    return [texts[i] for i in ids.tolist()]
