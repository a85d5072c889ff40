"""Shard inputs of the decomposition tools, built from a live tiny model's run.

``model_shard`` runs a HookedModel with ``run_with_cache`` and converts the cache with
the harvest's own table builders (``arrakis_ray.harvest.tables``), so a tool sees the
same wide tables, and the typed manifest (``runs.synthetic_manifest``), a harvest would
have written, without Ray or a store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from runs import shard_plan, synthetic_manifest

from arrakis_ray.harvest import tables
from arrakis_ray.harvest.plan import model_shape
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import schemas
from arrakis_ray.store.manifest import RunManifest
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import ShardInputs

HOOKS = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_resid_post",
    "blocks.*.attn.hook_z",
    "blocks.*.hook_attn_out",
    "blocks.*.hook_mlp_out",
    "logits",
]


def batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[batch, max(lengths)]`` and a right-padded attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def model_shard(model, ids: torch.Tensor, mask: torch.Tensor, run_id: str = "tiny") -> tuple:
    """(ShardInputs, cache) of one forward pass; every family stored as float32."""
    hooks = [h for h in HOOKS if h != "hook_pos_embed" or model.adapter.pos_embed]
    _, cache = model.run_with_cache(ids, attention_mask=mask, hooks=hooks)
    m = mask.numpy().astype(bool)
    seq_ids = np.arange(len(ids), dtype=np.int64) + 100  # not 0-based: keys must not assume it
    families: dict[str, list] = {}
    for name, tensor in cache.items():
        kind, width = model.hook_shape(name)
        schema = schemas.activation_schema(kind, width, "float32")
        build = tables.head_table if kind == "head" else tables.dense_table
        part = build(schema, run_id, model.layer_of(name), tensor.float().numpy(), m, seq_ids)
        families.setdefault(store_layout.hook_family(name), []).append(part)
    vocab = np.array([f"t{i}" for i in range(model.vocab_size)], dtype=object)
    doc_ids = np.repeat(seq_ids[:, None], m.shape[1], axis=1)  # one document per sequence
    doc_pos = np.broadcast_to(np.arange(m.shape[1]), m.shape)
    token_table = tables.tokens_table(
        schemas.tokens_schema(), run_id, seq_ids, doc_ids, doc_pos, ids.numpy(), m, vocab
    )
    resolved = model.resolve_hooks(hooks)
    shards = shard_plan(len(ids), len(ids), first_doc=int(seq_ids[0]))
    manifest = synthetic_manifest(run_id, resolved, model_shape(model), shards)
    inputs = ShardInputs(
        run_id=run_id,
        shard=0,
        manifest=manifest,
        # shuffle row order: a tool must align rows by key, not by position in the file
        activations={f: _shuffled(pa.concat_tables(p)) for f, p in families.items()},
        tokens=_shuffled(token_table),
        vocab=vocab,
    )
    return inputs, cache


def _shuffled(table):
    order = np.random.default_rng(0).permutation(table.num_rows)
    return table.take(order)


def stored_shard(
    run_dir: Path,
    shard: int,
    manifest: RunManifest | dict | None = None,
    vocab: np.ndarray | None = None,
) -> ShardInputs:
    """ShardInputs of one shard of a harvested run, read through ``RunReader`` (every
    family on disk). ``manifest`` (the run's, or its ``manifest.json`` object, perhaps
    edited) and ``vocab`` default to the stored ones."""
    reader = RunReader.open(run_dir)
    if isinstance(manifest, dict):
        manifest = RunManifest.from_json(manifest, str(reader.layout.manifest_path))
    return ShardInputs(
        run_id=reader.run_id,
        shard=shard,
        manifest=manifest or reader.manifest,
        activations={f: reader.activations(f, shard) for f in reader.families},
        tokens=reader.tokens(shard),
        vocab=reader.vocab if vocab is None else vocab,
    )


def wide(table, layer: int | None = None) -> dict[tuple[int, int], np.ndarray]:
    """(seq_id, pos) -> float64 vector of a dense table (one layer)."""
    if layer is not None:
        table = table.filter(table.column("layer").to_numpy() == layer)
    dims = [c for c in table.column_names if c[0] == "d" and c[1:].isdigit()]
    values = np.column_stack([table[c].to_numpy() for c in dims]).astype(np.float64)
    seq = table["seq_id"].to_numpy()
    pos = table["pos"].to_numpy()
    return {(int(s), int(p)): v for s, p, v in zip(seq, pos, values, strict=True)}


# every architecture, with the variants that change the residual algebra
ARCH_CASES = [
    ("gpt2", {}),
    ("gpt-neo", {}),
    ("gpt-neox", {"use_parallel_residual": True}),
    ("gpt-neox", {"use_parallel_residual": False}),
    ("llama", {"attention_bias": True}),
    ("gemma", {}),
    ("phi3", {}),
    ("qwen2", {}),
    ("mistral", {}),
    ("stablelm", {"use_parallel_residual": True}),
]


def case_id(case: tuple[str, dict]) -> str:
    arch, overrides = case
    return arch + "".join(f"-{k}={v}" for k, v in overrides.items())


def tiny(arch: str, seed: int = 0, **overrides):
    """A tiny random model whose final norm has random gain and bias (not 1 and 0).

    Random-init norms are the identity (gemma's weight is 0, its gain 1 + 0), which
    would hide a wrong gain or a missing bias; a random one does not.
    """
    from arrakis_ray.models import build_model
    from arrakis_ray.models.adapters import get_module

    model = build_model(arch, seed=seed, **overrides)
    norm = get_module(model.model, model.adapter.final_norm)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen) * 0.4 + norm.weight)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) * 0.2)
    return model
