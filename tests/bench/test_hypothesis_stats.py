"""test_hypothesis statistics equal scipy.stats, closed forms and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from arrakis_ray.bench import hypothesis
from arrakis_ray.bench.hypothesis import compare_samples, samples_from
from arrakis_ray.bench.student_t import student_t_cdf, student_t_sf
from arrakis_ray.errors import ConfigError, DataError

RTOL = 1e-10
ALTERNATIVES = ("two-sided", "greater", "less")


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _samples(n_a: int, n_b: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0, n_a), rng.normal(0.0, 1.7, n_b)


# ------------------------------------------------------------------ Student t CDF


@pytest.mark.parametrize("df", [0.7, 1.0, 2.5, 30.0, 1e4])
def test_t_cdf_and_tails_match_scipy(df):
    t = np.concatenate([-np.logspace(-3, 2.5, 45), [0.0], np.logspace(-3, 2.5, 45)])
    mine_cdf = np.array([student_t_cdf(v, df) for v in t])
    mine_sf = np.array([student_t_sf(v, df) for v in t])
    # atol only covers values scipy returns as denormals (df=1e4, t~300: p < 1e-300)
    np.testing.assert_allclose(mine_cdf, stats.t.cdf(t, df), rtol=RTOL, atol=1e-300)
    np.testing.assert_allclose(mine_sf, stats.t.sf(t, df), rtol=RTOL, atol=1e-300)


def test_t_cdf_matches_closed_forms_for_df_1_and_2():
    """Cauchy (df=1) and df=2 have closed forms; at |t| ~ 1e-8 scipy itself is off by
    ~3e-9 for df=1, so these points check against the formulas only."""
    for t in (1e-8, 1e-3, 0.5, 3.0, 1e3, 1e8):
        # upper tails written without cancellation
        cauchy_sf = math.atan2(1.0, t) / math.pi
        r = math.sqrt(2 + t * t)
        df2_sf = 1.0 / (r * (r + t))
        assert student_t_sf(t, 1.0) == pytest.approx(cauchy_sf, rel=1e-13)
        assert student_t_sf(t, 2.0) == pytest.approx(df2_sf, rel=1e-13)
        assert student_t_cdf(-t, 1.0) == pytest.approx(cauchy_sf, rel=1e-13)
        assert student_t_cdf(t, 2.0) == pytest.approx(1.0 - df2_sf, rel=1e-13)


# ------------------------------------------------------------------ Welch


@pytest.mark.parametrize(
    "n_a, n_b, shift",
    [(2, 3, 0.8), (3, 2, -0.5), (3, 3, 0.1), (7, 12, 0.6), (500, 500, 0.1), (500, 40, -0.3)],
)
@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_welch_matches_scipy(n_a, n_b, shift, alternative):
    a, b = _samples(n_a, n_b, shift, seed=n_a * 1000 + n_b)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    got = compare_samples(a, b, alternative=alternative, n_permutations=99, n_bootstrap=99)
    assert got.welch_t == pytest.approx(ref.statistic, rel=RTOL)
    assert got.welch_df == pytest.approx(ref.df, rel=RTOL)
    assert got.welch_p == pytest.approx(ref.pvalue, rel=RTOL)


@pytest.mark.parametrize("alternative", ["two-sided", "greater"])
def test_welch_extreme_t_keeps_relative_accuracy(alternative):
    a = np.linspace(-1.0, 1.0, 20) + 2.2
    b = np.linspace(-1.2, 1.2, 20)[::-1] * np.array([1.0, 0.9] * 10)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    got = compare_samples(a, b, alternative=alternative, n_permutations=99, n_bootstrap=99)
    assert 1e-13 < ref.pvalue < 1e-11  # the deep tail, where 1 - cdf would lose it all
    assert got.welch_p == pytest.approx(ref.pvalue, rel=RTOL)
    less = compare_samples(a, b, alternative="less", n_permutations=99, n_bootstrap=99)
    assert less.welch_p == pytest.approx(
        1.0 - ref.pvalue / (2 if alternative == "two-sided" else 1)
    )


# ------------------------------------------------------------------ permutation test


def _scipy_exact(a, b, alternative, statistic=_mean_diff):
    return stats.permutation_test(
        (a, b),
        statistic,
        permutation_type="independent",
        n_resamples=np.inf,
        alternative=alternative,
        vectorized=True,
    ).pvalue


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.2, 3.4, 2.2, 5.0], [0.1, 1.5, 0.9]),
        ([3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 1.0, 0.0, 2.0, 1.0]),  # integer ties
        ([0.3, 0.1, 0.7], [0.2, 0.9, 0.4, 0.6, 0.8, 0.5]),
    ],
)
@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exact_permutation_p_matches_scipy(a, b, alternative):
    got = compare_samples(a, b, alternative=alternative, n_bootstrap=99)
    n_relabellings = math.comb(len(a) + len(b), len(a))
    assert got.permutation_exact and got.n_permutations == n_relabellings
    if alternative == "two-sided" and len(a) != len(b):
        # ours counts |diff| >= |observed|; scipy doubles the smaller tail, which agrees
        # only for equal sizes (a symmetric null): compare with scipy on |diff| instead
        ref = _scipy_exact(a, b, "greater", lambda x, y, axis=-1: np.abs(_mean_diff(x, y, axis)))
    else:
        ref = _scipy_exact(a, b, alternative)
    assert got.permutation_p == pytest.approx(ref, rel=1e-12)
    assert (got.permutation_p * n_relabellings) == pytest.approx(
        round(got.permutation_p * n_relabellings)
    )


def test_random_permutation_p_within_monte_carlo_error_of_exact():
    a, b = _samples(9, 9, 0.7, seed=7)  # C(18, 9) = 48620 relabellings
    exact = _scipy_exact(a, b, "two-sided")
    assert 0.02 < exact < 0.5
    n_perm = 9999
    got = compare_samples(a, b, n_permutations=n_perm, n_bootstrap=99, seed=5)
    assert not got.permutation_exact and got.n_permutations == n_perm
    hits = got.permutation_p * (n_perm + 1) - 1  # Phipson-Smyth: (1 + hits) / (1 + N)
    assert hits == pytest.approx(round(hits), abs=1e-6)
    assert abs(got.permutation_p - exact) < 4 * math.sqrt(exact * (1 - exact) / n_perm)
    ours_exact = compare_samples(a, b, n_permutations=48620, n_bootstrap=99)
    assert ours_exact.permutation_exact
    assert ours_exact.permutation_p == pytest.approx(exact, rel=1e-12)


def test_small_blocks_give_the_same_exact_p_and_valid_draws(monkeypatch):
    """Blocks bound memory only: exact enumeration is block-independent, and many small
    blocks of draws still land within Monte Carlo error."""
    a, b = _samples(6, 7, 0.9, seed=8)  # C(13, 6) = 1716 relabellings
    whole = compare_samples(a, b, n_bootstrap=99)
    monkeypatch.setattr(hypothesis, "BLOCK_VALUES", 50)  # 3 relabellings or resamples a block
    blocked = compare_samples(a, b, n_bootstrap=999)
    assert blocked.permutation_exact and blocked.permutation_p == whole.permutation_p
    drawn = compare_samples(a, b, n_permutations=999, n_bootstrap=99)
    assert not drawn.permutation_exact
    p = whole.permutation_p
    assert abs(drawn.permutation_p - p) < 4 * math.sqrt(p * (1 - p) / 999)
    assert blocked.ci_low < blocked.difference < blocked.ci_high


def test_random_permutation_p_is_never_zero():
    a, b = np.arange(20.0) + 100, np.arange(20.0)  # no relabelling beats the observed
    got = compare_samples(a, b, n_permutations=999, n_bootstrap=99)
    assert got.permutation_p == pytest.approx(1 / 1000)


# ------------------------------------------------------------------ bootstrap CI


def test_bootstrap_percentile_ci_within_monte_carlo_error_of_scipy():
    a, b = _samples(40, 30, 0.5, seed=11)
    n_boot, level = 9999, 0.95
    got = compare_samples(a, b, n_bootstrap=n_boot, ci_level=level, n_permutations=99)
    ref = stats.bootstrap(
        (a, b),
        _mean_diff,
        method="percentile",
        n_resamples=n_boot,
        confidence_level=level,
        vectorized=True,
        rng=np.random.default_rng(123),
    )
    # SE of an estimated q-quantile: sqrt(q (1 - q) / N) / density, density of a normal
    # bootstrap distribution at its 2.5% point; two independent estimates -> sqrt(2)
    sigma = ref.bootstrap_distribution.std()
    q = (1 - level) / 2
    density = math.exp(-(stats.norm.ppf(q) ** 2) / 2) / math.sqrt(2 * math.pi) / sigma
    tol = 4 * math.sqrt(2) * math.sqrt(q * (1 - q) / n_boot) / density
    assert abs(got.ci_low - ref.confidence_interval.low) < tol
    assert abs(got.ci_high - ref.confidence_interval.high) < tol
    assert got.ci_low < got.difference < got.ci_high
    # and the width is the normal-theory one, 2 * 1.96 * bootstrap SE, to MC error
    assert got.ci_high - got.ci_low == pytest.approx(2 * 1.96 * sigma, rel=0.05)


def test_bootstrap_resamples_each_sample_within_itself():
    """With b constant every resample of b has mean b: the CI is a's bootstrap shifted."""
    a, b = np.array([0.0, 1.0, 2.0, 6.0]), np.full(5, 10.0)
    got = compare_samples(a, b, n_bootstrap=4000, n_permutations=99)
    # a resample of a has mean in [0, 6]; its extremes have probability 4^-4 each
    assert -10.0 <= got.ci_low < got.ci_high <= -4.0


