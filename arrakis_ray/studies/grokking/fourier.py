"""Fourier analysis of the modular-addition transformer, in float64 numpy.

Conventions (Nanda et al. 2023):

- The Fourier basis over ``x = 0..p-1`` has ``p`` orthonormal rows: the constant, then
  for each frequency ``k = 1..(p-1)/2`` the pair ``cos(2 pi k x / p)``,
  ``sin(2 pi k x / p)``. Row ``2k-1`` is cos k, row ``2k`` is sin k.
- "Per-frequency norm^2" of a matrix ``M [p, d]`` (W_E over the number tokens) is
  ``|(B M)[2k-1]|^2 + |(B M)[2k]|^2``; since B is orthonormal they and the constant
  row add up to ``|M|^2``.
- Arrays over all inputs are ordered like ``task.all_pairs``: row ``a * p + b``.
"""

from __future__ import annotations

import numpy as np


def fourier_basis(p: int) -> tuple[np.ndarray, list[str]]:
    """The orthonormal basis ``[p, p]`` (rows are basis vectors) and the row labels."""
    x = np.arange(p)
    rows, names = [np.ones(p)], ["const"]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [np.cos(2 * np.pi * k * x / p), np.sin(2 * np.pi * k * x / p)]
        names += [f"cos {k}", f"sin {k}"]
    basis = np.stack(rows)
    return basis / np.linalg.norm(basis, axis=1, keepdims=True), names


def frequency_norms_sq(matrix: np.ndarray) -> np.ndarray:
    """Norm^2 per frequency ``[(p-1)/2]`` of ``matrix [p, d]`` (index 0 is frequency 1)."""
    p = matrix.shape[0]
    coeffs = fourier_basis(p)[0] @ matrix.astype(np.float64)
    row_sq = (coeffs**2).sum(axis=1)
    return row_sq[1::2] + row_sq[2::2]


def top_k_fraction(matrix: np.ndarray, k: int) -> float:
    """Fraction of ``|matrix|^2`` held by the ``k`` frequencies with the largest norm^2."""
    norms = frequency_norms_sq(matrix)
    total = float((matrix.astype(np.float64) ** 2).sum())
    return float(np.sort(norms)[::-1][:k].sum() / total)


def top_frequencies(matrix: np.ndarray, k: int) -> list[int]:
    """The ``k`` frequencies (1-based) with the largest norm^2, largest first."""
    return [int(i) + 1 for i in np.argsort(frequency_norms_sq(matrix))[::-1][:k]]


def neuron_spectra(acts: np.ndarray) -> np.ndarray:
    """2D Fourier coefficients ``[n, p, p]`` (a-row, b-column) of activations ``[p*p, n]``."""
    n = acts.shape[1]
    p = int(round(np.sqrt(acts.shape[0])))
    basis = fourier_basis(p)[0]
    grid = acts.astype(np.float64).T.reshape(n, p, p)  # [neuron, a, b]
    return basis @ grid @ basis.T


def neuron_frequency_fractions(acts: np.ndarray) -> np.ndarray:
    """``[n, (p-1)/2]``: the share of each neuron's variance held by one frequency ``k``.

    A neuron "uses" frequency k through the 2D components whose rows and columns are
    in ``{const, cos k, sin k}`` (terms in a alone, b alone, and their products); the
    share is their summed square over all non-constant components (the variance).
    """
    spectra = neuron_spectra(acts)
    sq = spectra**2
    variance = sq.sum(axis=(1, 2)) - sq[:, 0, 0]
    n_freq = (spectra.shape[1] - 1) // 2
    out = np.zeros((spectra.shape[0], n_freq))
    for k in range(1, n_freq + 1):
        idx = [0, 2 * k - 1, 2 * k]
        out[:, k - 1] = sq[:, idx][:, :, idx].sum(axis=(1, 2)) - sq[:, 0, 0]
    return out / np.maximum(variance, 1e-30)[:, None]


