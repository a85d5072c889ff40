"""Ray Data batches of a harvest: one row per shard, columns of numpy arrays.

Shared by the two harvest steps (tokenize, then the hooked-model stages).
"""

from __future__ import annotations

import numpy as np

from arrakis_ray.harvest.inputs import Shard

SHARD_FIELDS = ("shard", "file", "format", "offset", "count", "first_doc")


def shard_of(row: dict) -> Shard:
    """The shard descriptor carried by a batch row."""
    return Shard(**{k: row[k] for k in SHARD_FIELDS})


def describe_shard(shard: Shard) -> str:
    last = shard.first_doc + shard.count - 1
    return f"shard {shard.shard} ({shard.file}, documents {shard.first_doc}-{last})"


def batch_rows(batch: dict[str, np.ndarray]):
    """The rows of a columnar Ray Data batch, as dicts."""
    n = len(next(iter(batch.values())))
    for i in range(n):
        yield {
            k: (v[i].item() if hasattr(v[i], "item") and np.ndim(v[i]) == 0 else v[i])
            for k, v in batch.items()
        }


def batch_column(values: list) -> np.ndarray:
    """A batch column; ragged arrays become an object array (one array per shard)."""
    if values and isinstance(values[0], np.ndarray):
        col = np.empty(len(values), dtype=object)
        col[:] = values
        return col
    return np.asarray(values)
