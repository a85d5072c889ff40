"""Dry-run speed: load, expand and plan a 1,000-point sweep, as ``sweep --dry-run`` does.

    .venv/bin/python benchmarks/sweep_plan.py
    .venv/bin/python benchmarks/sweep_plan.py --sweep pipelines/sweeps/bench.yaml

``pipelines/sweeps/grid1000.yaml`` is 10 data sizes x 5 hook sets x 4 values of k x 5
dictionary sizes of the demo model's sparse autoencoder: 1,000 points, 50 distinct
harvests. The store is a new empty directory (nothing complete), so every point is
planned and none is read back. Timed from a fresh process: the total includes importing
arrakis-ray, torch and transformers (the first ``plan_run`` builds the model on the meta
device), which is what a user waits for. Target (issue 14): under 5 s, without Ray. The
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GRID = Path(__file__).resolve().parents[1] / "pipelines" / "sweeps" / "grid1000.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=GRID)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.spec import expand, load_sweep

    t1 = time.perf_counter()
    sweep = load_sweep(args.sweep)
    t2 = time.perf_counter()
    points = expand(sweep)  # timed alone here; plan_sweep expands again (not counted twice)
    t3 = time.perf_counter()
    from arrakis_ray.harvest.plan import plan_run

    plan_run(points[0].config)  # the baseline: torch, transformers, the meta model, hashes
    t4 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_sweep(sweep, Path(tmp) / "store")
        t5 = time.perf_counter()
        text = plan.describe()
        t6 = time.perf_counter()
    figures = {
        "sweep": str(args.sweep.name),
        "points": len(plan.points),
        "distinct_points": len(plan.points) - len(plan.with_status("duplicate")),
        "distinct_harvests": len(plan.harvests_to_run),
        "import_s": round(t1 - t0, 3),
        "load_s": round(t2 - t1, 3),
        "expand_s": round(t3 - t2, 3),
        "first_plan_run_s": round(t4 - t3, 3),
        "plan_sweep_s": round(t5 - t4, 3),
        "describe_s": round(t6 - t5, 3),
        "describe_lines": len(text.splitlines()),
        # load + plan_sweep (which expands) + describe, from a fresh process
        "total_s": round((t6 - t0) - (t3 - t2), 3),
        "ray_imported": "ray" in sys.modules,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
