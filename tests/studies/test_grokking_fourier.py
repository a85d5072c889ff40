"""The Fourier math of the grokking study, against numpy's FFT and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from arrakis_ray.studies.grokking import fourier

P = 113


def test_the_basis_is_orthonormal_cos_then_sin():
    basis, labels = fourier.fourier_basis(P)
    np.testing.assert_allclose(basis @ basis.T, np.eye(P), atol=1e-12)
    assert labels[:3] == ["const", "cos 1", "sin 1"] and labels[-1] == "sin 56"
    x = np.arange(P)
    np.testing.assert_allclose(basis[2 * 7 - 1] * np.sqrt(P / 2), np.cos(2 * np.pi * 7 * x / P))


def test_norms_per_frequency_equal_the_fft_power():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(P, 16))
    power = np.abs(np.fft.rfft(w, axis=0)) ** 2  # [58, 16]: |X_k|^2 per column
    expected = 2 * power[1:].sum(axis=1) / P  # cos^2 + sin^2 coefficients of frequency k
    np.testing.assert_allclose(fourier.frequency_norms_sq(w), expected, rtol=1e-10)
    # with the constant (|X_0|^2 / p) they add up to the whole norm
    assert fourier.frequency_norms_sq(w).sum() + power[0].sum() / P == pytest.approx((w**2).sum())


def test_top_k_fraction_of_a_sparse_embedding():
    x = np.arange(P)[:, None]
    rng = np.random.default_rng(1)
    w = np.cos(2 * np.pi * 14 * x / P + rng.uniform(0, 6, size=8)) * 3
    w += np.sin(2 * np.pi * 41 * x / P + rng.uniform(0, 6, size=8))
    w += 0.01 * rng.normal(size=w.shape)
    assert fourier.top_frequencies(w, 2) == [14, 41]
    assert fourier.top_k_fraction(w, 2) > 0.999
    assert fourier.top_k_fraction(w, 1) == pytest.approx(9 / 10, abs=0.01)


def test_a_neuron_of_one_frequency_is_explained_by_it():
    a, b = np.divmod(np.arange(P * P), P)
    w = 2 * np.pi * 35 / P
    one = np.cos(w * a) * np.cos(w * b) + 0.5 * np.sin(w * a) + 2.0  # terms of k = 35 only
    two = np.cos(w * a) + np.cos(2 * np.pi * 9 / P * b)  # half k = 35, half k = 9
    fractions = fourier.neuron_frequency_fractions(np.stack([one, two], axis=1))
    assert fractions[0].argmax() + 1 == 35 and fractions[0, 34] == pytest.approx(1.0)
    assert fractions[1, 34] == pytest.approx(0.5) and fractions[1, 8] == pytest.approx(0.5)
    freq, explained = fourier.neuron_clusters(np.stack([one, two], axis=1))
    assert list(freq[:1]) == [35] and list(explained) == [True, False]


def test_the_2d_spectrum_is_the_fft2_in_the_real_basis():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(P * P, 1))
    spectrum = fourier.neuron_spectra(acts)[0]
    grid = acts[:, 0].reshape(P, P)
    fft = np.fft.fft2(grid)
    # the constant-constant coefficient is the sum over the grid / p
    assert spectrum[0, 0] == pytest.approx(fft[0, 0].real / P)
    # Parseval: the orthonormal transform keeps the norm
    assert (spectrum**2).sum() == pytest.approx((grid**2).sum())
    # (cos k over a, const over b) = sqrt(2) Re X[k, 0] / p
    assert spectrum[2 * 5 - 1, 0] == pytest.approx(np.sqrt(2) * fft[5, 0].real / P)


def test_gini_matches_the_mean_absolute_difference():
    rng = np.random.default_rng(3)
    x = rng.exponential(size=57)
    mad = np.abs(x[:, None] - x[None, :]).mean()
    assert fourier.gini(x) == pytest.approx(mad / (2 * x.mean()))
    assert fourier.gini(np.ones(10)) == pytest.approx(0.0)


def test_restricted_and_excluded_loss_of_a_pure_fourier_model():
    """Logits made only of cos(w(a+b-c)) terms of the key frequencies: the restricted loss
    is the real loss, the excluded loss that of all-equal logits (log p)."""
    a, b = np.divmod(np.arange(P * P), P)
    c = np.arange(P)
    freqs = [14, 41]
    logits = sum(50 * np.cos(2 * np.pi * k / P * (a[:, None] + b[:, None] - c)) for k in freqs)
    labels = (a + b) % P
    train = np.random.default_rng(0).random(P * P) < 0.3
    restricted, excluded = fourier.restricted_and_excluded_loss(logits, labels, train, freqs)
    assert restricted == pytest.approx(fourier.cross_entropy(logits, labels))
    assert excluded == pytest.approx(np.log(P))
    assert restricted < 0.01 * excluded
    # a memorising part (any function of (a, b) without those frequencies) is all excluded
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(P * P, P))
    noise -= fourier.key_logit_part(noise, freqs)
    restricted2, excluded2 = fourier.restricted_and_excluded_loss(
        logits + noise, labels, train, freqs
    )
    mean = (logits + noise).mean(axis=0, keepdims=True)
    assert restricted2 == pytest.approx(fourier.cross_entropy(logits + mean, labels))
    assert excluded2 == pytest.approx(fourier.cross_entropy(noise[train], labels[train]))


def test_the_key_part_is_the_papers_2d_fourier_projection():
    """The paper's code projects each output's logits over the (a, b) grid on the 2D
    Fourier directions (cos a cos b - sin a sin b) / sqrt 2 and (sin a cos b + cos a sin b)
    / sqrt 2 of each key frequency (cos and sin of w (a + b), by the angle-sum identities)."""
    basis, _ = fourier.fourier_basis(P)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(P * P, 6))
    freqs = [3, 56]
    expected = np.zeros_like(logits)
    for k in freqs:
        cos, sin = basis[2 * k - 1], basis[2 * k]
        for d in (
            (np.outer(cos, cos) - np.outer(sin, sin)) / np.sqrt(2),
            (np.outer(sin, cos) + np.outer(cos, sin)) / np.sqrt(2),
        ):
            d = d.reshape(-1)  # row a * p + b
            expected += np.outer(d, d @ logits)
    np.testing.assert_allclose(fourier.key_logit_part(logits, freqs), expected, atol=1e-12)


def test_the_clusters_of_stored_neurons_give_the_key_frequencies():
    a, b = np.divmod(np.arange(P * P), P)
    rng = np.random.default_rng(6)
    cols = [np.cos(2 * np.pi * 7 / P * (a + b) + rng.uniform(0, 6)) for _ in range(30)]
    cols += [np.cos(2 * np.pi * 20 / P * a + rng.uniform(0, 6)) for _ in range(10)]
    cols += [rng.normal(size=P * P) for _ in range(60)]  # noise: no frequency explains it
    acts = np.stack(cols, axis=1)
    freq, explained = fourier.neuron_clusters(acts)
    assert fourier.key_frequencies(acts) == [7, 20]
    assert fourier.cluster_frequencies(freq, explained) == [7, 20]
    assert fourier.cluster_frequencies(freq, explained, min_share=0.2) == [7]


def test_cross_entropy_against_a_direct_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(20, 7))
    labels = rng.integers(0, 7, size=20)
    direct = -np.mean(np.log(np.exp(logits[np.arange(20), labels]) / np.exp(logits).sum(axis=1)))
    assert fourier.cross_entropy(logits, labels) == pytest.approx(direct)
