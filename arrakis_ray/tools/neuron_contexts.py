"""Contexts of the neuron dashboard: top-k tokens and a quantile sample of active tokens.

A context is the tokens from ``pos - window`` to ``pos + window`` of the sequence, the
centre token in ``[brackets]`` and ``…`` where the sequence goes on; texts are
concatenated when the vocabulary carries its own spaces (GPT-2 style ``" the"``), else
joined with a space. It equals the catalog's ``context_window`` macro.

Top contexts: each shard keeps its own top ``k`` per neuron (ties: lower seq_id, then
lower pos first) with the context text, and the merge keeps the global top ``k`` by the
same order.

Quantile contexts (what Neuronpedia shows under "activation quantiles"): a uniform
sample, without replacement, of each neuron's ACTIVE tokens (activation > threshold),
split by activation into equal-count intervals. Every (token, neuron) gets the priority
``sample_hash(seq_id, pos, layer, neuron)``, a splitmix64 hash of its key: it depends on
nothing else (not on the shard, not on the activation), so the ``samples`` active tokens
of smallest priority (ties: lower seq_id, then lower pos) are a uniform random sample
(bottom-k sampling), and the global sample is the bottom ``samples`` of the union of
every shard's bottom ``samples``: shards merge exactly. The merge then orders the
sample by activation (ties: seq_id, pos) and gives the r-th of its m tokens
(r = 0..m-1) the interval ``floor(r * intervals / m)``: intervals of equal count (up to
one), interval 0 the lowest activations. A neuron with fewer active tokens than
``samples`` shows them all; with fewer than ``intervals``, some intervals are empty.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.numerics import rank_within_groups

if TYPE_CHECKING:
    import pyarrow as pa

_SPACED = re.compile(r"^ \S")  # a token text that carries its own leading space
_LEAST = np.iinfo(np.int64).min  # the score of an inactive token: below every priority
# splitmix64 (Steele, Lea and Flood 2014): increment and finaliser constants
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class ContextText:
    """Context text of a token: its window of the sequence, the centre in brackets."""

    def __init__(self, tokens, vocab, window: int):
        tokens = tokens.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        seq = tokens["seq_id"].to_numpy()
        self.texts = tokens["token_text"].to_pylist()
        first = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
        ends = np.r_[first[1:], len(seq)]
        self.spans = {int(seq[i]): (int(i), int(e)) for i, e in zip(first, ends, strict=True)}
        spaced = any(isinstance(v, str) and _SPACED.match(v) for v in vocab)
        self.sep = "" if spaced else " "
        self.window = window
        self._cache: dict[tuple[int, int], str] = {}

    def __call__(self, seq: int, pos: int) -> str:
        key = (seq, pos)
        if key not in self._cache:
            start, end = self.spans[seq]  # positions run 0..length-1 within a sequence
            lo, hi = max(0, pos - self.window), min(end - start - 1, pos + self.window)
            words = self.texts[start + lo : start + hi + 1]
            words[pos - lo] = f"[{words[pos - lo]}]"
            text = self.sep.join(words)
            left = "…" + self.sep if lo > 0 else ""
            right = self.sep + "…" if hi < end - start - 1 else ""
            self._cache[key] = left + text + right
        return self._cache[key]


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (uint64 arithmetic wraps modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def sample_hash(seq, pos, layer, neuron) -> np.ndarray:
    """Sampling priority of (token, neuron): int64 in [0, 2^63), numpy-broadcast.

    ``mix(mix(seq * G + pos) ^ mix(layer * G + neuron)) >> 1`` in uint64 arithmetic,
    ``mix`` the splitmix64 finaliser and ``G = 0x9E3779B97F4A7C15``.
    """

    def u64(x) -> np.ndarray:  # negative layers (-1: before the blocks) wrap around
        return np.asarray(x, np.int64).astype(np.uint64)

    with np.errstate(over="ignore"):
        token = _mix(u64(seq) * _GOLDEN + u64(pos))
        unit = _mix(u64(layer) * _GOLDEN + u64(neuron))
        return (_mix(token ^ unit) >> np.uint64(1)).astype(np.int64)


def top_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the k largest values of each column; ties: lower row first."""
    n = x.shape[0]
    kth = np.partition(x, n - k, axis=0)[n - k]  # k-th largest per column
    above = x > kth
    tie = x == kth
    need = k - above.sum(0)
    return np.nonzero(above | (tie & (np.cumsum(tie, axis=0) <= need)))


