"""Logit lens: read every layer's residual stream through the final norm and unembedding.

For each layer L, sequence and position: ``logits_L = unembed(ln_final(resid_post_L))``
(nostalgebraist 2020). The row records the layer's top-1 token and its probability, and
the probability and rank of the token that actually comes next (rank 1 = top). The
last layer's row is the model's own prediction. The original Arrakis skipped the
unembedding; here both the final norm and the unembedding (with its bias) are applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.hooks import family_hook
from arrakis_ray.tools.base import ShardInputs, Tool

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

ROWS_PER_CHUNK = 512  # rows unembedded at once: bounds memory at 512 x vocab floats


@dataclass(frozen=True)
class LogitLensParams:
    """Parameters of the logit lens."""

    include_embed: bool = False
    """Also read ``blocks.0.hook_resid_pre`` (the embeddings) as layer -1, if harvested."""


class LogitLens(Tool):
    """Top-1 token, and the next token's probability and rank, at every layer."""

    name = "logit_lens"
    summary = "per layer, position: top-1 token and the actual next token's prob and rank"
    reference = "nostalgebraist, 'interpreting GPT: the logit lens' (2020)"
    Params = LogitLensParams
    needs_weights = True

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [family_hook(family, layer) for family, layer in self._states(manifest)]

    def _states(self, manifest: RunManifest) -> list[tuple[str, int]]:
        """(family, layer) of every residual state read, in layer order."""
        states = [("resid_post", layer) for layer in range(manifest.shape.n_layers)]
        if self.params.include_embed:
            states.insert(0, ("resid_pre", 0))  # the embeddings, before block 0
        return states

    def compute_shard(self, inputs: ShardInputs, model) -> object:
        import pyarrow as pa

        tokens = inputs.tokens
        seq = tokens.column("seq_id").to_numpy()
        pos = tokens.column("pos").to_numpy()
        order = np.lexsort((pos, seq))
        seq, pos = seq[order], pos[order]
        token_ids = tokens.column("token_id").to_numpy()[order]
        # the next token is the next row of the same sequence (rows sorted by seq, pos)
        has_next = np.append((seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1] + 1), False)
        target = np.append(token_ids[1:], 0)
        vocab = inputs.vocab

        parts = []
        for layer, matrix in self._layers(inputs, seq, pos):
            top1, top1_p, target_p, rank = _lens(model, matrix, target)
            n = len(seq)
            parts.append(
                pa.Table.from_arrays(
                    [
                        pa.array(np.full(n, inputs.run_id, dtype=object), pa.string()),
                        pa.array(np.full(n, layer, dtype=np.int16)),
                        pa.array(seq),
                        pa.array(pos.astype(np.int32)),
                        pa.array(top1.astype(np.int32)),
                        pa.array(vocab[top1], pa.string()),
                        pa.array(top1_p),
                        pa.array(target.astype(np.int32), mask=~has_next),
                        pa.array(vocab[target], pa.string(), mask=~has_next),
                        pa.array(target_p, mask=~has_next),
                        pa.array(rank.astype(np.int32), mask=~has_next),
                    ],
                    schema=self.result_schema(),
                )
            )
        return pa.concat_tables(parts)

    def _layers(self, inputs: ShardInputs, seq: np.ndarray, pos: np.ndarray):
        """(layer, [rows, d_model] float32) per layer, rows aligned with (seq, pos)."""
        import pyarrow.compute as pc

        for family, layer in self._states(inputs.manifest):
            table = inputs.activations[family]
            table = table.filter(pc.equal(table.column("layer"), layer))
            t_seq = table.column("seq_id").to_numpy()
            t_pos = table.column("pos").to_numpy()
            order = np.lexsort((t_pos, t_seq))
            if not (np.array_equal(t_seq[order], seq) and np.array_equal(t_pos[order], pos)):
                raise ValueError(f"shard {inputs.shard}: {family} rows do not match its tokens")
            dims = [c for c in table.column_names if c.startswith("d") and c[1:].isdigit()]
            matrix = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in dims])[
                order
            ]
            yield (-1 if family == "resid_pre" else layer), matrix


def _lens(model, resid: np.ndarray, target: np.ndarray):
    """Top-1 ids and probs, and the target's prob and rank, chunk by chunk."""
    import torch

    top1, top1_p, target_p, rank = [], [], [], []
    weight_dtype = next(model.model.parameters()).dtype
    with torch.inference_mode():
        for lo in range(0, len(resid), ROWS_PER_CHUNK):
            x = torch.from_numpy(resid[lo : lo + ROWS_PER_CHUNK]).to(model.device, weight_dtype)
            logits = model.unembed(model.ln_final(x)).float()
            logp = torch.log_softmax(logits, dim=-1)
            tgt = torch.from_numpy(target[lo : lo + ROWS_PER_CHUNK]).to(model.device).long()
            best = logp.max(dim=-1)
            tgt_logit = logits.gather(1, tgt[:, None])
            top1.append(best.indices.cpu().numpy())
            top1_p.append(best.values.exp().cpu().numpy())
            target_p.append(logp.gather(1, tgt[:, None])[:, 0].exp().cpu().numpy())
            rank.append(((logits > tgt_logit).sum(dim=-1) + 1).cpu().numpy())
    return (
        np.concatenate(top1),
        np.concatenate(top1_p).astype(np.float32),
        np.concatenate(target_p).astype(np.float32),
        np.concatenate(rank),
    )
