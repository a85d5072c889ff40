"""Merged moments equal one-pass numpy over all the data; ranks equal a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from arrakis_ray.numerics import Moments, rank_within_groups

OFFSET, NOISE = 1e6, 100.0  # values 1e6 + N(0, 100^2)


def _raw_variance(x: np.ndarray) -> np.ndarray:
    """The formula Moments replaced: ``sum_sq / n - mean^2`` from raw sums."""
    n = len(x)
    return (x * x).sum(0) / n - (x.sum(0) / n) ** 2


def _reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """Population mean, variance, skewness and excess kurtosis of each column, by numpy.

    The mean gets one correction pass (``mean + mean(x - mean)``): with a 1e6 offset,
    ``np.mean``'s own rounding (~1e-9) would move the third moment more than 1e-10.
    """
    mean = np.mean(x, axis=0)
    mean = mean + np.mean(x - mean, axis=0)
    d = x - mean
    var = np.mean(d**2, axis=0)
    m3, m4 = np.mean(d**3, axis=0), np.mean(d**4, axis=0)
    return {
        "mean": mean,
        "variance": var,
        "skewness": m3 / var**1.5,
        "excess_kurtosis": m4 / var**2 - 3.0,
    }


def _random_splits(n: int, k: int, rng) -> list[slice]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    edges = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _assert_matches(m: Moments, x: np.ndarray) -> None:
    want = _reference(x)
    assert np.all(m.n == len(x))
    for name, value in want.items():
        # skewness and kurtosis are unitless and often near 0: 1e-10 absolute as well
        atol = 1e-10 if name in ("skewness", "excess_kurtosis") else 0.0
        np.testing.assert_allclose(getattr(m, name), value, rtol=1e-10, atol=atol, err_msg=name)
    np.testing.assert_allclose(m.std, np.sqrt(want["variance"]), rtol=1e-10)
    np.testing.assert_allclose(
        m.sample_variance, np.var(x, axis=0, ddof=1), rtol=1e-10, err_msg="sample_variance"
    )


DATASETS = {
    "gaussian": lambda rng: rng.standard_normal((2000, 5)),
    "skewed": lambda rng: rng.exponential(2.0, (2000, 5)) - 3.0,
    "heavy_tails": lambda rng: rng.standard_t(5, (2000, 5)),
    # a large offset: raw power sums lose 8 digits of the variance here (test below)
    "offset": lambda rng: OFFSET + NOISE * rng.standard_normal((2000, 5)),
}


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("k", [1, 2, 7, 50])
def test_merging_random_splits_equals_one_pass(data, k):
    rng = np.random.default_rng(k)
    x = DATASETS[data](rng)
    parts = [Moments.of(x[s]) for s in _random_splits(len(x), k, rng)]
    _assert_matches(Moments.merge_all(parts), x)
    # merging in another order (a tree, as Ray's reduce might) gives the same
    rng.shuffle(parts)
    while len(parts) > 1:
        parts = [
            parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    _assert_matches(parts[0], x)


def test_table_round_trip_and_grouped_merge():
    """Partials as table columns (``to_arrays``), merged by group id, equal numpy."""
    rng = np.random.default_rng(0)
    x = OFFSET + NOISE * rng.standard_normal((900, 4))
    rows = []
    for s in _random_splits(len(x), 6, rng):
        rows.append(Moments.of(x[s]).to_arrays())
    table = {c: np.concatenate([r[c] for r in rows]) for c in rows[0]}
    group = np.tile(np.arange(4), 6)  # column id of every partial row
    merged = Moments.from_arrays(table).merge_groups(group, 4)
    _assert_matches(merged, x)


def test_of_groups_equals_per_group_numpy():
    rng = np.random.default_rng(1)
    values = OFFSET + NOISE * rng.standard_normal(3000)
    group = rng.integers(0, 5, 3000)
    m = Moments.of_groups(values, group, size=6)  # group 5 is empty
    for g in range(5):
        _assert_matches(Moments(m.n[g], m.mean[g], m.m2[g], m.m3[g], m.m4[g]), values[group == g])
    assert m.n[5] == 0 and np.isnan(m.variance[5])


@pytest.mark.parametrize("noise", [NOISE, 1e-3])
def test_the_raw_power_sum_formula_fails_where_moments_do_not(noise):
    rng = np.random.default_rng(2)
    x = OFFSET + noise * rng.standard_normal((5000, 3))
    want = _reference(x)["variance"]
    raw_error = np.abs(_raw_variance(x) / want - 1).max()
    parts = [Moments.of(x[s]) for s in _random_splits(len(x), 8, rng)]
    merged = Moments.merge_all(parts).variance
    if noise == NOISE:  # the raw formula keeps 6 to 7 digits, the merge all of them
        assert raw_error > 1e-8
        np.testing.assert_allclose(merged, want, rtol=1e-10)
    else:
        # not one correct digit from raw sums; each part's mean is stored to float64's
        # resolution at 1e6 (1e-10), 1e-7 of the spread, which bounds the merge
        assert raw_error > 1.0
        np.testing.assert_allclose(merged, want, rtol=1e-7)


def test_empty_parts_are_the_identity():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 2))
    empty = Moments.of(x[:0])
    merged = Moments.merge_all([empty, Moments.of(x[:10]), empty, Moments.of(x[10:])])
    _assert_matches(merged, x)
    assert np.isnan(Moments.merge_all([empty, empty]).variance).all()


def test_order_two_carries_no_higher_moments():
    m = Moments.of(np.arange(10.0)[:, None], order=2)
    assert m.order == 2 and m.m3 is None
    assert set(m.to_arrays("x_")) == {"x_n", "x_mean", "x_m2"}
    with pytest.raises(ValueError, match="order 4"):
        _ = m.skewness
    with pytest.raises(ValueError, match="order"):
        m.merge(Moments.of(np.arange(3.0)[:, None]))


def _rank_reference(groups, by, k=None):
    """Sorted row ids and ranks by plain Python: sort tuples, count within each group."""
    n = len(groups[0]) if groups else len(by[0])
    keys = [(tuple(g[i] for g in groups), tuple(b[i] for b in by), i) for i in range(n)]
    keys.sort()
    rows, ranks, last, r = [], [], None, 0
    for group, _, i in keys:
        r = r + 1 if group == last else 1
        last = group
        if k is None or r <= k:
            rows.append(i)
            ranks.append(r)
    return np.array(rows, dtype=np.int64), np.array(ranks, dtype=np.int64)


@pytest.mark.parametrize("k", [None, 1, 3])
def test_rank_within_groups_matches_a_plain_sort(k):
    rng = np.random.default_rng(4)
    n = 500
    layer, head = rng.integers(0, 3, n), rng.integers(0, 4, n)
    value = rng.integers(0, 6, n).astype(float)  # many ties
    seq = rng.integers(0, 5, n)
    rows, rank = rank_within_groups([layer, head], [-value, seq], k=k)
    want_rows, want_rank = _rank_reference([layer, head], [-value, seq], k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(rank, want_rank)


def test_rank_within_groups_string_keys_and_edges():
    family = np.array(["mlp", "attn", "mlp", "attn", "mlp"])
    value = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    rows, rank = rank_within_groups([family], [-value], k=2)
    assert rows.tolist() == [3, 1, 4, 2]
    assert rank.tolist() == [1, 2, 1, 2]
    rows, rank = rank_within_groups([], [value])  # one group: a plain ranking
    assert rows.tolist() == [0, 1, 2, 3, 4] and rank.tolist() == [1, 2, 3, 4, 5]
    rows, rank = rank_within_groups([np.zeros(0)], [np.zeros(0)], k=3)
    assert len(rows) == len(rank) == 0
