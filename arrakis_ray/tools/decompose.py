"""Stored rows of a shard, and its residual stream as a sum of components.

A shared helper of the tools, not a tool itself (it defines no ``Tool``): reading rows
out of a shard's wide activation tables (``RowIndex``, ``gather``; ``layer_matrix`` is
the store reader's) and the residual decomposition of the DLA tools.

Every residual-stream state is a sum of what wrote into it:

    resid_pre[L] = embed + pos_embed + sum_{l < L} (attn_out[l] + mlp_out[l])
    attn_out[l]  = sum_h z[l][..., h, :] @ W_O[l][h] + b_O[l]

(for sequential and parallel blocks alike: a parallel block adds attn and mlp outputs
to the same input). ``ShardComponents`` rebuilds those parts from a shard's stored
``embed``, ``pos_embed``, ``attn_z`` and ``mlp_out`` tables plus the model's W_O/b_O, a
chunk of rows at a time so memory stays bounded on big shards. The final norm the DLA
tools freeze is ``arrakis_ray.models.norms.final_norm``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook
from arrakis_ray.store.reader import dim_columns, layer_matrix  # noqa: F401 (tools use them)

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.models import HookedModel
    from arrakis_ray.store.manifest import RunManifest
    from arrakis_ray.tools.base import ShardInputs

log = logging.getLogger(__name__)

POS_SPAN = 1 << 31  # pos is int32: seq * POS_SPAN + pos is a unique int64 key
CHUNK_FLOATS = 1 << 24  # floats per chunk of per-head outputs: 64 MiB of float32


# --------------------------------------------------------------------- params


def check_positions(value: Any) -> str | tuple[int, ...]:
    """``"all"``, ``"last"`` or a tuple of ints (negative counts from a sequence's end)."""
    if value in ("all", "last"):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)  # one position, given bare
    if isinstance(value, list | tuple) and value:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
            return tuple(value)
    raise ValueError(
        f"positions must be 'all', 'last', an integer or a non-empty list of integers, "
        f"got {value!r}"
    )


def check_token(value: Any, field: str) -> str | int | None:
    """A token given as its text (str) or its id (int >= 0), or None."""
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{field} must be a token's text or its id (an integer >= 0), got {value!r}")


def token_id(value: str | int, vocab: np.ndarray, field: str) -> int:
    """Resolve a token given as text or id against the run's vocabulary."""
    import difflib

    if isinstance(value, int):
        if value >= len(vocab):
            raise ToolError(
                f"{field}: token id {value} is outside the vocabulary (0..{len(vocab) - 1})"
            )
        return value
    ids = np.flatnonzero(vocab == value)
    if len(ids) == 1:
        return int(ids[0])
    if len(ids) > 1:
        raise ToolError(
            f"{field}: {value!r} is the text of several token ids {ids.tolist()[:8]}; "
            "give the id instead"
        )
    close = difflib.get_close_matches(value, [str(t) for t in vocab], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ToolError(f"{field}: no token of the run's vocabulary has the text {value!r}{hint}")


# --------------------------------------------------------------------- rows


def sorted_tokens(tokens: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq_id, pos, token_id) of a shard's tokens, sorted by (seq_id, pos)."""
    seq = tokens.column("seq_id").to_numpy()
    pos = tokens.column("pos").to_numpy()
    order = np.lexsort((pos, seq))
    return seq[order], pos[order], tokens.column("token_id").to_numpy()[order]


def select_positions(seq: np.ndarray, pos: np.ndarray, positions: str | tuple[int, ...]):
    """Boolean mask of the (sorted) rows whose position is selected."""
    if positions == "all":
        return np.ones(len(seq), dtype=bool)
    # rows are sorted by (seq, pos): a sequence's last row is where its seq_id ends
    last_row = np.searchsorted(seq, seq, side="right") - 1
    if positions == "last":
        return np.arange(len(seq)) == last_row
    length = pos[last_row].astype(np.int64) + 1
    wanted = np.zeros(len(seq), dtype=bool)
    for p in positions:
        wanted |= pos == (p if p >= 0 else length + p)
    return wanted


def next_tokens(seq: np.ndarray, pos: np.ndarray, ids: np.ndarray):
    """(next token id, has-next mask) of sorted rows: the next row of the same sequence."""
    has_next = np.append((seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1] + 1), False)
    return np.append(ids[1:], 0), has_next


class RowIndex:
    """Where each wanted (seq_id, pos) row sits in the stored tables of one shard."""

    def __init__(self, seq: np.ndarray, pos: np.ndarray, shard: int):
        self.keys = seq.astype(np.int64) * POS_SPAN + pos.astype(np.int64)
        self.seq, self.pos, self.shard = seq, pos, shard
        self._layers: dict[int, np.ndarray] = {}

    def locate(self, table: pa.Table, family: str, layer: int, n_heads: int = 0) -> np.ndarray:
        """Row numbers in ``table``: ``[n]`` for a dense family, ``[n, n_heads]`` per head."""
        layers = self._layers.get(id(table))
        if layers is None:
            layers = self._layers[id(table)] = table.column("layer").to_numpy()
        rows = np.flatnonzero(layers == layer)
        keys = (
            table.column("seq_id").to_numpy()[rows].astype(np.int64) * POS_SPAN
            + table.column("pos").to_numpy()[rows]
        )
        want = self.keys
        if n_heads:
            keys = keys * n_heads + table.column("head").to_numpy()[rows]
            want = (want[:, None] * n_heads + np.arange(n_heads)).ravel()
        order = np.argsort(keys, kind="stable")
        at = np.searchsorted(keys[order], want).clip(max=max(len(keys) - 1, 0))
        found = keys[order][at] == want if len(keys) else np.zeros(len(want), dtype=bool)
        if not found.all():
            i = int(np.argmin(found)) // max(n_heads, 1)
            raise ToolError(
                f"shard {self.shard}: stored {family} has no layer-{layer} row for "
                f"seq_id {self.seq[i]}, pos {self.pos[i]} (the run's tables are inconsistent)"
            )
        found_rows = rows[order[at]]
        return found_rows.reshape(-1, n_heads) if n_heads else found_rows


