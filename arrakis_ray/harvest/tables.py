"""Captured tensors -> Arrow tables in the store's layouts (see ``schemas/README.md``).

Only real tokens become rows: padding never reaches the store. Dense and per-head
activations are wide (one column per dimension, so a one-neuron query reads one
column); attention patterns are long (one row per query/key pair with k <= q).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def dense_table(
    schema: pa.Schema,
    run_id: str,
    layer: int,
    values,
    mask: np.ndarray,
    seq_ids: np.ndarray,
) -> pa.Table:
    """Rows (seq, pos) of a ``[batch, pos, d]`` activation (torch or numpy), real tokens only."""
    seq_idx, pos = np.nonzero(mask)
    by_dim = _columns(values, mask, values.shape[-1], schema)
    return _wide(schema, run_id, layer, seq_ids[seq_idx], pos, None, by_dim)


def head_table(
    schema: pa.Schema,
    run_id: str,
    layer: int,
    values,
    mask: np.ndarray,
    seq_ids: np.ndarray,
) -> pa.Table:
    """Rows (seq, pos, head) of a ``[batch, pos, head, d_head]`` activation."""
    seq_idx, pos = np.nonzero(mask)
    n_heads = values.shape[2]
    by_dim = _columns(values, mask, values.shape[3], schema)
    return _wide(
        schema,
        run_id,
        layer,
        np.repeat(seq_ids[seq_idx], n_heads),
        np.repeat(pos, n_heads),
        np.tile(np.arange(n_heads), len(pos)),
        by_dim,
    )


def _columns(values, mask: np.ndarray, width: int, schema: pa.Schema) -> np.ndarray:
    """``[width, rows]``: the real tokens' values, one contiguous row per dimension.

    Done in torch: the gather, the cast to the storage dtype and the transpose are one
    parallel copy (numpy's float16 transpose is single-threaded: 2.5x slower, measured
    in benchmarks/BENCHMARKS.md). Rows follow ``np.nonzero(mask)`` order.
    """
    import torch

    dtype = torch.float16 if schema.field("d0").type == pa.float16() else torch.float32
    flat = torch.as_tensor(values).reshape(mask.size, -1)
    keep = torch.from_numpy(np.ascontiguousarray(mask).reshape(-1))
    if not bool(keep.all()):
        flat = flat[keep.to(flat.device)]
    return flat.reshape(-1, width).T.to(dtype).contiguous().cpu().numpy()


def pattern_table(
    schema: pa.Schema,
    run_id: str,
    layer: int,
    pattern: np.ndarray,
    lengths: np.ndarray,
    seq_ids: np.ndarray,
) -> pa.Table:
    """Rows (seq, head, q_pos, k_pos) of a ``[batch, head, q, k]`` pattern, k <= q < length."""
    parts = []
    n_heads = pattern.shape[1]
    for b, length in enumerate(lengths):
        q, k = np.tril_indices(int(length))
        weights = pattern[b][:, q, k]  # [head, pairs]
        parts.append(
            (
                np.full(weights.size, seq_ids[b], dtype=np.int64),
                np.repeat(np.arange(n_heads, dtype=np.int16), len(q)),
                np.tile(q, n_heads),
                np.tile(k, n_heads),
                weights.reshape(-1),
            )
        )
    seq, head, q_pos, k_pos, weight = (np.concatenate(cols) for cols in zip(*parts, strict=True))
    n = len(seq)
    return pa.Table.from_arrays(
        [
            pa.array(np.full(n, run_id, dtype=object), pa.string()),
            pa.array(np.full(n, layer, dtype=np.int16)),
            pa.array(seq),
            pa.array(head),
            pa.array(q_pos.astype(np.int32)),
            pa.array(k_pos.astype(np.int32)),
            pa.array(weight.astype(np.float32)),
        ],
        schema=schema,
    )


def tokens_table(
    schema: pa.Schema,
    run_id: str,
    seq_ids: np.ndarray,
    doc_ids: np.ndarray,
    doc_pos: np.ndarray,
    input_ids: np.ndarray,
    mask: np.ndarray,
    vocab_text: np.ndarray,
) -> pa.Table:
    """One row per real token: ids, positions, source document and text.

    ``doc_ids``/``doc_pos``/``input_ids``/``mask`` are ``[batch, pos]``; the tokens table
    joins to every activation table on (run_id, seq_id, pos).
    """
    seq_idx, pos = np.nonzero(mask)
    token_ids = input_ids[seq_idx, pos].astype(np.int32)
    n = len(pos)
    return pa.Table.from_arrays(
        [
            pa.array(np.full(n, run_id, dtype=object), pa.string()),
            pa.array(seq_ids[seq_idx].astype(np.int64)),
            pa.array(pos.astype(np.int32)),
            pa.array(doc_ids[seq_idx, pos].astype(np.int64)),
            pa.array(doc_pos[seq_idx, pos].astype(np.int32)),
            pa.array(token_ids),
            pa.array(vocab_text[token_ids], pa.string()),
        ],
        schema=schema,
    )


def _wide(
    schema: pa.Schema,
    run_id: str,
    layer: int,
    seq: np.ndarray,
    pos: np.ndarray,
    head: np.ndarray | None,
    by_dim: np.ndarray,
) -> pa.Table:
    n = len(seq)
    columns = [
        pa.array(np.full(n, run_id, dtype=object), pa.string()),
        pa.array(np.full(n, layer, dtype=np.int16)),
        pa.array(seq.astype(np.int64)),
        pa.array(pos.astype(np.int32)),
    ]
    if head is not None:
        columns.append(pa.array(head.astype(np.int16)))
    columns.extend(pa.array(col) for col in by_dim)  # contiguous rows: zero-copy
    return pa.Table.from_arrays(columns, schema=schema)
