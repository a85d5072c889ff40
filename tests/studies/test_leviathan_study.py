"""The Leviathan study end to end: ``arrakis-ray run pipelines/studies/leviathan.yaml``
from the shipped checkpoints, then its report, checked against the shipped curves."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pyarrow.parquet as pq
import pytest

from arrakis_ray.cli import main
from arrakis_ray.reports.browser import render_in_browser
from arrakis_ray.reports.leviathan_report import (
    EQUAL_WITHIN,
    LAST_EVALS,
    verdict_from_curves,
    write_report,
)
from arrakis_ray.resources import data_dir
from arrakis_ray.store.catalog import Store
from arrakis_ray.studies.leviathan.train import DEFAULT_OUT, KINDS
from arrakis_ray.tools.runner import analyze

STUDY = data_dir("pipelines") / "studies" / "leviathan.yaml"


def _curves(values: dict[str, list[float]], walls: dict[str, float]) -> pl.DataFrame:
    rows = []
    for kind, bpcs in values.items():
        for i, bpc in enumerate(bpcs):
            rows.append(
                dict(attention=kind, step=100 * i, split="validation", metric="bpc", value=bpc)
            )
            rows.append(
                dict(
                    attention=kind,
                    step=100 * i,
                    split="train",
                    metric="wall_s_per_step",
                    value=walls[kind],
                )
            )
    return pl.DataFrame(rows)


@pytest.mark.parametrize(
    ("correlation", "word"),
    [
        ([3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], "equal"),
        ([3.0, 1.9] + [1.9] * 5, "better"),
        ([3.0] + [2.1] * 6, "worse"),
    ],
)
def test_the_verdict_compares_the_mean_of_the_last_evaluations(correlation, word):
    dot = [3.0] + [2.0] * 6
    verdict = verdict_from_curves(
        _curves({"dot": dot, "correlation": correlation}, {"dot": 0.1, "correlation": 0.12})
    )
    assert verdict.word == word
    assert verdict.last_mean["correlation"] == pytest.approx(
        sum(correlation[-LAST_EVALS:]) / LAST_EVALS
    )
    assert verdict.seconds_per_step == pytest.approx({"dot": 0.1, "correlation": 0.12})
    assert "1.20x" in verdict.sentence()


@pytest.fixture(scope="module")
def study_store(ray_session, tmp_path_factory):
    store = tmp_path_factory.mktemp("leviathan") / "store"
    assert main(["run", str(STUDY), "--store", str(store)]) == 0
    return store


def _runs(store) -> dict[str, str]:
    with Store(store) as db:
        rows = db.sql('SELECT params."model.config.attention" AS a, run_id FROM sweep_runs').rows()
    return dict(rows)


def test_the_store_holds_both_models_curves_as_trained(study_store):
    runs = _runs(study_store)
    assert set(runs) == set(KINDS) and runs["dot"] != runs["correlation"]
    with Store(study_store) as db:  # a sweep's tool calls are variants of its runs
        for kind, run_id in runs.items():
            stored = db.sql(
                "SELECT step, split, metric, value FROM results_training_curves r "
                "JOIN sweep_runs s ON r.run_id = s.run_id "
                "AND r.variant = s.variants['training_curves'] "
                f"WHERE r.run_id = '{run_id}' ORDER BY step, split, metric"
            )
            shipped = pl.from_arrow(pq.read_table(DEFAULT_OUT / f"{kind}_curves.parquet")).sort(
                "step", "split", "metric"
            )
            assert stored.equals(shipped.select(stored.columns)), kind


def test_the_harvest_gives_each_models_bpc_on_the_excerpt_and_their_patterns(study_store):
    runs = _runs(study_store)
    summary = json.loads((DEFAULT_OUT / "train_config.json").read_text())
    with Store(study_store) as db:
        for kind, run_id in runs.items():
            bpc = db.sql(
                "SELECT avg(-log2(r.target_prob)) AS bpc FROM results_logit_lens r "
                "JOIN sweep_runs s ON r.run_id = s.run_id "
                "AND r.variant = s.variants['logit_lens'] "
                f"WHERE r.run_id = '{run_id}' AND r.layer = 1 AND r.target_prob IS NOT NULL"
            )["bpc"][0]
            assert abs(bpc - summary["models"][kind]["final_validation_bpc"]) < 0.3, kind
            rows = db.sql(
                "SELECT q_pos, sum(weight) AS total, max(k_pos - q_pos) AS ahead "
                f"FROM act_attn_pattern WHERE run_id = '{run_id}' "
                "GROUP BY seq_id, layer, head, q_pos"
            )
            assert rows["ahead"].max() <= 0  # causal: nothing stored above the diagonal
            assert (rows["total"] - 1).abs().max() < 1e-4  # each query's weights sum to 1


def test_the_report_shows_the_verdict_and_every_chart(study_store):
    page = study_store / "studies" / "leviathan" / "report.html"
    text = page.read_text()
    verdict = re.search(r"Correlation attention is <b>(equal|better|worse)</b>", text)
    assert verdict is not None
    curves = []
    for kind in KINDS:
        frame = pl.from_arrow(pq.read_table(DEFAULT_OUT / f"{kind}_curves.parquet"))
        curves.append(frame.with_columns(attention=pl.lit(kind)))
    expected = verdict_from_curves(pl.concat(curves))
    assert verdict.group(1) == expected.word
    relative = expected.relative
    assert (abs(relative) < EQUAL_WITHIN) == (expected.word == "equal")
    assert (
        f"{expected.last_mean['correlation']:.4f}" in text
        and f"{expected.last_mean['dot']:.4f}" in text
    )
    for heading in (
        "Validation bits per character",
        "Training wall seconds per step",
        "residual stream norm",
        "Attention patterns of one window",
        "Learned lag weights of the correlation model",
        "Learned lags: ",
    ):
        assert heading in text
    assert not math.isnan(expected.seconds_per_step["correlation"])
    rendered = render_in_browser(page)  # every chart draws, offline
    assert rendered.statuses == ["rendered"] * 8 and not rendered.errors


def test_the_report_reads_each_points_own_tool_call(study_store, tmp_path):
    # Last in the module: it adds a result variant to the shared store. Another call of
    # training_curves on the dot run (here: the correlation model's curves, as a rerun
    # with another path would be) must change neither the verdict nor any chart.
    sweep_id = _sweep_id(study_store)
    before = tmp_path / "before.html"
    write_report(str(study_store), sweep_id, before)
    other = DEFAULT_OUT / "correlation_curves.parquet"
    analyze(
        _runs(study_store)["dot"],
        "training_curves",
        {"path": str(other)},
        store=str(study_store),
        variant="another-checkout",
    )
    with Store(study_store) as db:  # the second call is there, beside the point's own
        variants = db.sql(
            "SELECT DISTINCT variant FROM results_training_curves "
            f"WHERE run_id = '{_runs(study_store)['dot']}'"
        )["variant"]
    assert len(variants) == 2
    after = tmp_path / "after.html"
    write_report(str(study_store), sweep_id, after)
    assert after.read_text() == before.read_text()


def _sweep_id(store) -> str:
    with Store(store) as db:
        ids = db.sql("SELECT DISTINCT sweep_id FROM sweep_runs")["sweep_id"].to_list()
    assert len(ids) == 1
    return ids[0]