# ------------------------------------------------------------------ d, verdict, determinism


def test_cohens_d_and_moments_by_hand():
    got = compare_samples([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0], n_bootstrap=99)
    # means 2.5 and 4; variances 5/3 and 4; pooled (3 * 5/3 + 2 * 4) / 5 = 2.6
    assert (got.n_a, got.n_b) == (4, 3)
    assert got.mean_a == pytest.approx(2.5) and got.mean_b == pytest.approx(4.0)
    assert got.std_a == pytest.approx(math.sqrt(5 / 3)) and got.std_b == pytest.approx(2.0)
    assert got.difference == pytest.approx(-1.5)
    assert got.cohens_d == pytest.approx(-1.5 / math.sqrt(2.6), rel=1e-14)
    assert got.verdict.endswith(f"d={-1.5 / math.sqrt(2.6):.2f} (large)")


def test_verdict_flips_at_alpha():
    a, b = _samples(12, 15, 0.9, seed=7)
    p = compare_samples(a, b, n_permutations=99, n_bootstrap=99).welch_p
    above = compare_samples(a, b, alpha=p * 1.001, label_a="clean", label_b="corrupt")
    below = compare_samples(a, b, alpha=p * 0.999, label_a="clean", label_b="corrupt")
    assert above.reject and not below.reject
    assert above.verdict.startswith(f"reject H0 at alpha={p * 1.001:g}: mean clean - corrupt = ")
    assert below.verdict.startswith(f"do not reject H0 at alpha={p * 0.999:g}: ")
    assert f"Welch p={p:.2g}" in above.verdict and "(9999 permutations)" in above.verdict
    assert f"95% CI {above.ci_low:.3g}..{above.ci_high:.3g}" in above.verdict
    one_sided = compare_samples(a, b, alternative="greater", label_a="clean", label_b="corrupt")
    assert "(H1: clean > corrupt)" in one_sided.verdict


