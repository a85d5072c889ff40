"""Residual decomposition: the residual stream at a layer split into what wrote it.

At layer L (``blocks.L.hook_resid_pre``; L = n_layers is the stream after the last
block) the residual is exactly the sum of ``embed``, ``pos_embed``, every head
``z[h] @ W_O[h]`` of the blocks before L, their attention output biases and their MLP
outputs (sequential and parallel blocks alike; see ``decompose.py``). For each part the
table keeps its norm, its scalar projection on a chosen direction, and its scalar
projection on the residual itself (``c . r / |r|``), which adds up over the parts to
``|r|``: a signed share of the residual's length. The vectors themselves are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.decompose import (
    RowIndex,
    ShardComponents,
    check_positions,
    check_token,
    decomposition_hooks,
    select_positions,
    sorted_tokens,
    token_id,
)

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest


@dataclass(frozen=True)
class ResidualDecompositionParams:
    """Parameters of the residual decomposition."""

    layer: int | None = None
    """Residual stream to split: blocks.{layer}.hook_resid_pre, or n_layers for the
    stream after the last block; default: every layer 0..n_layers."""
    direction: tuple[float, ...] | None = None
    """Direction (d_model numbers) to project every part on; its length does not matter."""
    token: Any = None
    """Project on this token's unembedding column W_U[:, t] instead (text or id)."""
    positions: Any = "all"
    """Positions to decompose: "all", "last", a position or a list of them (negative
    counts from the end of each sequence)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", check_positions(self.positions))
        check_token(self.token, "token")
        if self.direction is not None and self.token is not None:
            raise ValueError("give a direction or a token to project on, not both")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")


class ResidualDecomposition(Tool):
    """Norm and projections of every additive part of the residual stream at a layer."""

    name = "residual_decomposition"
    summary = "residual stream at a layer = embeddings + heads + attention biases + MLPs"
    reference = "Elhage et al., 'A Mathematical Framework for Transformer Circuits' (2021)"
    Params = ResidualDecompositionParams
    needs_weights = True

    def _layers(self, manifest: RunManifest) -> list[int]:
        n_layers = manifest.shape.n_layers
        layer = self.params.layer
        if layer is not None and layer > n_layers:
            raise ToolError(
                f"residual_decomposition: layer {layer} is out of range for run "
                f"{manifest.run_id} ({n_layers} layers: 0..{n_layers}, where "
                f"{n_layers} is the stream after the last block)"
            )
        return list(range(n_layers + 1)) if layer is None else [layer]

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        direction = self.params.direction
        d_model = manifest.shape.d_model
        if direction is not None and len(direction) != d_model:
            raise ToolError(
                f"residual_decomposition: direction has {len(direction)} numbers but run "
                f"{manifest.run_id} has d_model {d_model}"
            )
        return decomposition_hooks(manifest, max(self._layers(manifest)))

    def compute_shard(self, inputs: ShardInputs, model) -> object:
        import pyarrow as pa

        layers = self._layers(inputs.manifest)
        self.required_hooks(inputs.manifest)  # the direction's width, checked again here
        seq, pos, _ = sorted_tokens(inputs.tokens)
        keep = select_positions(seq, pos, self.params.positions)
        seq, pos = seq[keep], pos[keep]
        parts = ShardComponents(inputs, model, RowIndex(seq, pos, inputs.shard), max(layers))
        unit = self._direction(inputs, model)
        cat = parts.catalogue
        names = np.array([*cat.names, "total"], dtype=object)
        comp_layer = np.array([-1 if v is None else v for v in cat.layers] + [-1], np.int16)
        comp_head = np.array([-1 if v is None else v for v in cat.heads] + [-1], np.int16)

        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "comp", "layer", "vals")}
        for lo, hi in parts.chunks():
            for layer, comp, vals in _decompose_chunk(parts, layers, lo, hi, unit):
                k = len(comp)
                columns["row"].append(np.tile(np.arange(lo, hi), k))
                columns["comp"].append(np.repeat(comp, hi - lo))
                columns["layer"].append(np.full(k * (hi - lo), layer, np.int16))
                columns["vals"].append(vals.reshape(3, -1))
        if columns["row"]:
            row, comp, layer = (np.concatenate(columns[k]) for k in ("row", "comp", "layer"))
            vals = np.concatenate(columns["vals"], axis=1)
        else:
            row = comp = np.zeros(0, np.int64)
            layer = np.zeros(0, np.int16)
            vals = np.zeros((3, 0), np.float32)
        n = len(row)
        return pa.Table.from_arrays(
            [
                pa.array(np.full(n, inputs.run_id, dtype=object), pa.string()),
                pa.array(seq[row].astype(np.int64)),
                pa.array(pos[row].astype(np.int32)),
                pa.array(layer),
                pa.array(names[comp], pa.string()),
                pa.array(comp_layer[comp], mask=comp_layer[comp] < 0),
                pa.array(comp_head[comp], mask=comp_head[comp] < 0),
                pa.array(vals[0]),
                pa.array(vals[1], mask=np.full(n, unit is None)),
                pa.array(vals[2]),
            ],
            schema=self.result_schema(),
        )

    def _direction(self, inputs: ShardInputs, model):
        """The unit direction to project on (a float32 tensor), or None."""
        import torch

        from arrakis_ray.models.weights import unembed_weights

        p = self.params
        if p.token is not None:
            w_u, _ = unembed_weights(model)
            vector = w_u[:, token_id(p.token, inputs.vocab, "token")]
        elif p.direction is not None:
            vector = torch.tensor(p.direction, dtype=torch.float32, device=model.device)
        else:
            return None
        length = vector.norm()
        if not length > 0:
            raise ToolError("residual_decomposition: the direction to project on has length 0")
        return vector / length


def _decompose_chunk(parts: ShardComponents, layers: list[int], lo: int, hi: int, unit):
    """``(layer, component indices, values [3, k, rows])`` for rows ``lo:hi``.

    values: norm, projection on ``unit`` (zeros without one), projection on the
    residual at ``layer``. Two passes over the parts: the residual at every wanted
    layer first (a running sum), then each part against it.
    """
    import torch

    with torch.inference_mode():
        # pass 1: the sum of the parts written before each block
        totals: dict[int, torch.Tensor] = {}
        running = None
        block = 0
        for _, source, vectors in parts.groups(lo, hi):
            layer_of = -1 if source is None else source
            while block <= layer_of:  # every part of the blocks before `block` is in
                totals[block] = running.clone()
                block += 1
            running = vectors.sum(0) if running is None else running + vectors.sum(0)
        while block <= max(layers):
            totals[block] = running.clone()
            block += 1
        directions = {}
        for layer in layers:
            length = totals[layer].norm(dim=-1, keepdim=True)
            directions[layer] = totals[layer] / length.clamp(min=torch.finfo(torch.float32).tiny)

        # pass 2: every part against the residual of each later layer
        out: list[tuple[int, np.ndarray, np.ndarray]] = []
        for first, source, vectors in parts.groups(lo, hi):
            layer_of = -1 if source is None else source
            norm = vectors.norm(dim=-1)
            proj = vectors @ unit if unit is not None else torch.zeros_like(norm)
            comp = np.arange(first, first + len(vectors))
            for layer in layers:
                if layer > layer_of:
                    along = torch.einsum("kmd,md->km", vectors, directions[layer])
                    vals = torch.stack([norm, proj, along]).cpu().numpy()
                    out.append((layer, comp, vals))
        total_index = np.array([len(parts.catalogue)])
        for layer in layers:
            r = totals[layer]
            norm = r.norm(dim=-1)
            proj = r @ unit if unit is not None else torch.zeros_like(norm)
            vals = torch.stack([norm, proj, norm]).cpu().numpy()[:, None]
            out.append((layer, total_index, vals))
        return out
