"""A sweep's settings of a tool (variant records) stay out of the reports: the run report
and the site open the Store with ``variants=False``, which shows the runs' own calls only."""

from __future__ import annotations

import json
import re
import shutil

import polars as pl
import pytest

from arrakis_ray.reports.run_report import LENS_BY_LAYER, build_report
from arrakis_ray.store.catalog import Store

VARIANT = "abc123def456"


@pytest.fixture(scope="module")
def stores(harvested, tmp_path_factory):
    """(plain store, swept store, run's path under a store): two copies of the shared
    harvest, the second with a variant of logit_lens beside the run's own call."""
    from arrakis_ray.tools.runner import analyze

    _, store, result = harvested
    base = tmp_path_factory.mktemp("variants")
    plain, swept = base / "plain", base / "swept"
    shutil.copytree(store, plain)
    shutil.copytree(store, swept)
    run = result.run_dir.relative_to(store)
    analyze(swept / run, "logit_lens", {"include_embed": True}, variant=VARIANT)
    return plain, swept, run


def _lens(root, **kw) -> pl.DataFrame:
    with Store(root, **kw) as db:
        return db.sql("SELECT * FROM results_logit_lens ORDER BY ALL")


def test_store_without_variants_is_the_store_before_the_sweep(stores):
    plain, swept, _ = stores
    before = _lens(plain)
    without = _lens(swept, variants=False)
    assert "variant" not in without.columns
    assert without.equals(before)  # row for row, same columns
    every = _lens(swept)
    # the run's own call (NULL) plus the variant's rows, which add the embedding layer -1
    own = every.filter(pl.col("variant").is_null()).drop("variant")
    assert own.sort(own.columns).equals(before.sort(before.columns))
    extra = every.filter(pl.col("variant") == VARIANT)
    assert len(every) == len(before) + len(extra)
    assert extra["layer"].min() == -1 and before["layer"].min() >= 0
    assert set(every["variant"].unique().to_list()) == {None, VARIANT}


def test_a_tool_only_a_variant_ran_has_no_view_without_variants(harvested, tmp_path):
    from arrakis_ray.tools.runner import analyze

    _, store, result = harvested
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    run_dir = copy / result.run_dir.relative_to(store)
    shutil.rmtree(run_dir / "results" / "logit_lens")
    (run_dir / "tools" / "logit_lens.json").unlink()
    analyze(run_dir, "logit_lens", variant=VARIANT)
    with Store(copy, variants=False) as db:
        assert "results_logit_lens" not in db.views()
    with Store(copy) as db:
        assert db.sql("SELECT DISTINCT variant FROM results_logit_lens")["variant"].to_list() == [
            VARIANT
        ]


def _rows(spec: dict) -> list[list[str]]:
    """Each embedded dataset's rows, as sorted JSON lines, in a sorted list."""
    datasets = (spec.get("datasets") or {}).values()
    return sorted(sorted(json.dumps(row, sort_keys=True) for row in rows) for rows in datasets)


def _specs(html: str) -> dict[str, dict]:
    """Chart slug -> its embedded Vega-Lite spec (with its datasets)."""
    found = re.findall(r'<script type="application/json" id="spec-([^"]+)">(.*?)</script>', html)
    return {slug: json.loads(text) for slug, text in found}


def test_run_report_draws_the_same_data_with_a_variant_present(stores, tmp_path):
    plain, swept, run = stores
    before = build_report(plain / run, out_dir=tmp_path / "plain", png=False)
    after = build_report(swept / run, out_dir=tmp_path / "swept", png=False)
    specs_before = _specs(before.html.read_text())
    specs_after = _specs(after.html.read_text())
    assert specs_before and specs_before.keys() == specs_after.keys()
    for slug, spec in specs_before.items():
        # rows compared as sets: a report query without ORDER BY may return them in
        # another order (and Altair names a dataset by a hash of its rows)
        assert _rows(spec) == _rows(specs_after[slug]), slug
    # the check has teeth: the layer summary over every setting differs from the run's own
    run_id = run.name
    with Store(swept) as mixed, Store(swept, variants=False) as own:
        sql = LENS_BY_LAYER.format(run_id=run_id)
        assert not mixed.sql(sql).equals(own.sql(sql))


def test_site_shows_no_variant_tool_page(stores, tmp_path):
    from arrakis_ray.reports.site import build_site

    _, swept, run = stores
    site = build_site(swept, tmp_path / "site", top_features=0)
    names = {p.name for p in site.pages}
    assert "logit_lens.html" in names
    assert not any(VARIANT in name for name in names)
