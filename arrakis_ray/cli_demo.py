"""``arrakis-ray demo``: the whole chain on the shipped demo model, into one store.

The demo pipeline (harvest, every tool, the report), an example query, the Arrakis
walkthrough recorded as experiments, the demo sweep, then the offline site. Only the
CLI prints.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from arrakis_ray.resources import demo_pipeline
from arrakis_ray.store.location import store_path

DEMO_QUERY = """SELECT layer,
       round(avg(target_prob), 3) AS mean_p_next,
       round(avg(CASE WHEN target_rank = 1 THEN 1 ELSE 0 END), 3) AS top1_acc
FROM results_logit_lens
WHERE target_rank IS NOT NULL
GROUP BY layer ORDER BY layer"""


def run_demo(store: str) -> None:
    """The demo: the demo pipeline, its SQL, the bench walkthrough, the demo sweep, the site."""
    from arrakis_ray.cli import run_pipeline

    started = time.perf_counter()
    run_dir, report = run_pipeline(demo_pipeline(), store)
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.store.formatting import format_frame

    with Store(store) as db:
        frame = db.sql(DEMO_QUERY)
        views = db.views()
    print("\nExample SQL (how well each layer already predicts the next token):")
    print(f'  arrakis-ray sql {store} "{" ".join(DEMO_QUERY.split())}"\n')
    print(format_frame(frame, "table"))
    print(f"\nviews: {', '.join(views)}")
    print(f"store:  {store_path(store)}")
    print(f"run:    {run_dir}")
    print(f"report: {report.html}")
    _demo_bench(store)
    _demo_sweep(store)
    from arrakis_ray.reports.site import build_site
    from arrakis_ray.store.location import is_remote

    # the site is opened in a browser: beside the store, or here for an object store
    root = store_path(store)
    site = build_site(store, Path("site") if is_remote(root) else root / "site")
    print(f"site:   {site.index}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


SWEEP_QUERY = """SELECT m.layer, s.params['analyze.superposition_disentangler.params.k'] AS k,
       round(m.fraction_of_variance_explained, 3) AS fve, m.dead_features
FROM sweep_runs s JOIN results_sae_metrics m
  ON m.run_id = s.run_id AND m.variant = s.variants['superposition_disentangler']
WHERE s.sweep = 'sae-k-by-layer' ORDER BY m.layer, k"""


def _demo_sweep(store: str) -> None:
    """The demo sweep (pipelines/sweeps/demo.yaml: an SAE's k by layer, 4 points on one
    harvest) into the demo's store, so SQL and the site show a sweep."""
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.store.formatting import format_frame
    from arrakis_ray.sweeps.execute import run_sweep
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import load_sweep

    sweep_file = demo_pipeline().parent / "sweeps" / "demo.yaml"
    outcome = run_sweep(plan_sweep(load_sweep(sweep_file), store), store, echo=lambda _: None)
    print(f"sweep:  {outcome.summary().splitlines()[0]}")
    with Store(store) as db:
        frame = db.sql(SWEEP_QUERY)
    print(f'  arrakis-ray sql {store} "{" ".join(SWEEP_QUERY.split())}"\n')
    print(format_frame(frame, "table"))


def _demo_bench(store: str) -> None:
    """The Arrakis walkthrough (pipelines/coming_from_arrakis.py) into the demo's store,
    so the site and SQL show experiments; its own printing is kept out of the console."""
    import contextlib
    import io
    import runpy

    from arrakis_ray.resources import data_dir

    script = data_dir("pipelines") / "coming_from_arrakis.py"
    argv = sys.argv
    sys.argv = [str(script), str(store)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    print(f"bench:  the Arrakis walkthrough ({script.name}) recorded its experiments:")
    print(f'  arrakis-ray sql {store} "SELECT name, version, kind, n_calls FROM experiments"')
