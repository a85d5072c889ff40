"""The grokking study end to end: ``arrakis-ray run`` on the study file, cut to the first
and the final shipped checkpoints (the five-checkpoint checks need no Ray:
test_grokking_checkpoints.py), its store tables against the checkpoints, its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from arrakis_ray.cli import main
from arrakis_ray.reports.grokking_report import write_report
from arrakis_ray.resources import data_dir
from arrakis_ray.store.catalog import Store
from arrakis_ray.studies.grokking import task
from arrakis_ray.studies.grokking.model import P, load
from arrakis_ray.studies.grokking.train import DEFAULT_OUT

STUDY = data_dir("pipelines") / "studies" / "grokking.yaml"
META = json.loads((DEFAULT_OUT / "training.json").read_text())
CUT = (META["checkpoints"]["memorised"], META["checkpoints"]["final"])  # first and final


def _cut_study(folder: Path) -> Path:
    """The shipped study file with only the first and final checkpoints, written to
    ``folder`` (its base and checkpoints named by absolute paths)."""
    spec = yaml.safe_load(STUDY.read_text())
    values = spec["parameters"]["model.checkpoint"]["values"]
    spec["base"] = str((STUDY.parent / spec["base"]).resolve())
    spec["parameters"]["model.checkpoint"]["values"] = [
        str((STUDY.parent / v).resolve()) for v in values if Path(v).name in CUT
    ]
    assert len(spec["parameters"]["model.checkpoint"]["values"]) == 2
    path = folder / "grokking_cut.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study_store(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grokking")
    store = folder / "store"
    assert main(["run", str(_cut_study(folder)), "--store", str(store)]) == 0
    return store


def _final_run(db) -> str:
    rows = db.sql('SELECT params."model.checkpoint" AS c, run_id FROM sweep_runs').rows()
    return next(run for ckpt, run in rows if ckpt.endswith(META["checkpoints"]["final"]))


def test_every_checkpoint_is_a_run(study_store):
    with Store(study_store) as db:
        n = db.sql("SELECT count(DISTINCT run_id) FROM sweep_runs").item()
        tokens = db.sql("SELECT count(*) FROM tokens").item()
    assert n == len(CUT)
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


def test_the_report_reads_each_points_own_tool_calls(study_store):
    """Other calls of a tool on a run (variants: another setting, another checkout) are
    in the store's views too; the page shows only the calls the study made."""
    from arrakis_ray.tools.runner import analyze

    with Store(study_store) as db:
        final = _final_run(db)
        sweep_id = db.sql("SELECT DISTINCT sweep_id FROM sweep_runs").item()
    page = study_store / "studies" / "grokking" / "report.html"
    before = page.read_text()
    analyze(final, "fourier_neurons", {"threshold": 0.3}, store=study_store, variant="loose")
    analyze(
        final, "progress_measures", {"key_frequencies": [1, 2]}, store=study_store, variant="few"
    )
    with Store(study_store) as db:  # the variants are there, beside the study's calls
        variants = db.sql(
            "SELECT count(DISTINCT coalesce(variant, '')) FROM results_progress_measures "
            f"WHERE run_id = '{final}'"
        ).item()
    assert variants == 2
    again = study_store / "again" / "report.html"
    write_report(str(study_store), sweep_id, again)
    assert again.read_text() == before
    assert "17, 29, 42, 44, 45</b>; " in before and "the progress measures use the same" in before


def test_the_report_says_when_the_measures_used_other_key_frequencies():
    import pandas as pd

    from arrakis_ray.reports.grokking_report import _key_frequencies_item

    neurons = pd.DataFrame({"frequency": [7] * 10 + [3], "explained": [True] * 10 + [False]})
    same = _key_frequencies_item(neurons, [7], {"neurons_explained": 10 / 11})
    assert "<b>7</b>; 91 % of the neurons" in same and "use the same ones" in same
    other = _key_frequencies_item(neurons, [1, 2], {"neurons_explained": 10 / 11})
    assert "<b>the progress measures used others</b>: 1, 2" in other
