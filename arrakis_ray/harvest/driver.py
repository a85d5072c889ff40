"""The harvest driver: validate, plan, then stream shards through Ray Data actors.

Everything that can be wrong with the inputs (config, hooks, data, model path) is
checked before the store is touched. The run id is a content hash of what determines
the output, so an identical rerun finds its own run and only finishes the shards that
lack a completion marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from arrakis_ray.config import PipelineConfig, to_dict
from arrakis_ray.errors import ArrakisError, ConfigError
from arrakis_ray.harvest.actor import CONCURRENT_SHARDS, HarvestStage
from arrakis_ray.harvest.inputs import data_fingerprint, plan_shards
from arrakis_ray.harvest.model_source import (
    describe_model,
    load_tokenizer,
    model_source_fingerprint,
    vocab_texts,
)
from arrakis_ray.harvest.tokenize import TokenizeShard
from arrakis_ray.store import layout as store_layout
from arrakis_ray.store import manifest as store_manifest
from arrakis_ray.store import parquet, schemas

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarvestResult:
    """What a harvest call did."""

    run_id: str
    run_dir: Path
    status: str  # "complete" | "already complete"
    shards_done: int  # shards harvested by this call
    shards_total: int
    tokens: int  # tokens harvested by this call
    bytes_written: int
    seconds: float


def harvest(config: PipelineConfig, store: str | Path) -> HarvestResult:
    """Harvest ``config`` into ``store`` (created if needed); resumes a partial run."""
    started = time.perf_counter()
    model = describe_model(config.model)
    hooks = model.resolve_hooks(config.harvest.hooks)
    if config.harvest.shard_size is None:  # resolved before the run id is hashed
        size = auto_shard_size(config, model, hooks)
        config = replace(config, harvest=replace(config.harvest, shard_size=size))
    shards = plan_shards(config.data.path, config.harvest.shard_size, config.data.max_documents)
    tokenizer = load_tokenizer(config.model)
    stages = stage_ranges(config, model.n_layers)
    identity = {
        "model": model_source_fingerprint(config.model),
        "data": data_fingerprint(shards, config.data.text_column),
        "hooks": hooks,
        "context_length": config.data.context_length,
        "mode": config.data.mode,
        "storage_dtype": config.harvest.storage_dtype,
        "shard_size": config.harvest.shard_size,
    }
    if len(stages) > 1:  # a sharded run stores its layers in per-stage file parts
        identity["stages"] = stages
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    n_docs = sum(s.count for s in shards)
    if config.data.mode == "document":  # every document cut to the context length
        max_tokens = n_docs * config.data.context_length
    else:  # packed: nothing is cut; a token takes at least one byte of text (+ BOS, EOS)
        max_tokens = _data_bytes(shards) + 2 * n_docs
    predicted = predict_bytes(
        model, hooks, max_tokens, config.data.context_length, config.harvest.storage_dtype
    )
    log.info(
        "run %s: %d documents in %d shards, at most %.1f MB on disk",
        run_id,
        n_docs,
        len(shards),
        predicted / 1e6,
    )
    budget = config.harvest.max_bytes
    if budget is not None and predicted > budget:
        raise ConfigError(
            f"{config.source}: harvest.max_bytes: this run may write up to {predicted:,} bytes "
            f"(at most {max_tokens:,} tokens), over the budget of "
            f"{budget:,}; harvest fewer hooks or documents, or raise the budget"
        )

    store_layout.init_store(store)
    layout = store_layout.RunLayout(store, run_id)
    done = layout.completed_shards() if layout.manifest_path.exists() else set()
    pending = [s for s in shards if s.shard not in done]
    manifest = (
        store_manifest.read_manifest(layout)
        if layout.manifest_path.exists()
        else _new_manifest(config, run_id, model, hooks, shards, stages, identity, predicted)
    )
    if not pending:
        log.info("run %s is already complete: nothing to do", run_id)
        if manifest.get("status") != "complete":
            manifest["status"] = "complete"
            store_manifest.write_manifest(layout, manifest)
        return HarvestResult(run_id, layout.root, "already complete", 0, len(shards), 0, 0, 0.0)
    if done:
        log.info("resuming run %s: %d of %d shards already done", run_id, len(done), len(shards))
    manifest["status"] = "running"
    manifest["harvest"]["resumed"] = manifest["harvest"].get("resumed", False) or bool(done)
    store_manifest.write_manifest(layout, manifest)
    if not layout.vocab_path.exists():
        _write_vocab(layout, tokenizer, model.vocab_size)

    try:
        done = _run_shards(config, layout, hooks, stages, pending, len(shards))
    except Exception as exc:
        # completed shards keep their markers and stay usable; the run says it failed
        cause = _user_error(exc)
        manifest = store_manifest.read_manifest(layout)
        manifest["status"] = "failed"
        manifest["error"] = str(cause or exc)[:2000]
        store_manifest.write_manifest(layout, manifest)
        if cause is not None:
            raise type(cause)(f"harvest of run {run_id} failed: {cause}") from None
        raise
    seconds = time.perf_counter() - started
    _finish_manifest(manifest, layout, done, seconds, config.data.mode)
    tokens, n_bytes = done["tokens"], done["bytes"]
    return HarvestResult(
        run_id, layout.root, "complete", len(pending), len(shards), tokens, n_bytes, seconds
    )


# Auto shard size: ~128 MiB of activations per shard. Fewer, larger files make every
# query open fewer Parquet footers (top-k of one neuron over 2M rows: 256 files of 8 MB
# 0.31 s, 16 files of 128 MB 0.06 s; benchmarks/BENCHMARKS.md), while a shard stays
# small enough to hold in an actor's memory and cheap to redo on resume.
SHARD_BYTES = 128 << 20
SHARD_SIZE_RANGE = (16, 4096)
MIN_SHARDS = 4  # a small corpus is still split, so a few actors share it


def shard_size_for(bytes_per_document: int) -> int:
    """Documents per shard for ~SHARD_BYTES of activations, clamped to SHARD_SIZE_RANGE."""
    low, high = SHARD_SIZE_RANGE
    return max(low, min(high, SHARD_BYTES // max(1, bytes_per_document)))


def auto_shard_size(config: PipelineConfig, model, hooks: list[str]) -> int:
    """The default ``shard_size``: ~SHARD_BYTES of activations per shard.

    A document is at most one context of tokens in document mode; in packed mode it is
    estimated from the files' sizes (at least one byte per token, plus BOS and EOS), an
    upper bound. A corpus too small for MIN_SHARDS such shards gets smaller ones. The
    result depends only on the data, the model, the hooks and the context, never on
    how many actors run: a rerun with other resources plans the same shards, keeps the
    same run id and resumes.
    """
    context = config.data.context_length
    shards = plan_shards(config.data.path, SHARD_SIZE_RANGE[1], config.data.max_documents)
    n_docs = sum(s.count for s in shards)
    if config.data.mode == "document":
        tokens_per_doc = context
    else:
        tokens_per_doc = -(-_data_bytes(shards) // max(1, n_docs)) + 2
    per_doc = predict_bytes(model, hooks, tokens_per_doc, context, config.harvest.storage_dtype)
    return max(1, min(shard_size_for(per_doc), -(-n_docs // MIN_SHARDS)))


def _data_bytes(shards) -> int:
    """Bytes of the input files the shards come from: in packed mode a token takes at
    least one byte of text, so this bounds the tokens."""
    return sum(Path(f).stat().st_size for f in {s.file for s in shards})


def predict_bytes(model, hooks: list[str], max_tokens: int, context: int, dtype: str) -> int:
    """Upper bound of the run's size on disk for at most ``max_tokens`` tokens.

    Values are stored uncompressed in effect (activations barely compress), plus the
    key columns of each row (layer 2 B, seq_id 8 B, pos 4 B, head 2 B; patterns: q_pos,
    k_pos 4 B each and a float32 weight).
    """
    value = 2 if dtype == "float16" else 4
    per_token = 40  # tokens table: ids, positions, text
    for hook in hooks:
        kind, width = model.hook_shape(hook)
        if kind == "dense":
            per_token += width * value + 14
        elif kind == "head":
            per_token += model.n_heads_of(hook) * (width * value + 16)
        else:  # a query attends to (context + 1) / 2 keys on average
            per_token += model.n_heads_of(hook) * (context + 1) // 2 * 24
    return max_tokens * per_token


def ensure_ray() -> None:
    """Connect to Ray: ``RAY_ADDRESS`` if set, else start a local cluster."""
    import ray

    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ:
        from ray.data import DataContext

        # Ray Data's bars in a terminal; in logs and CI our own per-shard lines suffice
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False
        )


def stage_ranges(config: PipelineConfig, n_layers: int) -> list[tuple[int, int]]:
    """The pipeline stages' block ranges: [(0, n_layers)] unless the model is sharded."""
    from arrakis_ray.models.stage import even_ranges

    where = f"{config.source}: harvest"
    if config.harvest.layer_ranges:
        ranges = [tuple(r) for r in config.harvest.layer_ranges]
        expected_start = 0
        for r in ranges:
            if len(r) != 2 or r[0] != expected_start or r[1] <= r[0]:
                raise ConfigError(
                    f"{where}.layer_ranges: {[list(x) for x in ranges]} must be contiguous "
                    f"[start, stop) pairs from 0 to n_layers = {n_layers}"
                )
            expected_start = r[1]
        if expected_start != n_layers:
            raise ConfigError(
                f"{where}.layer_ranges: the ranges end at {expected_start}, but the model has "
                f"{n_layers} layers"
            )
        return ranges
    if config.harvest.model_shards > n_layers:
        raise ConfigError(
            f"{where}.model_shards: {config.harvest.model_shards} stages for {n_layers} layers"
        )
    return even_ranges(n_layers, config.harvest.model_shards)


