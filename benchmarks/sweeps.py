"""Sweep speed: one ``arrakis-ray sweep`` against the same runs as separate ``arrakis-ray run``s.

    .venv/bin/python benchmarks/sweeps.py
    .venv/bin/python benchmarks/sweeps.py --sweep pipelines/sweeps/bench.yaml --repeat 2

The sweep (``pipelines/sweeps/bench.yaml``: 4 hook sets x 2 tool settings on the demo
model, 8 runs) goes to a fresh store through one ``arrakis-ray sweep`` process. The
baseline is what a researcher does without sweeps: each of the same 8 expanded pipelines
written to a YAML file and run with its own ``arrakis-ray run`` process, into another
fresh store, one after the other. Both sides are whole processes in this invocation,
timed by wall clock; they take turns when ``--repeat`` > 1 and the medians are compared.
Then the time of ``arrakis-ray sweep --dry-run`` over ``pipelines/sweeps/grid1000.yaml``
(1,000 points; nothing is run) in a fresh process. The last line is one JSON object with
every figure.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "arrakis_ray.cli"]


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def pipeline_files(sweep_path: Path, directory: Path) -> list[Path]:
    """The sweep's expanded points, each written as a pipeline for ``arrakis-ray run``."""
    from arrakis_ray.config import to_dict
    from arrakis_ray.sweeps.spec import expand, load_sweep

    files = []
    for point in expand(load_sweep(sweep_path)):
        raw = to_dict(point.config)
        raw.pop("source")
        path = directory / f"point-{point.index}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "pipelines/sweeps/bench.yaml")
    parser.add_argument("--grid", type=Path, default=ROOT / "pipelines/sweeps/grid1000.yaml")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # a local cluster per process, on both sides

    sweep_s, separate_s = [], []
    with tempfile.TemporaryDirectory(prefix="arrakis-bench-sweeps-") as tmp:
        tmp = Path(tmp)
        files = pipeline_files(args.sweep, tmp)
        for i in range(args.repeat):
            store = tmp / f"sweep-{i}"
            sweep_s.append(timed([*CLI, "sweep", str(args.sweep), "--store", str(store)], env))
            print(f"sweep of {len(files)} runs: {sweep_s[-1]:.1f} s", flush=True)
            store = tmp / f"separate-{i}"
            total = 0.0
            for file in files:
                total += timed([*CLI, "run", str(file), "--store", str(store)], env)
            separate_s.append(total)
            print(f"{len(files)} separate runs: {total:.1f} s", flush=True)
        dry = timed([*CLI, "sweep", str(args.grid), "--store", str(tmp / "dry"), "--dry-run"], env)
        print(f"dry run of {args.grid.name}: {dry:.2f} s (a fresh process)", flush=True)
    sweep, separate = statistics.median(sweep_s), statistics.median(separate_s)
    figures = {
        "runs": len(files),
        "sweep_s": round(sweep, 1),
        "separate_s": round(separate, 1),
        "speedup": round(separate / sweep, 2),
        "dry_run_1000_s": round(dry, 2),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
    }
    print(f"sweep is {figures['speedup']}x faster than separate runs (target >= 3x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