def gather(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """``[len(rows), d]`` float32 values of the given rows of a wide table."""
    import pyarrow as pa

    taken = table.take(pa.array(rows.ravel()))
    return np.column_stack(
        [taken.column(c).to_numpy().astype(np.float32) for c in dim_columns(taken.column_names)]
    )


def dense_matrix(inputs: ShardInputs, family: str, layer: int, index: RowIndex) -> np.ndarray:
    """One layer of a dense family for the index's rows, ``[n, d]`` float32."""
    table = inputs.activations[family]
    return gather(table, index.locate(table, family, layer))


# --------------------------------------------------------------------- components


@dataclass(frozen=True)
class Catalogue:
    """Names of the components, in the order their vectors are produced."""

    names: list[str]
    layers: list[int | None]  # block that wrote it; None for embeddings
    heads: list[int | None]

    def __len__(self) -> int:
        return len(self.names)


class ShardComponents:
    """Component vectors of some rows of a shard, for blocks ``0 .. n_blocks - 1``.

    Components, in order: ``embed``, ``pos_embed`` (if the model has one), then for each
    block l: heads ``L{l}H{h}``, ``L{l}.attn_bias`` (if the attention has an output
    bias), ``L{l}.mlp``. Their sum is ``blocks.{n_blocks}.hook_resid_pre``.
    """

    def __init__(self, inputs: ShardInputs, model: HookedModel, index: RowIndex, n_blocks: int):
        from arrakis_ray.models.weights import attention_weights

        self.inputs, self.model, self.index = inputs, model, index
        self.n_blocks = n_blocks
        missing = [
            f
            for f, needed in (
                ("embed", True),
                ("pos_embed", model.adapter.pos_embed is not None),
                ("attn_z", n_blocks > 0),
                ("mlp_out", n_blocks > 0),
            )
            if needed and f not in inputs.activations
        ]
        if missing:
            raise ToolError(
                f"shard {inputs.shard}: the residual decomposition needs the stored hook "
                f"families {', '.join(missing)}, which these inputs lack"
            )
        self.has_pos = model.adapter.pos_embed is not None
        self.w_o, self.b_o = [], []
        for layer in range(n_blocks):
            weights = attention_weights(model, layer)
            self.w_o.append(weights.W_O)
            self.b_o.append(weights.b_O)
        self._rows = {}  # (family, layer) -> row numbers in the stored table
        names, layers, heads = ["embed"], [None], [None]
        if self.has_pos:
            names.append("pos_embed")
            layers.append(None)
            heads.append(None)
        for layer in range(n_blocks):
            for head in range(model.n_heads):
                names.append(f"L{layer}H{head}")
                layers.append(layer)
                heads.append(head)
            if self.b_o[layer] is not None:
                names.append(f"L{layer}.attn_bias")
                layers.append(layer)
                heads.append(None)
            names.append(f"L{layer}.mlp")
            layers.append(layer)
            heads.append(None)
        self.catalogue = Catalogue(names, layers, heads)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` small enough for one layer's per-head outputs."""
        n = len(self.index.keys)
        step = max(1, CHUNK_FLOATS // (self.model.n_heads * self.model.d_model))
        for lo in range(0, n, step):
            yield lo, min(n, lo + step)

    def _take(self, family: str, layer: int, lo: int, hi: int, heads: int = 0) -> np.ndarray:
        key = (family, layer)
        if key not in self._rows:
            table = self.inputs.activations[family]
            self._rows[key] = self.index.locate(table, family, layer, heads)
        return gather(self.inputs.activations[family], self._rows[key][lo:hi])

    def groups(self, lo: int, hi: int) -> Iterator[tuple[int, int | None, Tensor]]:
        """``(first component index, block or None, vectors [k, hi - lo, d_model])``."""
        import torch

        dev = self.model.device
        m = hi - lo

        def tensor(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a).to(dev)

        i = 0
        for family in ("embed", "pos_embed") if self.has_pos else ("embed",):
            yield i, None, tensor(self._take(family, -1, lo, hi))[None]
            i += 1
        h = self.model.n_heads
        for layer in range(self.n_blocks):
            z = tensor(self._take("attn_z", layer, lo, hi, h)).reshape(m, h, -1)
            # per-head output z_h @ W_O[h]: [head, row, d_model]
            yield i, layer, torch.einsum("mhe,hed->hmd", z, self.w_o[layer])
            i += h
            if self.b_o[layer] is not None:
                yield i, layer, self.b_o[layer].expand(1, m, -1)
                i += 1
            yield i, layer, tensor(self._take("mlp_out", layer, lo, hi))[None]
            i += 1


def decomposition_hooks(manifest: RunManifest, n_blocks: int) -> list[str]:
    """Hook names ``ShardComponents`` reads for blocks ``0 .. n_blocks - 1``."""
    families = ["embed"]
    if manifest.shape.positional == "learned":
        families.append("pos_embed")
    hooks = [family_hook(family) for family in families]
    for layer in range(n_blocks):
        hooks += [family_hook("attn_z", layer), family_hook("mlp_out", layer)]
    return hooks