def _run_shards(config, layout, hooks, stages, pending, total) -> dict:
    import ray.data

    ensure_ray()
    items = [s.to_dict() for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # one tokenize task at a time: it is milliseconds per shard, and every extra task is
    # a worker process importing transformers (benchmarks/BENCHMARKS.md: 3x the wall time)
    ds = ds.map_batches(
        _tokenize,
        fn_kwargs={"config": config},
        batch_size=1,
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    for stage in range(len(stages)):  # one actor pool per pipeline stage
        ds = ds.map_batches(
            HarvestStage,
            fn_constructor_kwargs={
                "config": config,
                "run_id": layout.run_id,
                "store_root": layout.store_root,  # a path object: it carries its fs options
                "hooks": hooks,
                "stages": stages,
                "stage": stage,
            },
            batch_size=1,
            # two calls at once per actor: one shard's files are written while the next
            # shard runs through the model (HarvestStage holds a lock around the model)
            compute=ray.data.ActorPoolStrategy(
                size=config.harvest.actors,
                max_concurrent_calls_per_actor=CONCURRENT_SHARDS,
                enable_true_multi_threading=True,
            ),
            num_cpus=config.harvest.num_cpus_per_actor,
            num_gpus=config.harvest.num_gpus_per_actor,
        )
    done = {"tokens": 0, "bytes": 0, "sequences": 0, "shards": 0}
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        done["shards"] += 1
        done["tokens"] += int(row["tokens"])
        done["bytes"] += int(row["bytes"])
        done["sequences"] += int(row["sequences"])
        elapsed = time.perf_counter() - t0
        rate = done["tokens"] / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done["shards"] * (len(pending) - done["shards"])
        log.info(
            "shard %d done (%d/%d this call, %d in the run): %d tokens, %.0f tokens/s, "
            "%.1f MB written, ETA %.0f s",
            row["shard"],
            done["shards"],
            len(pending),
            total,
            done["tokens"],
            rate,
            done["bytes"] / 1e6,
            eta,
        )
    return done


_REMOTE_ERROR = re.compile(r"arrakis_ray\.errors\.(\w+): (.+)")


def _user_error(exc: BaseException) -> ArrakisError | None:
    """The ArrakisError behind a failure in a Ray task or actor, if there is one.

    Ray Data wraps a step's exception (RayTaskError, UserCodeException) and keeps the
    original only as text in the remote traceback; the last arrakis error named there
    is the outermost one, which names the shard.
    """
    from arrakis_ray import errors

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ArrakisError):
            return exc
        found = _REMOTE_ERROR.findall(str(exc))
        if found:
            name, message = found[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, ArrakisError):
                return cls(message.strip())
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _tokenize(batch, config):
    return TokenizeShard(config)(batch)


def _new_manifest(config, run_id, model, hooks, shards, stages, identity, predicted) -> dict:
    from arrakis_ray import __version__

    return {
        "run_id": run_id,
        "name": config.name,
        "status": "running",
        "created_at": _now(),
        "config": to_dict(config),
        "hooks": hooks,
        "model": {
            "source": _model_source(config),
            "arch": model.arch,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "n_heads": model.n_heads,
            "d_head": model.d_head,
            "d_mlp": model.d_mlp,
            "vocab_size": model.vocab_size,
            "fingerprint": identity["model"],
        },
        "data": {
            "path": config.data.path,
            "fingerprint": identity["data"],
            "n_documents": sum(s.count for s in shards),
            "n_sequences": sum(s.count for s in shards),  # one sequence per document
            "n_shards": len(shards),
        },
        "shard_plan": [s.to_dict() for s in shards],
        "stages": stages,
        "schemas": {n: schemas.load_schema(n).version for n in schemas.known_schemas()},
        "harvest": {"resumed": False, "calls": [], "predicted_max_bytes": predicted},
        "results": {},
        "versions": _package_versions(__version__),
    }


def _finish_manifest(manifest, layout, done: dict, seconds: float, mode: str) -> None:
    calls = manifest["harvest"].setdefault("calls", [])
    calls.append({"finished_at": _now(), **done, "seconds": round(seconds, 3)})
    total_tokens = sum(c["tokens"] for c in calls)
    total_seconds = sum(c["seconds"] for c in calls)
    manifest["harvest"].update(
        {
            "n_tokens": total_tokens,
            "bytes": sum(c["bytes"] for c in calls),
            "seconds": round(total_seconds, 3),
            "tokens_per_s": round(total_tokens / total_seconds, 1) if total_seconds else None,
        }
    )
    if mode == "packed":  # known only once tokenized
        manifest["data"]["n_sequences"] = sum(c.get("sequences", 0) for c in calls)
    manifest["status"] = "complete"
    manifest.pop("error", None)
    manifest["updated_at"] = _now()
    store_manifest.write_manifest(layout, manifest)


def _write_vocab(layout, tokenizer, vocab_size: int) -> None:
    import pyarrow as pa

    texts = vocab_texts(tokenizer, vocab_size)
    table = pa.Table.from_arrays(
        [pa.array(range(vocab_size), pa.int32()), pa.array(texts, pa.string())],
        schema=schemas.vocab_schema(),
    )
    parquet.write_table(
        table,
        layout.vocab_path,
        schema_name="vocab",
        schema_version=schemas.load_schema("vocab").version,
        expected=schemas.vocab_schema(),
    )


def _model_source(config: PipelineConfig) -> str:
    m = config.model
    return f"zoo:{m.zoo}" if m.zoo else (m.path if m.path else f"random:{m.arch}")


def _package_versions(own: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"arrakis-ray": own}
    for pkg in ("ray", "torch", "transformers", "pyarrow", "duckdb", "polars", "altair"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
