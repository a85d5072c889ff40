"""Two-sample statistics of ``test_hypothesis`` (numpy only: scipy is a test dependency).

An experiment returns two samples ``a`` and ``b`` (per-item values of a metric under two
conditions). ``compare_samples`` reports, for the difference of means ``a - b``:

- **Welch's t-test.** ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with the
  Welch-Satterthwaite degrees of freedom. Welch, not Student's pooled test: two
  conditions of an experiment (clean vs corrupted prompts, two layers) rarely share a
  variance, and Welch keeps its level when they do not while losing almost nothing
  when they do. The p-value comes from our own Student t CDF
  (``bench/student_t.py``).
- **A permutation test** of the same difference of means, free of the normality
  assumption. When the number of distinct relabellings ``C(n_a + n_b, n_a)`` is at most
  ``n_permutations`` all of them are enumerated and p is the exact fraction at least as
  extreme as the observed (the observed labelling counts). Otherwise ``n_permutations``
  random relabellings give ``p = (1 + #as-extreme) / (1 + n_permutations)`` (Phipson &
  Smyth 2010): the observed labelling is itself one draw from the null, so the +1 keeps
  the test exact at its level and p never 0. Two-sided means ``|diff| >= |observed|``.
- **A bootstrap confidence interval** of ``mean_a - mean_b``: percentile interval of
  ``n_bootstrap`` resamples, each sample resampled with replacement within itself (the
  two conditions are independent samples). Always two-sided at ``ci_level``.
- **Cohen's d** with the pooled standard deviation, labelled negligible/small/medium/
  large at Cohen's 0.2/0.5/0.8.
- **A verdict**: reject H0 when the Welch p is below ``alpha``.

Randomness comes from ``numpy.random.Generator`` streams spawned from ``seed`` (one for
the permutations, one for the bootstrap), so equal inputs and seed give equal results
and changing one count does not move the other statistic. Resampling runs in blocks of
about 2^20 values (bounded memory at any count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations, islice

import numpy as np

from arrakis_ray.bench.student_t import student_t_cdf, student_t_sf
from arrakis_ray.errors import ConfigError, DataError

ALTERNATIVES = ("two-sided", "greater", "less")  # H1 about mean_a - mean_b
BLOCK_VALUES = 1 << 20  # values per resampling block: 8 MiB of float64


@dataclass(frozen=True)
class HypothesisTest:
    """One two-sample comparison: a row of the ``hypotheses`` SQL view (fields = columns)."""

    alpha: float
    alternative: str
    """H1 about ``mean_a - mean_b``: "two-sided", "greater" (> 0) or "less" (< 0)."""
    label_a: str
    label_b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    std_a: float
    """Sample standard deviation (ddof=1)."""
    std_b: float
    difference: float
    """``mean_a - mean_b``."""
    welch_t: float
    welch_df: float
    welch_p: float
    permutation_p: float
    n_permutations: int
    """Relabellings drawn, or all of them (``C(n_a + n_b, n_a)``) when exact."""
    permutation_exact: bool
    ci_low: float
    ci_high: float
    ci_level: float
    n_bootstrap: int
    cohens_d: float
    reject: bool
    """``welch_p < alpha``."""
    verdict: str
    seed: int


def compare_samples(
    a,
    b,
    *,
    alpha: float = 0.05,
    alternative: str = "two-sided",
    n_permutations: int = 9999,
    n_bootstrap: int = 9999,
    ci_level: float = 0.95,
    seed: int = 0,
    label_a: str = "a",
    label_b: str = "b",
) -> HypothesisTest:
    """Welch, permutation, bootstrap CI, Cohen's d and a verdict for ``mean_a - mean_b``."""
    _check_params(alpha, alternative, n_permutations, n_bootstrap, ci_level, seed)
    x, y = _as_sample(a, label_a), _as_sample(b, label_b)
    _check_spread(x, y, label_a, label_b)
    n_a, n_b = len(x), len(y)
    var_a, var_b = float(np.var(x, ddof=1)), float(np.var(y, ddof=1))
    mean_a, mean_b = float(np.mean(x)), float(np.mean(y))
    diff = mean_a - mean_b

    se_a, se_b = var_a / n_a, var_b / n_b
    t = diff / math.sqrt(se_a + se_b)
    df = (se_a + se_b) ** 2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))
    welch_p = _t_pvalue(t, df, alternative)

    perm_rng, boot_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    perm_p, n_perm, exact = _permutation_p(x, y, alternative, n_permutations, perm_rng)
    ci_low, ci_high = _bootstrap_ci(x, y, n_bootstrap, ci_level, boot_rng)
    pooled_sd = math.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    d = diff / pooled_sd

    reject = welch_p < alpha
    h1 = "" if alternative == "two-sided" else f" (H1: {label_a} {_SIGN[alternative]} {label_b})"
    perms = f"exact over {n_perm} relabellings" if exact else f"{n_perm} permutations"
    verdict = (
        f"{'reject' if reject else 'do not reject'} H0 at alpha={alpha:g}{h1}: "
        f"mean {label_a} - {label_b} = {diff:.3g} "
        f"({ci_level * 100:g}% CI {ci_low:.3g}..{ci_high:.3g}), "
        f"Welch p={welch_p:.2g}, permutation p={perm_p:.2g} ({perms}), "
        f"d={d:.2f} ({_effect_size(d)})"
    )
    return HypothesisTest(
        alpha=float(alpha),
        alternative=alternative,
        label_a=label_a,
        label_b=label_b,
        n_a=n_a,
        n_b=n_b,
        mean_a=mean_a,
        mean_b=mean_b,
        std_a=math.sqrt(var_a),
        std_b=math.sqrt(var_b),
        difference=diff,
        welch_t=t,
        welch_df=df,
        welch_p=welch_p,
        permutation_p=perm_p,
        n_permutations=n_perm,
        permutation_exact=exact,
        ci_low=ci_low,
        ci_high=ci_high,
        ci_level=float(ci_level),
        n_bootstrap=int(n_bootstrap),
        cohens_d=d,
        reject=bool(reject),
        verdict=verdict,
        seed=int(seed),
    )


