"""Dry-run speed: ``arrakis-ray sweep SWEEP --store S --dry-run`` as whole processes.

    .venv/bin/python benchmarks/sweep_plan.py
    .venv/bin/python benchmarks/sweep_plan.py --sweep pipelines/sweeps/bench.yaml --repeats 5

``pipelines/sweeps/grid1000.yaml`` is 10 data sizes x 5 hook sets x 4 values of k x 5
dictionary sizes of the demo model's sparse autoencoder: 1,000 points, 50 distinct
harvests. The store is a new empty directory (nothing complete), so every point is
planned and none is read back. Each figure is the wall time of a fresh process, what a
user waits for, median of ``--repeats``:

- ``cold_s``: an empty facts cache (``ARRAKIS_RAY_CACHE_DIR``, a new directory each
  time): the first ``plan_run`` imports torch and transformers and builds the model on
  the meta device (``harvest/facts_cache.py``).
- ``cached_s``: a second process on that cache: it imports neither.

Target (issue 14): under 5 s, without Ray. The two processes must print the same plan.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "pipelines" / "sweeps" / "grid1000.yaml"
# the CLI run with a note of what it imported, printed last on stderr
PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print(json.dumps(
    {m: m in sys.modules for m in ("torch", "transformers", "ray")}), file=sys.stderr))
sys.argv = ["arrakis-ray", *sys.argv[1:]]
runpy.run_module("arrakis_ray.cli", run_name="__main__")
"""


def dry_run(sweep: Path, store: Path, cache: Path, probe: bool = False):
    """(wall seconds, stdout, stderr) of one ``sweep --dry-run`` process."""
    env = {**os.environ, "ARRAKIS_RAY_CACHE_DIR": str(cache)}
    head = [sys.executable, "-c", PROBE] if probe else [sys.executable, "-m", "arrakis_ray.cli"]
    command = [*head, "sweep", str(sweep), "--store", str(store), "--dry-run"]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds, done.stdout, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=GRID)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cold, cached, plans = [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for i in range(args.repeats):
            cache = Path(tmp) / f"cache-{i}"  # empty: every fact is learned
            seconds, first, _ = dry_run(args.sweep, store, cache)
            cold.append(seconds)
            seconds, second, _ = dry_run(args.sweep, store, cache)
            cached.append(seconds)
            plans.update([first, second])
        # not timed: what a process on a filled cache imports
        _, text, stderr = dry_run(args.sweep, store, cache, probe=True)
        plans.add(text)
    imported = json.loads(stderr.strip().splitlines()[-1])
    summary = text.strip().splitlines()[-1]  # "1000 points: ... predicted ... bytes"
    figures = {
        "sweep": args.sweep.name,
        "points": int(summary.split()[0]),
        "summary": summary,
        "repeats": args.repeats,
        "cold_s": round(statistics.median(cold), 2),
        "cached_s": round(statistics.median(cached), 2),
        "cold_runs_s": [round(s, 2) for s in cold],
        "cached_runs_s": [round(s, 2) for s in cached],
        "same_plan": len(plans) == 1,
        "cached_imports": sorted(m for m, present in imported.items() if present),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
