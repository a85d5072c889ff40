"""Direct logit attribution: how much each component writes to one logit (or a difference).

The final residual stream is a sum of components (``decompose.py``): the embeddings,
each attention head ``z[h] @ W_O[h]``, each layer's attention output bias, each MLP.
The final norm ``gain * centre(x) / scale(x) + bias`` is affine in ``x`` once its scale
is frozen at the value it had in the run (computed from the stored last
``hook_resid_post``), so the logit of token t splits exactly:

    logit_t - b_U[t] = sum_c centre(c) . (gain * W_U[:, t]) / scale + bias . W_U[:, t]

one term per component plus the norm's bias (``ln_final.bias``; LayerNorm only). For a
logit difference t - o, ``W_U[:, t] - W_U[:, o]`` replaces the column. The terms sum to
the model's logit minus the unembedding bias (before any final logit softcapping).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray.hooks import family_hook
from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.decompose import (
    RowIndex,
    ShardComponents,
    check_positions,
    check_token,
    decomposition_hooks,
    gather,
    next_tokens,
    select_positions,
    sorted_tokens,
    token_id,
)

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitAttributionParams:
    """Parameters of direct logit attribution."""

    token: Any = None
    """Target token, by its text or its id; default: the actual next token at each position."""
    other_token: Any = None
    """If given (text or id), attribute the logit difference token - other_token."""
    positions: Any = "all"
    """Positions to attribute: "all", "last" (needs token), a position or a list of them
    (negative counts from the end of each sequence)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", check_positions(self.positions))
        check_token(self.token, "token")
        check_token(self.other_token, "other_token")
        if self.positions == "last" and self.token is None:
            raise ValueError(
                "positions 'last' has no next token to attribute; give token (the text or "
                "id of the token to attribute) or other positions"
            )


class LogitAttribution(Tool):
    """Each component's direct contribution to a token's final logit, per position."""

    name = "logit_attribution"
    summary = "direct logit attribution: embeddings, every head, attention biases, every MLP"
    reference = "Elhage et al., 'A Mathematical Framework for Transformer Circuits' (2021)"
    Params = LogitAttributionParams
    needs_weights = True

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        n_layers = manifest.shape.n_layers
        # the last resid_post: the final norm's scale, frozen at its value in the run
        return [*decomposition_hooks(manifest, n_layers), family_hook("resid_post", n_layers - 1)]

    def compute_shard(self, inputs: ShardInputs, model) -> object:
        import pyarrow as pa

        p = self.params
        seq, pos, ids = sorted_tokens(inputs.tokens)
        keep = select_positions(seq, pos, p.positions)
        if p.token is None:
            target, has_next = next_tokens(seq, pos, ids)
            keep &= has_next
        else:
            target = np.full(len(seq), token_id(p.token, inputs.vocab, "token"))
        other = (
            None if p.other_token is None else token_id(p.other_token, inputs.vocab, "other_token")
        )
        seq, pos, target = seq[keep], pos[keep], target[keep]

        names, layers, heads, contrib = self._attribute(inputs, model, seq, pos, target, other)
        k, n = len(names), len(seq)
        layers_arr = np.array([-1 if v is None else v for v in layers], dtype=np.int16)
        heads_arr = np.array([-1 if v is None else v for v in heads], dtype=np.int16)
        # one row per (position, component), positions in (seq, pos) order
        return pa.Table.from_arrays(
            [
                pa.array(np.full(n * k, inputs.run_id, dtype=object), pa.string()),
                pa.array(np.repeat(seq, k).astype(np.int64)),
                pa.array(np.repeat(pos, k).astype(np.int32)),
                pa.array(np.repeat(target, k).astype(np.int32)),
                pa.array(
                    np.full(n * k, -1 if other is None else other, dtype=np.int32),
                    mask=np.full(n * k, other is None),
                ),
                pa.array(np.tile(np.array(names, dtype=object), n), pa.string()),
                pa.array(np.tile(layers_arr, n), mask=np.tile(layers_arr < 0, n)),
                pa.array(np.tile(heads_arr, n), mask=np.tile(heads_arr < 0, n)),
                pa.array(contrib.T.ravel()),
            ],
            schema=self.result_schema(),
        )

    def _attribute(self, inputs, model, seq, pos, target, other):
        """(names, layers, heads, contributions [component, row]) of the kept rows."""
        import torch

        from arrakis_ray.models.norms import final_norm
        from arrakis_ray.models.weights import unembed_weights

        if model.backend.logit_softcap():
            log.warning(
                "%s applies final logit softcapping: attributions sum to the logit before it",
                model.arch,
            )
        n_layers = model.n_layers
        index = RowIndex(seq, pos, inputs.shard)
        parts = ShardComponents(inputs, model, index, n_layers)
        norm = final_norm(model)
        w_u, _ = unembed_weights(model)
        cat = parts.catalogue
        names, layers, heads = list(cat.names), list(cat.layers), list(cat.heads)
        if norm.bias is not None:
            names.append("ln_final.bias")
            layers.append(None)
            heads.append(None)
        contrib = np.zeros((len(names), len(seq)), dtype=np.float32)
        if not len(seq):
            return names, layers, heads, contrib
        final = inputs.activations["resid_post"]
        final_rows = index.locate(final, "resid_post", n_layers - 1)
        tgt = torch.from_numpy(target.astype(np.int64)).to(model.device)
        with torch.inference_mode():
            for lo, hi in parts.chunks():
                resid = torch.from_numpy(gather(final, final_rows[lo:hi])).to(model.device)
                column = w_u[:, tgt[lo:hi]].T  # [rows, d_model]
                if other is not None:
                    column = column - w_u[:, other]
                # centre(c) . u == c . centre(u): centring is a symmetric projection
                u = norm.centre(column * norm.gain)
                scale = norm.scale(resid)
                for first, _, vectors in parts.groups(lo, hi):
                    values = torch.einsum("kmd,md->km", vectors, u) / scale
                    contrib[first : first + len(vectors), lo:hi] = values.cpu().numpy()
                if norm.bias is not None:
                    contrib[-1, lo:hi] = (column @ norm.bias).cpu().numpy()
        return names, layers, heads, contrib