def sample_rows(active: np.ndarray, priority: np.ndarray, k: int):
    """(rows, columns) of the k active rows of smallest priority of each column (all of
    them when fewer); ties: lower row first. Rows must be in (seq_id, pos) order."""
    score = np.where(active, -priority, _LEAST)  # every active score > _LEAST
    rows, cols = top_rows(score, min(k, active.shape[0]))
    keep = active[rows, cols]
    return rows[keep], cols[keep]


def candidates(neuron, row, value, seq, pos, contexts: ContextText, priority=None) -> dict:
    """Columns of candidate contexts (``priority`` too for the quantile sample)."""
    import pyarrow as pa

    columns = {
        "neuron": neuron,
        "seq_id": seq[row],
        "pos": pos[row],
        "activation": value.astype(np.float32),
        "context": pa.array(
            [contexts(int(s), int(p)) for s, p in zip(seq[row], pos[row], strict=True)],
            pa.string(),
        ),
    }
    if priority is not None:
        columns["priority"] = priority
    return columns


def _arrays(table: pa.Table, names: tuple[str, ...]) -> list[np.ndarray]:
    return [table[c].to_numpy(zero_copy_only=False) for c in names]


def merge_top(table: pa.Table, k: int) -> pa.Table:
    """The global top ``k`` of every (family, layer, neuron), with ``rank`` (1 = largest)."""
    import pyarrow as pa

    family, layer, neuron, act, seq, pos = _arrays(
        table, ("family", "layer", "neuron", "activation", "seq_id", "pos")
    )
    rows, rank = rank_within_groups([family.astype(str), layer, neuron], [-act, seq, pos], k=k)
    return table.take(pa.array(rows)).append_column("rank", pa.array(rank))


def merge_quantiles(table: pa.Table, samples: int, intervals: int) -> dict:
    """``neuron_quantile_contexts`` columns (no run_id) from every shard's candidates."""
    import pyarrow as pa

    if table.num_rows == 0:
        return {c: table[c] for c in table.column_names} | {
            c: np.zeros(0) for c in ("interval", "interval_low", "interval_high", "rank")
        }
    names = ("family", "layer", "neuron", "priority", "seq_id", "pos")
    family, layer, neuron, priority, seq, pos = _arrays(table, names)
    unit = [family.astype(str), layer, neuron]
    rows, _ = rank_within_groups(unit, [priority, seq, pos], k=samples)
    table = table.take(pa.array(rows))
    # the sample in activation order: interval floor(r * intervals / m) for the r-th of m
    family, layer, neuron, act, seq, pos = _arrays(
        table, ("family", "layer", "neuron", "activation", "seq_id", "pos")
    )
    rows, rank = rank_within_groups([family.astype(str), layer, neuron], [act, seq, pos])
    table, r = table.take(pa.array(rows)), rank - 1
    size = np.diff(np.r_[np.flatnonzero(r == 0), len(r)])  # m: each neuron's sample
    m = np.repeat(size, size)
    interval = r * intervals // m
    first = -(-(interval * m) // intervals)  # r of the interval's first token
    # runs of one (neuron, interval): their activations are ascending
    run = np.flatnonzero(np.r_[True, (r[1:] == 0) | (interval[1:] != interval[:-1])])
    length = np.diff(np.r_[run, len(r)])
    act = table["activation"].to_numpy()
    return {
        **{c: table[c] for c in ("family", "layer", "neuron")},
        "interval": interval,
        "interval_low": np.repeat(act[run], length),
        "interval_high": np.repeat(act[run + length - 1], length),
        "rank": r - first + 1,
        **{c: table[c] for c in ("seq_id", "pos", "activation", "context")},
    }
