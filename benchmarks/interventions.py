"""Interventions per second: batched activation patching and attribution patching
against the naive sweep, one forward per intervention.

    .venv/bin/python benchmarks/interventions.py --quick   # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/interventions.py           # more pairs and repeats
    .venv/bin/python benchmarks/interventions.py --device cuda   # on a GPU

Two models, in one invocation: the demo model (facts-gpt2: 4 layers, d_model 128, 4
heads) and a random-init gpt2 shaped like the harvest benchmark's (6 layers, d_model
256, 8 heads, the demo's vocabulary of 386). Both run the demo's patching pairs
(pipelines/data/facts_pairs.jsonl, 4-6 tokens each), every family (resid_pre,
resid_post, attn_out, mlp_out per layer and position, attn_z per head).

The tools' own ``compute_live`` runs on a ``LiveModel`` in this process, without Ray
(Ray only fans the same calls out over actors), so the figures are the tool's:

- ``naive``: ``activation_patching`` with ``batched: false``, one forward per
  intervention (the clean run cached once per pair, as TransformerLens's
  ``get_act_patch_*`` helpers do);
- ``batched``: the same sweep, each forward's rows patched at their own components
  (``max_batch`` 256);
- ``atp``: ``attribution_patching``, every component in 2 forwards and 1 backward.

Reported per model: interventions (components x pairs) per second of naive and batched,
their ratio (target >= 10x), the sweep's wall for each, AtP's speed-up over the naive
sweep (target >= 50x) and over the batched one, and the Pearson correlation of AtP's
estimated effects with the exact ones (patched minus corrupted logit difference: the
pairs' own logit differences, common to both, would inflate it), for heads (``attn_z``)
and for the residual stream (``resid_pre``). Each figure is the median over the repeats,
the three methods taking turns. The naive sweep runs on a subset of the pairs
(``--naive-pairs``): its rate is per intervention, so the subset only shortens the wall;
its sweep wall is scaled to all pairs. The batched and naive rows are checked equal
(1e-4). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arrakis_ray.config import ModelConfig  # noqa: E402
from arrakis_ray.live.model import local_model  # noqa: E402
from arrakis_ray.live.prompts import read_prompts  # noqa: E402
from arrakis_ray.tools import patching  # noqa: E402
from arrakis_ray.tools.runner import make_tool  # noqa: E402

PAIRS = REPO / "pipelines" / "data" / "facts_pairs.jsonl"
MODELS = {
    "demo": ModelConfig(zoo="facts-gpt2"),
    "gpt2_6x256": ModelConfig(
        arch="gpt2",
        config={"n_layer": 6, "n_embd": 256, "n_head": 8, "vocab_size": 386, "n_positions": 64},
        tokenizer="zoo:facts-gpt2",
    ),
}


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def values(table: pa.Table, family: str | None = None, effect: bool = False) -> np.ndarray:
    """The table's logit diffs in component order (item, family, layer, pos, head); with
    ``effect``, minus the pair's corrupted logit diff (what a patch changed)."""
    import pyarrow.compute as pc

    if family is not None:
        table = table.filter(pc.equal(table["family"], family))
    order = pc.sort_indices(
        table, [(k, "ascending") for k in ("item", "family", "layer", "pos", "head")]
    )
    table = table.take(order)
    found = table["logit_diff"].to_numpy(zero_copy_only=False)
    if effect:
        found = found - table["corrupted_logit_diff"].to_numpy(zero_copy_only=False)
    return found


def measure(name: str, config: ModelConfig, pairs: pa.Table, args) -> dict:
    model = local_model(config, num_gpus=1 if args.device == "cuda" else 0)
    subset = pairs.slice(0, args.naive_pairs)
    tools = {
        "naive": (make_tool("activation_patching", {"batched": False}), subset),
        "batched": (make_tool("activation_patching", {"max_batch": 256}), pairs),
        "atp": (make_tool("attribution_patching"), pairs),
    }
    for tool, items in tools.values():  # warm-up: first calls pay allocation and dispatch
        tool.compute_live(items.slice(0, 2), model)
    walls: dict[str, list[float]] = {k: [] for k in tools}
    tables: dict[str, pa.Table] = {}
    for _ in range(args.repeats):
        for method, (tool, items) in tools.items():
            sync(args.device)
            wall, tables[method] = timed(lambda t=tool, i=items: t.compute_live(i, model))
            sync(args.device)
            walls[method].append(wall)
    wall = {k: statistics.median(v) for k, v in walls.items()}
    counts = {k: tables[k].num_rows for k in tools}
    rate = {k: counts[k] / wall[k] for k in tools}
    naive_sweep = counts["batched"] / rate["naive"]  # the naive wall over every pair
    import pyarrow.compute as pc

    batched = tables["batched"]
    exact_subset = values(batched.filter(pc.less(batched["item"], args.naive_pairs)))
    check = float(np.abs(exact_subset - values(tables["naive"])).max())
    if check > 1e-4:
        raise SystemExit(f"{name}: batched and naive patching differ by {check}")
    correlation = {
        family: float(
            np.corrcoef(
                values(tables["batched"], family, effect=True),
                values(tables["atp"], family, effect=True),
            )[0, 1]
        )
        for family in ("attn_z", "resid_pre")
    }
    figures = {
        "pairs": pairs.num_rows,
        "interventions": counts["batched"],
        "naive_per_s": round(rate["naive"], 1),
        "batched_per_s": round(rate["batched"], 1),
        "batched_over_naive": round(rate["batched"] / rate["naive"], 2),
        "naive_sweep_s": round(naive_sweep, 3),
        "batched_sweep_s": round(wall["batched"], 3),
        "atp_sweep_s": round(wall["atp"], 3),
        "atp_over_naive": round(naive_sweep / wall["atp"], 1),
        "atp_over_batched": round(wall["batched"] / wall["atp"], 2),
        "atp_pearson_heads": round(correlation["attn_z"], 4),
        "atp_pearson_resid_pre": round(correlation["resid_pre"], 4),
    }
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--naive-pairs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    args.pairs = args.pairs or (48 if args.quick else 197)
    args.naive_pairs = args.naive_pairs or (8 if args.quick else 24)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(2)
    pairs = read_prompts(PAIRS, patching.PAIR_COLUMNS).slice(0, args.pairs)
    pairs = pairs.append_column("run_id", pa.array(["bench"] * pairs.num_rows))
    results = {name: measure(name, config, pairs, args) for name, config in MODELS.items()}
    print(json.dumps({"device": args.device, "repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()
