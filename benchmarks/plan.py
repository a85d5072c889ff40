"""Planning speed: ``plan_run`` over many variants of the demo pipeline, as a sweep would.

    .venv/bin/python benchmarks/plan.py            # 1,000 configs
    .venv/bin/python benchmarks/plan.py --n 200

Each config is the demo pipeline with another hook selection (one layer of one family
or all layers of it) and another seed; a sweep plans them all to dedupe (same run id:
same run) and to add up their predicted size before launching anything. The baseline
is the first plan in the process, which pays for the imports, the meta-device model and
the file fingerprints once. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from arrakis_ray.config import load_pipeline, pipeline_from_dict, to_dict

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
FAMILIES = ("hook_resid_post", "hook_resid_pre", "mlp.hook_post", "attn.hook_z", "hook_mlp_out")


def variants(n: int) -> list:
    """``n`` configs of the demo pipeline: other hooks, layers, shard sizes and seeds."""
    base = to_dict(load_pipeline(DEMO))
    layers = ["*", "0", "1", "2", "3"]
    out = []
    for i in range(n):
        family, layer, seed = FAMILIES[i % 5], layers[i // 5 % 5], i
        raw = json.loads(json.dumps(base))
        raw["harvest"]["hooks"] = [f"blocks.{layer}.{family}"]
        raw["harvest"]["shard_size"] = 10 + seed % 7
        raw["model"]["seed"] = seed
        raw.pop("source")
        out.append(pipeline_from_dict(raw, source=f"variant-{i}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from arrakis_ray.harvest.plan import plan_run

    configs = variants(args.n)
    t1 = time.perf_counter()
    first = plan_run(configs[0])
    t2 = time.perf_counter()
    plans = [plan_run(c) for c in configs]
    t3 = time.perf_counter()
    run_ids = {p.run_id for p in plans}
    figures = {
        "configs": len(configs),
        "distinct_run_ids": len(run_ids),
        "build_configs_s": round(t1 - t0, 3),
        "first_plan_s": round(t2 - t1, 3),
        "all_plans_s": round(t3 - t2, 3),
        "per_plan_ms": round(1000 * (t3 - t2) / len(configs), 3),
        "first_over_per_plan": round((t2 - t1) / ((t3 - t2) / len(configs)), 1),
        "predicted_total_mb": round(sum(p.predicted_bytes for p in plans) / 1e6, 1),
        "ray_imported": "ray" in sys.modules,
        "first_run_id": first.run_id,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
