"""The issue's "must show" on the shipped grokking checkpoints and curves.

Accuracy is computed with the plain torch forward, the Fourier share with numpy's FFT,
the phase ordering from the curves recorded while training.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from arrakis_ray.studies.grokking import fourier, task
from arrakis_ray.studies.grokking.model import P, load
from arrakis_ray.studies.grokking.phases import rise_and_fall
from arrakis_ray.studies.grokking.train import DEFAULT_OUT, answer_internals
from arrakis_ray.tools.training_curves import read_curves

META = json.loads((DEFAULT_OUT / "training.json").read_text())
RISE_AND_FALL = (2800, 6120)
"""Epochs at which the excluded loss doubles and the test loss falls below 1 nat (README)."""


@pytest.fixture(scope="module")
def final():
    return load(str(DEFAULT_OUT / META["checkpoints"]["final"]))


@pytest.fixture(scope="module")
def curves():
    return pd.read_parquet(DEFAULT_OUT / "curves.parquet").set_index("epoch")


def test_the_shipped_files_are_small_and_listed():
    files = sorted(p.name for p in DEFAULT_OUT.glob("*.safetensors"))
    assert files == sorted(set(META["checkpoints"].values()))
    assert (
        3 <= len(files) and sum(p.stat().st_size for p in DEFAULT_OUT.glob("*.safetensors")) < 5e6
    )


def test_the_final_model_is_99_percent_right_on_the_test_pairs(final):
    ids = torch.from_numpy(task.all_pairs())
    with torch.no_grad():
        predicted = final(ids)[:, -1, :P].argmax(-1).numpy()
    right = predicted == task.labels()
    test = ~task.train_mask()
    assert right[test].mean() >= 0.99
    assert right[~test].mean() == 1.0


def test_five_frequencies_hold_90_percent_of_the_embedding(final):
    w_e = final.embed.weight.detach().double().numpy()[:P]
    power = 2 * (np.abs(np.fft.rfft(w_e, axis=0)) ** 2)[1:].sum(axis=1) / P  # per frequency
    top5 = np.sort(power)[::-1][:5].sum() / (w_e**2).sum()
    assert top5 >= 0.90
    assert top5 == pytest.approx(fourier.top_k_fraction(w_e, 5), rel=1e-9)


def test_the_key_frequencies_are_the_embeddings_top_ones(final):
    w_e = final.embed.weight.detach().double().numpy()[:P]
    keys = META["key_frequencies"]
    assert 3 <= len(keys) <= 7
    assert set(keys) <= set(fourier.top_frequencies(w_e, len(keys) + 2))


def test_restricted_loss_at_the_end_is_far_below_the_excluded_loss(final, curves):
    end = curves.iloc[-1]
    assert end["progress/restricted_loss"] < 1e-6 and end["progress/excluded_loss"] > 5.0
    assert end["progress/restricted_loss"] == pytest.approx(
        META["final"]["progress/restricted_loss"]
    )
    assert end["progress/excluded_loss"] == pytest.approx(META["final"]["progress/excluded_loss"])
    # recomputed from the shipped (float16) weights: the same measures
    logits, _ = answer_internals(final, torch.from_numpy(task.all_pairs()))
    restricted, excluded = fourier.restricted_and_excluded_loss(
        logits, task.labels(), task.train_mask(), META["key_frequencies"]
    )
    assert restricted == pytest.approx(end["progress/restricted_loss"], abs=1e-5)
    assert excluded == pytest.approx(end["progress/excluded_loss"], rel=0.01)


def test_the_excluded_loss_rises_before_the_test_loss_falls(curves):
    measured = curves.dropna(subset=["progress/excluded_loss"])
    memorised = curves.index[curves["train/accuracy"] >= 1.0][0]
    start = measured.loc[measured.index >= memorised, "progress/excluded_loss"].iloc[0]
    # the excluded loss doubles from its value at memorisation ...
    rose = measured.index[
        (measured.index > memorised) & (measured["progress/excluded_loss"] > 2 * start)
    ][0]
    # ... before the test loss falls below 1 nat (chance is log 113 = 4.7)
    fell = curves.index[(curves.index > memorised) & (curves["test/loss"] < 1.0)][0]
    assert memorised < rose < fell
    # the report's reading of the same curves (long form, as the store holds them)
    long = read_curves(DEFAULT_OUT / "curves.parquet", "r").to_pandas()
    assert rise_and_fall(long) == (rose, fell) == RISE_AND_FALL


def test_generalisation_is_delayed(curves):
    memorised = curves.index[curves["train/accuracy"] >= 1.0][0]
    grokked = curves.index[curves["test/accuracy"] >= 0.99][0]
    assert grokked > 3 * memorised
    # well after memorising, the test accuracy is still far from the train accuracy
    assert curves.loc[2 * memorised, "test/accuracy"] < 0.5


def test_the_tokenizer_has_the_numbers_and_equals_only():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_OUT / "tokenizer")
    assert len(tok) == P + 1
    assert tok("3 112 =")["input_ids"] == [3, 112, P]
    assert tok.bos_token is None and tok.eos_token is None


def test_the_shipped_checkpoints_are_the_phases_they_are_named(curves):
    """Train accuracy 100 % at the memorisation checkpoint, test accuracy >= 99 % at the
    grokked one (plain forward of the float16 weights), as the curves recorded."""
    ids = torch.from_numpy(task.all_pairs())
    test = ~task.train_mask()
    accuracy = {}
    for phase in ("memorised", "grokked"):
        model = load(str(DEFAULT_OUT / META["checkpoints"][phase]))
        with torch.no_grad():
            right = model(ids)[:, -1, :P].argmax(-1).numpy() == task.labels()
        accuracy[phase] = (right[~test].mean(), right[test].mean())
    assert META["checkpoints"]["memorised"] == "epoch_00200.safetensors"
    assert accuracy["memorised"][0] == 1.0 and accuracy["memorised"][1] < 0.2
    assert META["checkpoints"]["grokked"] == "epoch_06600.safetensors"
    assert accuracy["grokked"][1] >= 0.99
    assert curves.loc[200, "train/accuracy"] == 1.0 and curves.loc[6600, "test/accuracy"] >= 0.99


def test_the_key_frequencies_are_the_final_neurons_clusters(final):
    """79 % of the final model's neurons are explained by one frequency, and the
    frequencies they cluster on are training.json's key frequencies."""
    _, acts = answer_internals(final, torch.from_numpy(task.all_pairs()))
    freq, explained = fourier.neuron_clusters(acts)
    assert explained.mean() == pytest.approx(0.79, abs=0.005)
    assert fourier.cluster_frequencies(freq, explained) == META["key_frequencies"]
    assert META["key_frequencies"] == [17, 29, 42, 44, 45]
