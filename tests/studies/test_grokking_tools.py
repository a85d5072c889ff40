"""The grokking study's tools on the shipped final checkpoint, without a store: their
tables against numpy computations, and their refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runs import synthetic_shape

from arrakis_ray.errors import ToolError
from arrakis_ray.studies.grokking import fourier, task
from arrakis_ray.studies.grokking.model import P, load
from arrakis_ray.studies.grokking.train import DEFAULT_OUT, answer_internals
from arrakis_ray.studies.grokking.train import progress_measures as train_measures
from arrakis_ray.tools import TOOLS
from arrakis_ray.tools.fourier_embedding import ModularParams, embedding_tables
from arrakis_ray.tools.fourier_neurons import FourierNeuronsParams, neuron_tables
from arrakis_ray.tools.training_curves import read_curves

META = json.loads((DEFAULT_OUT / "training.json").read_text())


@pytest.fixture(scope="module")
def final():
    return load(str(DEFAULT_OUT / META["checkpoints"]["final"]))


def test_the_embedding_tables_against_numpy(final):
    w_e = final.embed.weight.detach().float().numpy()[:P]
    tables = embedding_tables(
        w_e, 5, "r", lambda o: TOOLS["fourier_embedding"](ModularParams()).result_schema(o)
    )
    freq = tables["fourier_embedding"].to_pandas()
    power = 2 * (np.abs(np.fft.rfft(w_e.astype(np.float64), axis=0)) ** 2)[1:].sum(axis=1) / P
    np.testing.assert_allclose(freq["norm_sq"], power, rtol=1e-6)
    np.testing.assert_allclose(
        freq["fraction"], power / (w_e.astype(np.float64) ** 2).sum(), rtol=1e-6
    )
    top = freq.sort_values("rank")
    assert list(top["frequency"][:5]) == list(np.argsort(-power)[:5] + 1)
    assert top["cumulative_fraction"].iloc[4] == pytest.approx(
        np.sort(power)[::-1][:5].sum() / (w_e.astype(np.float64) ** 2).sum()
    )
    assert freq["in_top_k"].sum() == 5
    # the matrix is B @ W_E: the transposed basis takes it back
    matrix = tables["fourier_embedding_matrix"].to_pandas()
    coeffs = matrix.pivot(index="component", columns="dim", values="value").to_numpy()
    np.testing.assert_allclose(fourier.fourier_basis(P)[0].T @ coeffs, w_e, atol=1e-5)
    svd = tables["embedding_svd"].to_pandas()
    singular = svd.drop_duplicates("component")["singular_value"].to_numpy()
    np.testing.assert_allclose(singular, np.linalg.svd(w_e, compute_uv=False), rtol=1e-4)


def test_the_neuron_tables_against_the_activations(final):
    _, acts = answer_internals(final, torch.from_numpy(task.all_pairs()))
    params = FourierNeuronsParams(grid_neurons=2)
    schema = lambda o: TOOLS["fourier_neurons"](params).result_schema(o)  # noqa: E731
    tables = {k: v.to_pandas() for k, v in neuron_tables(acts, params, "r", schema).items()}
    neurons = tables["fourier_neurons"]
    assert len(neurons) == 512
    # most neurons are explained by one frequency, and those are the key frequencies
    explained = neurons[neurons["explained"]]
    assert len(explained) > 0.5 * len(neurons)
    assert set(explained["frequency"].value_counts().index[:3]) <= set(META["key_frequencies"])
    grid = tables["fourier_neuron_grid"]
    cell = grid[(grid["neuron"] == 1) & (grid["a"] == 7) & (grid["b"] == 100)]["activation"]
    assert float(cell.iloc[0]) == pytest.approx(acts[7 * P + 100, 1], rel=1e-5)
    spectrum = tables["fourier_neuron_spectrum"]
    s0 = spectrum[spectrum["neuron"] == 0]
    # Parseval, and the constant coefficient is the sum / p (numpy's FFT)
    assert (s0["value"].astype(float) ** 2).sum() == pytest.approx(
        (acts[:, 0] ** 2).sum(), rel=1e-4
    )
    const = s0[(s0["a_component"] == 0) & (s0["b_component"] == 0)]["value"].iloc[0]
    assert const == pytest.approx(np.fft.fft2(acts[:, 0].reshape(P, P))[0, 0].real / P, rel=1e-4)


MODULAR_TOOLS = ["fourier_embedding", "fourier_neurons", "attention_to_equals", "progress_measures"]


@pytest.mark.parametrize("tool", MODULAR_TOOLS)
@pytest.mark.parametrize("d_vocab", [50, 50257])
def test_a_model_without_the_numbers_is_refused_in_one_line(tool, d_vocab):
    manifest = SimpleNamespace(shape=synthetic_shape(d_vocab=d_vocab, n_layers=1, norm="none"))
    with pytest.raises(ToolError) as caught:
        TOOLS[tool](TOOLS[tool].Params()).check(manifest)
    assert "0..112" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("tool", MODULAR_TOOLS)
def test_the_numbers_with_or_without_equals_pass(tool):
    for d_vocab in (P, P + 1):
        manifest = SimpleNamespace(shape=synthetic_shape(d_vocab=d_vocab, n_layers=1, norm="none"))
        if tool == "progress_measures" and d_vocab == P:
            with pytest.raises(ToolError, match="'=' \\(id 113\\)"):
                TOOLS[tool](TOOLS[tool].Params()).check(manifest)
        else:
            TOOLS[tool](TOOLS[tool].Params()).check(manifest)


@pytest.mark.parametrize(("n_layers", "norm"), [(2, "none"), (1, "layernorm")])
def test_progress_measures_needs_one_layer_without_norms(n_layers, norm):
    manifest = SimpleNamespace(shape=synthetic_shape(d_vocab=P + 1, n_layers=n_layers, norm=norm))
    with pytest.raises(ToolError, match="one-layer model without norms") as caught:
        TOOLS["progress_measures"](TOOLS["progress_measures"].Params()).check(manifest)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tool", MODULAR_TOOLS)
@pytest.mark.parametrize("p", [1, 2, 114])
def test_the_modulus_must_be_odd_and_at_least_3(tool, p):
    with pytest.raises(ValueError, match="odd modulus >= 3"):
        TOOLS[tool].Params(p=p)


def test_the_tools_progress_measures_equal_trainings_and_the_curves(final):
    """The tool (through the custom backend's hooks) against train.py's computation on the
    same weights, and against the last row of curves.parquet (the unrounded weights)."""
    from arrakis_ray.models.custom import build_custom
    from arrakis_ray.tools.progress_measures import ProgressMeasuresParams, measure

    path = DEFAULT_OUT / META["checkpoints"]["final"]
    hooked = build_custom("arrakis_ray.studies.grokking.model:build", {}, checkpoint=path)
    keys = META["key_frequencies"]
    tool = dict(measure(hooked, ProgressMeasuresParams(key_frequencies=tuple(keys))))
    trained = train_measures(final, keys, task.train_mask())
    end = pd.read_parquet(DEFAULT_OUT / "curves.parquet").iloc[-1]
    for name in ("restricted_loss", "excluded_loss", "gini_embed", "gini_neuron_logit"):
        assert tool[name] == pytest.approx(trained[f"progress/{name}"], rel=1e-6), name
    for name in ("weight_norm_sq", "top5_fraction"):
        assert tool[name] == pytest.approx(trained[f"progress/{name}"], rel=1e-9), name
    for name in ("excluded_loss", "gini_embed", "gini_neuron_logit", "weight_norm_sq"):
        assert tool[name] == pytest.approx(end[f"progress/{name}"], rel=2e-3), name
    # the restricted loss is ~1e-7 nats: float16 rounding moves it by more than its size
    assert tool["restricted_loss"] == pytest.approx(end["progress/restricted_loss"], abs=1e-5)
    assert tool["test_accuracy"] == end["test/accuracy"]
    assert tool["train_loss"] == pytest.approx(end["train/loss"], abs=1e-5)
    # without key_frequencies the tool measures the checkpoint's own: the same ones here
    own = measure(hooked, ProgressMeasuresParams())
    assert sorted(v for m, v in own if m == "key_frequency") == keys


def test_training_curves_reads_wide_and_long_files(tmp_path):
    wide = pd.DataFrame(
        {"epoch": [0, 10, 20], "train/loss": [4.0, 2.0, 1.0], "progress/x": [1.0, np.nan, 3.0]}
    )
    wide.to_parquet(tmp_path / "wide.parquet")
    rows = read_curves(tmp_path / "wide.parquet", "r").to_pandas()
    assert len(rows) == 5  # the missing measure is dropped
    assert rows[(rows["split"] == "progress") & (rows["step"] == 20)]["value"].item() == 3.0
    long = pa.table(
        {"step": [1, 2], "split": ["validation"] * 2, "metric": ["bpc"] * 2, "value": [2.5, 2.0]}
    )
    pq.write_table(long, tmp_path / "long.parquet")
    rows = read_curves(
        tmp_path / "long.parquet", "r", TOOLS["training_curves"](None).result_schema()
    )
    assert rows.column("value").to_pylist() == [2.5, 2.0]
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ToolError, match="no 'step' or 'epoch'"):
        read_curves(tmp_path / "bad.parquet", "r")
