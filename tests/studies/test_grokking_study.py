"""The grokking study end to end: ``arrakis-ray run pipelines/studies/grokking.yaml`` from
the shipped checkpoints, its store tables checked against the checkpoints, its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arrakis_ray.cli import main
from arrakis_ray.resources import data_dir
from arrakis_ray.store.catalog import Store
from arrakis_ray.studies.grokking import task
from arrakis_ray.studies.grokking.model import P, load
from arrakis_ray.studies.grokking.train import DEFAULT_OUT

STUDY = data_dir("pipelines") / "studies" / "grokking.yaml"
META = json.loads((DEFAULT_OUT / "training.json").read_text())


@pytest.fixture(scope="module")
def study_store(ray_session, tmp_path_factory):
    store = tmp_path_factory.mktemp("grokking") / "store"
    assert main(["run", str(STUDY), "--store", str(store)]) == 0
    return store


def _final_run(db) -> str:
    rows = db.sql('SELECT params."model.checkpoint" AS c, run_id FROM sweep_runs').rows()
    return next(run for ckpt, run in rows if ckpt.endswith(META["checkpoints"]["final"]))


def test_every_checkpoint_is_a_run(study_store):
    with Store(study_store) as db:
        n = db.sql("SELECT count(DISTINCT run_id) FROM sweep_runs").item()
        tokens = db.sql("SELECT count(*) FROM tokens").item()
    assert n == len(set(META["checkpoints"].values()))
    assert tokens == n * P * P * 3  # every pair "a b =" of every run


def test_the_final_run_shows_what_the_issue_asks(study_store):
    with Store(study_store) as db:
        final = _final_run(db)
        measures = dict(
            db.sql(
                "SELECT metric, value FROM results_progress_measures "
                f"WHERE run_id = '{final}' AND metric <> 'key_frequency'"
            ).rows()
        )
        top5 = db.sql(
            "SELECT cumulative_fraction FROM results_fourier_embedding "
            f"WHERE run_id = '{final}' AND rank = 5"
        ).item()
        explained = db.sql(
            f"SELECT avg(explained::INT) FROM results_fourier_neurons WHERE run_id = '{final}'"
        ).item()
    assert measures["test_accuracy"] >= 0.99 and measures["train_accuracy"] == 1.0
    assert top5 >= 0.90
    assert measures["restricted_loss"] < 0.1 * measures["excluded_loss"]
    assert explained > 0.5


def test_the_attention_rows_equal_the_checkpoints_pattern(study_store):
    with Store(study_store) as db:
        final = _final_run(db)
        rows = db.sql(
            "SELECT head, a, b, weight FROM results_attention_to_equals "
            f"WHERE run_id = '{final}' ORDER BY head, a, b"
        ).to_numpy()
    assert len(rows) == 4 * P * P
    model = load(str(DEFAULT_OUT / META["checkpoints"]["final"]))
    captured = {}
    model.blocks[0].attn.hook_pattern.register_forward_hook(
        lambda _m, _i, out: captured.update(pattern=out)
    )
    with torch.no_grad():
        model(torch.from_numpy(task.all_pairs()))
    expected = captured["pattern"][:, :, 2, 0].T.reshape(-1).numpy()  # [head, a*p+b]
    np.testing.assert_allclose(rows[:, 3].astype(float), expected, atol=1e-5)


def test_the_curves_are_in_the_store_as_trained(study_store):
    import pandas as pd

    shipped = pd.read_parquet(DEFAULT_OUT / "curves.parquet")
    with Store(study_store) as db:
        final = _final_run(db)
        stored = db.sql(
            "SELECT step, value FROM results_training_curves "
            f"WHERE run_id = '{final}' AND split = 'test' AND metric = 'accuracy' ORDER BY step"
        ).to_pandas()
    assert stored["step"].tolist() == shipped["epoch"].tolist()
    np.testing.assert_allclose(stored["value"], shipped["test/accuracy"])


def test_the_report_has_the_seeds_figures(study_store):
    page = (study_store / "studies" / "grokking" / "report.html").read_text()
    for heading in (
        "Train and test loss (log scale) with the phases",
        "Singular values of W_E",
        "Key frequencies",
        "The Fourier basis",
        "W_E in the Fourier basis",
        "Attention from &#x27;=&#x27; to a",
        "The first 5 neurons",
        "2D Fourier transform of neuron 0",
        "Progress measures",
    ):
        assert heading.replace("&#x27;", "'") in page.replace("&#x27;", "'"), heading
