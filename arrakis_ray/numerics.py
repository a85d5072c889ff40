"""Shared numerics of the analysis tools (numpy only): mergeable moments, ranks in groups.

``Moments`` holds, per element, the count ``n``, the mean and the *central* sums
``M_p = sum (x - mean)^p`` for p = 2..4, in float64. Partial moments of disjoint parts
combine exactly (Chan et al. 1979 for M2, Pebay 2008 for M3/M4): each part's sums are
shifted from its own mean to the combined mean ``mu`` (``d = mean_part - mu``)

    M2 = sum(m2 + n d^2)
    M3 = sum(m3 + 3 d m2 + n d^3)
    M4 = sum(m4 + 4 d m3 + 6 d^2 m2 + n d^4)

so a Ray task returns the moments of its shard and ``reduce`` merges them. Central sums,
not raw power sums: ``sum x^2 / n - mean^2`` loses every digit of the variance once the
mean is large next to the spread (values near 1e6 with unit noise in float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ORDERS = (2, 4)  # moment orders a Moments can carry: M2 only, or M2, M3 and M4


@dataclass(frozen=True, eq=False)
class Moments:
    """Count, mean and central sums M2 (and M3, M4) of every element, mergeable.

    ``n`` broadcasts against ``mean`` (a scalar count when all columns share it).
    Elements with ``n == 0`` hold mean 0 and zero sums: the identity of ``merge``.
    """

    n: np.ndarray
    """Count of values (float64, exact up to 2**53)."""
    mean: np.ndarray
    m2: np.ndarray
    """``sum (x - mean)^2``."""
    m3: np.ndarray | None = None
    """``sum (x - mean)^3``; None when only order 2 is tracked."""
    m4: np.ndarray | None = None
    """``sum (x - mean)^4``; None when only order 2 is tracked."""

    @property
    def order(self) -> int:
        """Highest moment carried: 2 or 4."""
        return 2 if self.m3 is None else 4

    # ------------------------------------------------------------------ building

    @classmethod
    def of(cls, x: np.ndarray, order: int = 4) -> Moments:
        """Moments of each column of ``x [n, ...]`` (over axis 0), two-pass in float64."""
        _check_order(order)
        x = np.asarray(x, dtype=np.float64)
        n = np.float64(x.shape[0])
        if not x.shape[0]:
            zeros = np.zeros(x.shape[1:])
            return cls(n, zeros, zeros, *((zeros, zeros) if order == 4 else ()))
        mean = x.mean(axis=0)
        d = x - mean
        # corrected two-pass: the rounding error of the first mean, removed
        fix = d.mean(axis=0)
        mean, d = mean + fix, d - fix
        d2 = d * d
        if order == 2:
            return cls(n, mean, d2.sum(axis=0))
        return cls(n, mean, d2.sum(axis=0), (d2 * d).sum(axis=0), (d2 * d2).sum(axis=0))

    @classmethod
    def of_groups(cls, values: np.ndarray, group: np.ndarray, size: int, order: int = 4) -> Moments:
        """Moments of the 1-D ``values`` per group id ``0 .. size - 1`` (shape ``[size]``)."""
        _check_order(order)
        values = np.asarray(values, dtype=np.float64)
        zeros = np.zeros(len(values))
        singles = cls(np.ones(len(values)), values, zeros, *((zeros, zeros) if order == 4 else ()))
        return singles.merge_groups(group, size)

    @classmethod
    def from_arrays(cls, columns: Mapping[str, object], prefix: str = "") -> Moments:
        """Rebuild from ``to_arrays`` columns (``{prefix}n``, ``{prefix}mean``, ``{prefix}m2``..).

        M3/M4 are read when ``{prefix}m3`` is present. Columns may be numpy arrays or
        anything ``np.asarray`` takes (pyarrow arrays, lists).
        """

        def get(name: str) -> np.ndarray:
            value = columns[prefix + name]
            if hasattr(value, "to_numpy"):
                value = value.to_numpy()
            return np.asarray(value, dtype=np.float64)

        n = get("n")
        high = (get("m3"), get("m4")) if prefix + "m3" in columns else ()
        moments = cls(n, get("mean"), get("m2"), *high)
        return moments._zero_empty()

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Columns ``{prefix}n`` (int64), ``{prefix}mean``, ``{prefix}m2``.. of equal shape."""
        shape = np.shape(self.mean)
        out = {
            f"{prefix}n": np.broadcast_to(self.n, shape).astype(np.int64),
            f"{prefix}mean": self.mean,
            f"{prefix}m2": self.m2,
        }
        if self.m3 is not None:
            out[f"{prefix}m3"], out[f"{prefix}m4"] = self.m3, self.m4
        return out

    # ------------------------------------------------------------------ merging

    def merge(self, other: Moments) -> Moments:
        """The moments of both parts' values together (element by element)."""
        if self.order != other.order:
            raise ValueError(f"cannot merge moments of order {self.order} and {other.order}")
        n = self.n + other.n
        with np.errstate(invalid="ignore", divide="ignore"):
            # Chan et al.: a small correction to one mean, not a sum of large products
            mu = self.mean + (other.mean - self.mean) * (other.n / n)
        mu = np.where(n > 0, mu, 0.0)
        a, b = self._shifted(mu), other._shifted(mu)
        return Moments(n, mu, *(x + y for x, y in zip(a, b, strict=True)))

    @staticmethod
    def merge_all(parts: Iterable[Moments]) -> Moments:
        """``merge`` of every part, in order (at least one part)."""
        parts = iter(parts)
        total = next(parts)
        for part in parts:
            total = total.merge(part)
        return total

    def merge_groups(self, group: np.ndarray, size: int | None = None) -> Moments:
        """Combine the rows (elements of 1-D moments) that share a group id.

        ``group[i]`` is row i's id in ``0 .. size - 1`` (default ``group.max() + 1``);
        the result has one element per id, an empty group (n = 0) included.
        """
        group = np.asarray(group, dtype=np.int64).ravel()
        size = int(group.max()) + 1 if size is None and len(group) else int(size or 0)
        n = np.broadcast_to(self.n, np.shape(self.mean)).ravel()
        flat = Moments(n, self.mean.ravel(), *(m.ravel() for m in self._sums()))._zero_empty()
        total = np.bincount(group, weights=n, minlength=size)
        # the mean as a shift from one member's mean: sums of small differences stay exact
        ref = np.zeros(size)
        ids, first = np.unique(group, return_index=True)
        ref[ids] = flat.mean[first]
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.bincount(group, weights=n * (flat.mean - ref[group]), minlength=size)
            mu = np.where(total > 0, ref + shift / total, 0.0)
        sums = [np.bincount(group, weights=s, minlength=size) for s in flat._shifted(mu[group])]
        return Moments(total, mu, *sums)

    def _sums(self) -> list[np.ndarray]:
        return [self.m2] if self.m3 is None else [self.m2, self.m3, self.m4]

    def _shifted(self, centre: np.ndarray) -> list[np.ndarray]:
        """This part's central sums taken about ``centre`` instead of its own mean."""
        has = self.n > 0
        d = np.where(has, self.mean - centre, 0.0)
        n, m2 = self.n, np.where(has, self.m2, 0.0)
        d2 = d * d
        out = [m2 + n * d2]
        if self.m3 is not None:
            m3, m4 = np.where(has, self.m3, 0.0), np.where(has, self.m4, 0.0)
            out += [m3 + 3 * d * m2 + n * d2 * d, m4 + 4 * d * m3 + 6 * d2 * m2 + n * d2 * d2]
        return out

    def _zero_empty(self) -> Moments:
        """Elements with n = 0 set to the merge identity (stored partials may hold NaN)."""
        has = self.n > 0
        return Moments(
            self.n,
            np.where(has, self.mean, 0.0),
            *(np.where(has, m, 0.0) for m in self._sums()),
        )

    # ------------------------------------------------------------------ statistics

    @property
    def variance(self) -> np.ndarray:
        """Population variance ``M2 / n`` (NaN where n = 0)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / self.n

    @property
    def sample_variance(self) -> np.ndarray:
        """Unbiased variance ``M2 / (n - 1)`` (NaN or inf where n < 2)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / (self.n - 1)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation ``sqrt(M2 / n)``."""
        return np.sqrt(self.variance)

    @property
    def skewness(self) -> np.ndarray:
        """Population skewness ``sqrt(n) M3 / M2^1.5`` (NaN where M2 = 0)."""
        self._need_high("skewness")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.n) * self.m3 / self.m2**1.5

    @property
    def excess_kurtosis(self) -> np.ndarray:
        """Population excess kurtosis ``n M4 / M2^2 - 3`` (0 for a Gaussian)."""
        self._need_high("excess_kurtosis")
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.n * self.m4 / self.m2**2 - 3.0

    def _need_high(self, what: str) -> None:
        if self.m3 is None:
            raise ValueError(f"{what} needs moments of order 4; these carry order 2 only")


def _check_order(order: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order}")


def rank_within_groups(
    groups: Sequence[np.ndarray], by: Sequence[np.ndarray], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, rank)``: rows sorted by group, then by ``by`` within a group, with ranks.

    ``groups`` and ``by`` are equal-length key arrays, each list most significant key
    first, all ascending (negate a numeric key to sort it descending). ``rows`` indexes
    the input in that order, ``rank`` is each row's 1-based place within its group. With
    ``k`` only the rows of rank ``<= k`` are returned (the top k of every group). Rows
    equal on every key keep their input order.
    """
    keys = [*groups, *by]
    if not keys:
        raise ValueError("rank_within_groups needs at least one key")
    order = np.lexsort(keys[::-1])  # lexsort's last key is the primary one
    size = len(order)
    starts = np.zeros(size, dtype=bool)
    starts[:1] = True
    for g in groups:  # a group starts where any group key changes
        g = np.asarray(g)[order]
        starts[1:] |= g[1:] != g[:-1]
    index = np.arange(size)
    # place within the group: index minus the index of the group's first row
    rank = index - np.maximum.accumulate(np.where(starts, index, 0)) + 1
    if k is not None:
        keep = rank <= k
        return order[keep], rank[keep]
    return order, rank
