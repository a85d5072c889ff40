"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "pipelines" / "data" / "facts.jsonl"

# every family the harvest writes for a gpt2-style model, stored as float32 so the
# values can be compared tightly with the model's own outputs
ALL_HOOKS = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_resid_mid",
    "blocks.*.hook_resid_post",
    "blocks.*.attn.hook_q",
    "blocks.*.attn.hook_k",
    "blocks.*.attn.hook_v",
    "blocks.*.attn.hook_z",
    "blocks.*.attn.hook_pattern",
    "blocks.*.hook_attn_out",
    "blocks.*.mlp.hook_pre",
    "blocks.*.mlp.hook_post",
    "blocks.*.hook_mlp_out",
    "ln_final.hook_normalized",
    "logits",
]


def pipeline_dict(**harvest_overrides) -> dict:
    """A small pipeline over the demo data: 40 documents in 3 shards."""
    return {
        "name": "test-facts",
        "model": {"zoo": "facts-gpt2"},
        "data": {
            "path": str(DEMO_DATA),
            "context_length": 24,
            "max_documents": 40,
            "keep_columns": ["relation"],  # the knowledge prober's label
        },
        "harvest": {
            "hooks": ALL_HOOKS,
            "batch_size": 8,
            "shard_size": 16,
            "storage_dtype": "float32",
            **harvest_overrides,
        },
        "analyze": [{"tool": "logit_lens"}],
    }


def store_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``: equal snapshots = store untouched."""
    return (
        {
            str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        if root.exists()
        else {}
    )


def family_table(run_dir, family: str):
    """Every stored row of a hook family as one table with all its columns (``d0..``):
    all shards and layers, column blocks side by side, read through ``RunReader``."""
    import pyarrow as pa

    from arrakis_ray.store.reader import RunReader

    reader = RunReader.open(run_dir)
    return pa.concat_tables([table for _shard, table in reader.iter_activations(family)])


def reinventory(layout) -> None:
    """Take a run's files as they are now as written: every shard's inventory, the
    vocabulary's and the tool records' entries are read back from the files. For tests
    that rewrite a stored file on purpose (a fixture's new values), not damage it."""
    from dataclasses import replace

    from arrakis_ray.store.inventory import (
        describe_file,
        read_shard_inventories,
        write_shard_inventory,
        write_vocab_inventory,
    )
    from arrakis_ray.store.manifest import read_manifest, write_tool_record

    for inventory in read_shard_inventories(layout).values():
        files = tuple(describe_file(layout, f.location(layout)) for f in inventory.files)
        write_shard_inventory(layout, replace(inventory, files=files))
    if layout.vocab_path.exists():
        write_vocab_inventory(layout, describe_file(layout, layout.vocab_path))
    for tool, record in read_manifest(layout).results.items():
        files = tuple(describe_file(layout, f.location(layout)) for f in record.files)
        write_tool_record(layout, tool, replace(record, files=files))


def with_run_id(items, run_id: str = "local"):
    """A prompt table as the live runner hands it to compute_live (with ``run_id``)."""
    import pyarrow as pa

    return items.append_column("run_id", pa.array([run_id] * items.num_rows, pa.string()))


def study_page(store: str, sweep_id: str, out: Path) -> None:
    """A study report: each point's checkpoint and run, as the store's SQL has them."""
    from arrakis_ray.store.catalog import Store

    with Store(store) as db:
        rows = db.sql(
            "SELECT params['model.checkpoint'] AS checkpoint, run_id FROM sweep_runs "
            f"WHERE sweep_id = '{sweep_id}' ORDER BY checkpoint"
        ).rows()
    out.write_text(json.dumps([list(r) for r in rows]))


def failing_study_page(store: str, sweep_id: str, out: Path) -> None:
    """A study report that finds nothing to draw (as a report of a wrong store would)."""
    raise ValueError(f"sweep {sweep_id}: no completed run of the final checkpoint")