def samples_from(result, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray, str, str]:
    """The two samples (float64) and their labels in what an experiment returned.

    Accepts a pair ``(a, b)`` (labels "a", "b") or a mapping with exactly two conditions
    ``{"clean": [...], "corrupt": [...]}`` (labels = keys, in order); each sample a 1-D
    sequence, numpy array or torch tensor of per-item values. ``name`` (the experiment
    function) goes into error messages.
    """
    expected = "expected a pair (a, b) or {'condition': [values], 'other': [values]}"
    who = name or "the experiment"
    if isinstance(result, Mapping):
        if len(result) != 2:
            keys = ", ".join(repr(k) for k in result)
            raise DataError(
                f"test_hypothesis: {who} returned a dict with {len(result)} conditions "
                f"({keys}); {expected}"
            )
        (label_a, a), (label_b, b) = ((str(k), v) for k, v in result.items())
    elif isinstance(result, tuple | list) and len(result) == 2:
        (label_a, a), (label_b, b) = ("a", result[0]), ("b", result[1])
    else:
        raise DataError(f"test_hypothesis: {who} returned {_describe(result)}; {expected}")
    return _as_sample(a, label_a, name), _as_sample(b, label_b, name), label_a, label_b


# ----------------------------------------------------------------- Welch p-value


def _t_pvalue(t: float, df: float, alternative: str) -> float:
    if alternative == "greater":
        return student_t_sf(t, df)
    if alternative == "less":
        return student_t_cdf(t, df)
    return min(1.0, 2.0 * student_t_sf(abs(t), df))


# ----------------------------------------------------------------- resampling