def neuron_clusters(acts: np.ndarray, threshold: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """Each neuron's dominant frequency (1-based) and whether it explains ``>= threshold``.

    Dead neurons (zero variance) are never explained.
    """
    fractions = neuron_frequency_fractions(acts)
    best = fractions.argmax(axis=1)
    explained = fractions[np.arange(len(best)), best] >= threshold
    return best + 1, explained


def key_frequencies(
    acts: np.ndarray, threshold: float = 0.85, min_share: float = 0.02
) -> list[int]:
    """Frequencies that at least ``min_share`` of the neurons are explained by, sorted.

    The paper's definition: the frequencies the MLP neurons cluster on.
    """
    freq, explained = neuron_clusters(acts, threshold)
    return cluster_frequencies(freq, explained, min_share)


def cluster_frequencies(
    frequency: np.ndarray, explained: np.ndarray, min_share: float = 0.02
) -> list[int]:
    """The key frequencies from each neuron's dominant ``frequency`` and whether one
    frequency ``explained`` it: those that at least ``min_share`` of all neurons are
    explained by, sorted (what ``fourier_neurons`` stores gives the same answer)."""
    frequency, explained = np.asarray(frequency), np.asarray(explained, dtype=bool)
    counts = np.bincount(frequency[explained].astype(np.int64), minlength=1)
    return [int(k) for k in np.flatnonzero(counts >= min_share * len(frequency)) if k > 0]


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when equal, near 1 when one dominates."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum()))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``logits [rows, classes]`` in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logprobs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logprobs[np.arange(len(labels)), labels].mean())


def sum_directions(p: int, freqs: list[int]) -> np.ndarray:
    """Unit vectors ``[2 * len(freqs), p*p]``: cos and sin of ``2 pi k (a + b) / p``."""
    a, b = np.divmod(np.arange(p * p), p)
    rows = []
    for k in freqs:
        angle = 2 * np.pi * k * (a + b) / p
        rows += [np.cos(angle), np.sin(angle)]
    if not rows:
        return np.zeros((0, p * p))
    dirs = np.stack(rows)
    return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def key_logit_part(logits: np.ndarray, freqs: list[int]) -> np.ndarray:
    """The part of ``logits [p*p, classes]`` along ``cos/sin(w (a + b))`` for ``freqs``.

    Each output's logits are a function on the ``(a, b)`` grid; this projects every
    column onto the key-frequency directions (orthonormal for distinct frequencies, and
    orthogonal to the constant, so each column keeps its mean in the rest).
    """
    p = int(round(np.sqrt(logits.shape[0])))
    dirs = sum_directions(p, freqs)  # [2f, p*p]
    z = logits.astype(np.float64)
    return dirs.T @ (dirs @ z)


def restricted_and_excluded_loss(
    logits: np.ndarray, labels: np.ndarray, train: np.ndarray, freqs: list[int]
) -> tuple[float, float]:
    """The paper's two progress measures, from the logits at ``=`` over all ``p^2`` inputs.

    ``logits [p*p, p]`` are ordered like ``task.all_pairs``. As in Nanda et al. (2023):

    - restricted loss (all inputs): the logits keep only their components along
      ``cos/sin(w (a + b))`` for the key frequencies ``w``, plus each output's mean
      (the paper's bias correction). It falls before the test loss does, as the
      general algorithm forms.
    - excluded loss (training inputs): the logits with those components removed. It
      rises while the training loss stays low, as the general algorithm comes to carry
      the training set in place of memorisation.
    """
    z = logits.astype(np.float64)
    key_part = key_logit_part(z, freqs)
    restricted = key_part + z.mean(axis=0, keepdims=True)
    excluded = z - key_part
    return cross_entropy(restricted, labels), cross_entropy(excluded[train], labels[train])


def weight_norm_sq(weights: dict[str, np.ndarray]) -> float:
    """Total sum of squared weights (what weight decay shrinks)."""
    return float(sum((np.asarray(w, dtype=np.float64) ** 2).sum() for w in weights.values()))


def progress_measures(
    logits: np.ndarray,
    w_e: np.ndarray,
    neuron_to_logit: np.ndarray,
    weight_norm: float,
    labels: np.ndarray,
    train: np.ndarray,
    freqs: list[int],
) -> dict[str, float]:
    """The paper's progress measures of one model state (see ``restricted_and_excluded_loss``).

    ``w_e [p, d]`` is the number tokens' embedding; the Gini coefficients are over the
    per-frequency norms of W_E and of the neuron-logit map (W_U W_out, over the outputs).
    """
    restricted, excluded = restricted_and_excluded_loss(logits, labels, train, freqs)
    return {
        "restricted_loss": restricted,
        "excluded_loss": excluded,
        "gini_embed": gini(np.sqrt(frequency_norms_sq(w_e))),
        "gini_neuron_logit": gini(np.sqrt(frequency_norms_sq(neuron_to_logit))),
        "weight_norm_sq": weight_norm,
        "top5_fraction": top_k_fraction(w_e, 5),
    }
