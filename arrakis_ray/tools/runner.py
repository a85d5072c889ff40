"""Run a tool over a harvested run: one Ray task per shard, results as Parquet.

Everything is checked before any task starts (tool name, parameters, the hooks the
tool needs against the hooks the run harvested), so a bad call writes nothing. Each
task reads only its shard's files and writes ``results/<tool>/shard-NNNNN.parquet``
atomically; the driver then records the tool's parameters and schema version in the
run's manifest.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from arrakis_ray.config import _build, pipeline_from_dict, to_dict
from arrakis_ray.errors import ToolError
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store import parquet, schemas
from arrakis_ray.tools.base import ShardInputs, Tool

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8  # shard tasks submitted at once: bounds the object store's load


@dataclass(frozen=True)
class AnalyzeResult:
    """What an analyze call wrote."""

    tool: str
    run_id: str
    results_dir: Path
    shards: int
    rows: int
    seconds: float


def make_tool(name: str, params: dict[str, Any] | None = None, source: str = "--param") -> Tool:
    """Instantiate a registered tool with validated parameters."""
    from arrakis_ray.tools import TOOLS

    if name not in TOOLS:
        close = difflib.get_close_matches(name, list(TOOLS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ToolError(f"unknown tool '{name}'{hint}; known tools: {', '.join(sorted(TOOLS))}")
    cls = TOOLS[name]
    try:
        parsed = _build(cls.Params, dict(params or {}), source, "params")
    except Exception as exc:  # ConfigError from validation: re-raise as a tool error
        raise ToolError(f"tool {name}: {exc}") from None
    return cls(parsed)


def analyze(
    run: str | Path,
    tool_name: str,
    params: dict[str, Any] | None = None,
    store: str | Path | None = None,
) -> AnalyzeResult:
    """Run tool ``tool_name`` over every completed shard of ``run``."""
    from arrakis_ray.harvest.run import ensure_ray

    started = time.perf_counter()
    layout = store_layout.resolve_run(run, store)
    manifest = store_manifest.read_manifest(layout)
    tool = make_tool(tool_name, params)
    tool.result_schema()  # a missing schema file fails here, before any task runs
    missing = [h for h in tool.required_hooks(manifest) if h not in manifest["hooks"]]
    if missing:
        families = sorted({store_layout.hook_family(h) for h in missing})
        raise ToolError(
            f"tool {tool.name} needs hooks that run {layout.run_id} did not harvest: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; harvest again "
            f"with harvest.hooks including {', '.join(_glob_of(f) for f in families)}"
        )
    shards = sorted(layout.completed_shards())
    if not shards:
        raise ToolError(f"run {layout.run_id} has no completed shard to analyze")

    import ray

    ensure_ray()
    task = ray.remote(_run_shard).options(num_cpus=0.5)
    payload = (tool.name, to_dict(tool.params), str(layout.store_root), layout.run_id)
    pending, rows = [], 0
    for shard in shards:
        if len(pending) >= MAX_IN_FLIGHT:
            ready, pending = ray.wait(pending, num_returns=1)
            rows += sum(ray.get(ready))
        pending.append(task.remote(*payload, shard))
    rows += sum(ray.get(pending))

    seconds = time.perf_counter() - started
    manifest = store_manifest.read_manifest(layout)
    manifest.setdefault("results", {})[tool.name] = {
        "params": to_dict(tool.params),
        "schema_version": tool.schema_version,
        "shards": len(shards),
        "rows": rows,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store_manifest.write_manifest(layout, manifest)
    log.info("%s: %d rows over %d shards in %.1f s", tool.name, rows, len(shards), seconds)
    return AnalyzeResult(
        tool.name, layout.run_id, layout.results_dir(tool.name), len(shards), rows, seconds
    )


def _run_shard(tool_name: str, params: dict, store_root: str, run_id: str, shard: int) -> int:
    """A Ray task: compute one shard's result rows and write them; returns the row count."""
    layout = store_layout.RunLayout(store_root, run_id)
    manifest = store_manifest.read_manifest(layout)
    tool = make_tool(tool_name, params)
    families = sorted({store_layout.hook_family(h) for h in tool.required_hooks(manifest)})
    inputs = ShardInputs(
        run_id=run_id,
        shard=shard,
        manifest=manifest,
        activations={f: _read_family(layout, f, shard) for f in families},
        tokens=parquet.read_table(
            layout.shard_file(layout.tokens_dir, shard),
            schema_name="tokens",
            max_version=schemas.load_schema("tokens").version,
        ),
        vocab=_vocab(str(layout.vocab_path)),
    )
    model = _model(json.dumps(manifest["config"], sort_keys=True)) if tool.needs_weights else None
    table = tool.compute_shard(inputs, model)
    schema = tool.result_schema()
    parquet.write_table(
        table,
        layout.shard_file(layout.results_dir(tool.name), shard),
        schema_name=f"result.{tool.name}",
        schema_version=tool.schema_version,
        expected=schema,
    )
    return table.num_rows


def _read_family(layout, family: str, shard: int):
    name = f"activation.{store_layout.family_kind(family)}"
    return parquet.read_table(
        layout.shard_file(layout.activation_dir(family), shard),
        schema_name=name,
        max_version=schemas.load_schema(name).version,
    )


@lru_cache(maxsize=2)
def _model(config_json: str):
    """The run's model, loaded once per worker process."""
    from arrakis_ray.harvest.model_source import load_model

    config = pipeline_from_dict(json.loads(config_json))
    return load_model(config.model, device="cpu")


@lru_cache(maxsize=4)
def _vocab(path: str):
    import numpy as np

    table = parquet.read_table(
        Path(path), schema_name="vocab", max_version=schemas.load_schema("vocab").version
    )
    return np.asarray(table.column("token_text").to_pylist(), dtype=object)


def _glob_of(family: str) -> str:
    """The harvest glob that yields a hook family (resid_post -> blocks.*.hook_resid_post)."""
    if family.startswith("attn_"):
        return f"blocks.*.attn.hook_{family.removeprefix('attn_')}"
    if family in ("mlp_pre", "mlp_post"):
        return f"blocks.*.mlp.hook_{family.removeprefix('mlp_')}"
    return f"blocks.*.hook_{family}"
