"""The task: ``a + b mod p`` on all ``p^2`` pairs, written as the tokens ``a, b, =``.

Row ``i`` of ``all_pairs`` is ``(a, b) = (i // p, i % p)``, so any per-input array over
all pairs reshapes to ``[p (a), p (b)]``. The training split is a seeded 30 % of the
rows; the rest is the test set.
"""

from __future__ import annotations

import numpy as np

from arrakis_ray.studies.grokking.model import P

EQUALS = P
"""Token id of ``=`` (one past the numbers)."""
DATA_SEED = 598
"""Seed of the train/test split (the paper's notebook used 598)."""
FRAC_TRAIN = 0.3


def all_pairs(p: int = P) -> np.ndarray:
    """Token ids ``[p*p, 3]`` (int64): rows ``(a, b, =)`` with a the slow index."""
    a, b = np.divmod(np.arange(p * p), p)
    return np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int64)


def labels(p: int = P) -> np.ndarray:
    """The answer ``(a + b) mod p`` of each row of ``all_pairs``."""
    a, b = np.divmod(np.arange(p * p), p)
    return ((a + b) % p).astype(np.int64)


def train_mask(p: int = P, frac: float = FRAC_TRAIN, seed: int = DATA_SEED) -> np.ndarray:
    """Boolean ``[p*p]``: True for the ``int(frac * p^2)`` training rows (seeded)."""
    n = p * p
    chosen = np.random.default_rng(seed).permutation(n)[: int(frac * n)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def vocabulary(p: int = P) -> list[str]:
    """Token strings by id: ``"0"`` .. ``str(p-1)`` and ``"="``."""
    return [str(i) for i in range(p)] + ["="]


def pair_rows(a: np.ndarray, b: np.ndarray, p: int = P) -> np.ndarray:
    """Row of ``all_pairs`` (``a * p + b``) for each input; ValueError unless every pair
    of ``0..p-1`` appears exactly once (the Fourier analyses need the full grid)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.min(initial=0) < 0 or max(a.max(initial=0), b.max(initial=0)) >= p or b.min(initial=0) < 0:
        raise ValueError(f"the inputs hold tokens outside the numbers 0..{p - 1}")
    rows = a * p + b
    if len(rows) != p * p or len(np.unique(rows)) != p * p:
        raise ValueError(
            f"the inputs are not all {p}^2 = {p * p} pairs (a, b) once each "
            f"({len(np.unique(rows))} distinct of {len(rows)})"
        )
    return rows


def sequence_pairs(
    seq_id: np.ndarray, pos: np.ndarray, token_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(seq_ids, a, b)`` of stored sequences from their token rows (pos 0 is a, pos 1 b)."""
    seq_id, pos, token_id = map(np.asarray, (seq_id, pos, token_id))
    seqs = np.unique(seq_id)
    a = np.full(len(seqs), -1, dtype=np.int64)
    b = np.full(len(seqs), -1, dtype=np.int64)
    where = np.searchsorted(seqs, seq_id)
    a[where[pos == 0]] = token_id[pos == 0]
    b[where[pos == 1]] = token_id[pos == 1]
    return seqs, a, b