def _permutation_p(
    x: np.ndarray, y: np.ndarray, alternative: str, n_permutations: int, rng: np.random.Generator
) -> tuple[float, int, bool]:
    """(p, relabellings used, exact?) of the difference of means under relabelling.

    A relabelling is summarised by the sum ``s`` of the values it calls ``a``: the
    difference of means ``s/n_a - (total - s)/n_b`` is a function of ``s`` alone.
    """
    n_a, n = len(x), len(x) + len(y)
    pooled = np.concatenate([x, y])
    pooled = pooled - pooled.mean()  # shift-invariant statistic; small values, small roundoff
    total = pooled.sum()
    # ties (relabellings with the same true sum) differ only by summation roundoff
    tol = 8 * n * np.finfo(np.float64).eps * float(np.abs(pooled).max())

    def count_extreme(sums: np.ndarray) -> int:
        diffs = sums / n_a - (total - sums) / (n - n_a)
        if alternative == "greater":
            return int(np.count_nonzero(diffs >= observed - tol))
        if alternative == "less":
            return int(np.count_nonzero(diffs <= observed + tol))
        return int(np.count_nonzero(np.abs(diffs) >= abs(observed) - tol))

    s_obs = pooled[None, :n_a].sum(axis=1)  # the same reduction as the relabellings
    observed = float((s_obs / n_a - (total - s_obs) / (n - n_a))[0])
    n_relabellings = math.comb(n, n_a)
    rows = max(1, BLOCK_VALUES // n)
    if n_relabellings <= n_permutations:
        hits, labellings = 0, combinations(range(n), n_a)
        while block := list(islice(labellings, rows)):
            hits += count_extreme(pooled[np.array(block)].sum(axis=1))
        return hits / n_relabellings, n_relabellings, True
    hits = 0
    for start in range(0, n_permutations, rows):
        shuffled = rng.permuted(np.tile(pooled, (min(rows, n_permutations - start), 1)), axis=1)
        hits += count_extreme(shuffled[:, :n_a].sum(axis=1))
    return (1 + hits) / (1 + n_permutations), int(n_permutations), False


def _bootstrap_ci(
    x: np.ndarray, y: np.ndarray, n_bootstrap: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile interval of ``mean(x*) - mean(y*)``, each resampled within itself."""
    rows = max(1, BLOCK_VALUES // max(len(x), len(y)))
    diffs = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, rows):
        k = min(rows, n_bootstrap - start)
        mean_x = x[rng.integers(0, len(x), size=(k, len(x)))].mean(axis=1)
        mean_y = y[rng.integers(0, len(y), size=(k, len(y)))].mean(axis=1)
        diffs[start : start + k] = mean_x - mean_y
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# ----------------------------------------------------------------- checks and words

_SIGN = {"greater": ">", "less": "<"}


def _effect_size(d: float) -> str:
    size = abs(d)
    return (
        "negligible"
        if size < 0.2
        else "small"
        if size < 0.5
        else "medium"
        if size < 0.8
        else "large"
    )


def _check_params(alpha, alternative, n_permutations, n_bootstrap, ci_level, seed) -> None:
    if not 0 < alpha < 1:
        raise ConfigError(f"test_hypothesis: alpha must be in (0, 1), got {alpha!r}")
    if alternative not in ALTERNATIVES:
        raise ConfigError(
            f"test_hypothesis: alternative must be one of {', '.join(ALTERNATIVES)}, "
            f"got {alternative!r}"
        )
    for field, value in (("n_permutations", n_permutations), ("n_bootstrap", n_bootstrap)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"test_hypothesis: {field} must be an integer >= 1, got {value!r}")
    if not 0 < ci_level < 1:
        raise ConfigError(f"test_hypothesis: ci_level must be in (0, 1), got {ci_level!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"test_hypothesis: seed must be an integer >= 0, got {seed!r}")


def _as_sample(values, label: str, name: str | None = None) -> np.ndarray:
    """A 1-D float64 array of at least 2 finite values, or a DataError naming the sample."""
    where = f"test_hypothesis: sample {label!r}" + (f" of {name}" if name else "")
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, duck-typed
        values = values.detach().cpu().numpy()
    if isinstance(values, str | bytes) or np.ndim(values) == 0:
        raise DataError(
            f"{where} is {_describe(values)}; each sample must be a sequence of per-item values"
        )
    try:
        sample = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where} is not numeric ({exc})") from None
    if sample.ndim != 1:
        raise DataError(f"{where} has shape {sample.shape}; expected a 1-D sequence of values")
    if len(sample) < 2:
        raise DataError(f"{where} has {len(sample)} value(s); each sample needs at least 2")
    bad = np.flatnonzero(~np.isfinite(sample))
    if len(bad):
        raise DataError(
            f"{where} holds {len(bad)} non-finite value(s) (first: {sample[bad[0]]} at index "
            f"{bad[0]}); all values must be finite"
        )
    return sample


def _check_spread(x: np.ndarray, y: np.ndarray, label_a: str, label_b: str) -> None:
    if np.all(x == x[0]) and np.all(y == y[0]):
        raise DataError(
            f"test_hypothesis: both samples are constant ({label_a!r} = {x[0]:g} x{len(x)}, "
            f"{label_b!r} = {y[0]:g} x{len(y)}); Welch's t is undefined with zero variance "
            "in both"
        )


def _describe(value) -> str:
    """A short description of a returned value for error messages."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__} ({text})"