def test_same_seed_same_result_other_seed_other_draws():
    a, b = _samples(15, 15, 0.3, seed=2)
    first, again = compare_samples(a, b, seed=4), compare_samples(a, b, seed=4)
    assert first == again
    other = compare_samples(a, b, seed=5)
    assert other.welch_p == first.welch_p
    assert (other.permutation_p, other.ci_low) != (first.permutation_p, first.ci_low)


# ------------------------------------------------------------------ what an experiment returns


def test_samples_from_pairs_dicts_and_tensors():
    a, b, la, lb = samples_from(([1, 2, 3], np.array([4.0, 5.0])))
    assert (la, lb) == ("a", "b") and a.dtype == np.float64
    assert a.tolist() == [1.0, 2.0, 3.0] and b.tolist() == [4.0, 5.0]
    a, b, la, lb = samples_from({"corrupt": torch.tensor([0.5, 0.25]), "clean": [1, 2, 4]})
    assert (la, lb) == ("corrupt", "clean")  # the dict's order, not sorted
    assert a.tolist() == [0.5, 0.25] and b.tolist() == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "result, message",
    [
        (
            {"x": [1, 2], "y": [3, 4], "z": [5, 6]},
            "returned a dict with 3 conditions ('x', 'y', 'z')",
        ),
        (0.5, "my_exp returned a float (0.5); expected a pair (a, b) or {"),
        ([1.0, 2.0, 3.0], "my_exp returned a list ([1.0, 2.0, 3.0]); expected a pair"),
        ({"clean": 0.5, "corrupt": [1, 2]}, "sample 'clean' of my_exp is a float (0.5); each"),
        (([1.0, float("nan"), 2.0], [1, 2]), "sample 'a' of my_exp holds 1 non-finite value(s)"),
        (([1.0], [1, 2]), "sample 'a' of my_exp has 1 value(s); each sample needs at least 2"),
        (([[1.0, 2.0]], [1, 2]), "sample 'a' of my_exp has shape (1, 2); expected a 1-D"),
        ((["x", "y"], [1, 2]), "sample 'a' of my_exp is not numeric"),
    ],
)
def test_samples_from_refuses_other_shapes(result, message):
    with pytest.raises(DataError) as err:
        samples_from(result, name="my_exp")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_constant_samples_and_bad_parameters_are_refused():
    with pytest.raises(DataError, match=r"both samples are constant \('a' = 1 x2, 'b' = 2 x3\)"):
        compare_samples([1.0, 1.0], [2.0, 2.0, 2.0])
    one_constant = compare_samples([1.0, 1.0, 1.0], [2.0, 2.5, 3.0], n_bootstrap=99)
    assert one_constant.welch_df == pytest.approx(2.0)  # all the variance is b's: n_b - 1
    with pytest.raises(ConfigError, match="alternative must be one of two-sided, greater, less"):
        compare_samples([1, 2], [3, 4], alternative="bigger")
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, 1\), got 1.5"):
        compare_samples([1, 2], [3, 4], alpha=1.5)
    with pytest.raises(ConfigError, match="n_permutations must be an integer >= 1, got 0"):
        compare_samples([1, 2], [3, 4], n_permutations=0)
