"""The harvest driver: plan, then stream shards through Ray Data actors.

``plan_run`` (harvest/plan.py) checks everything that can be wrong with the inputs
(config, hooks, data, model path, size budget) before the store is touched and names
the run by a content hash of what determines its output, so an identical rerun finds
its own run and only finishes the shards that lack a completion marker.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from arrakis_ray.config import PipelineConfig
from arrakis_ray.errors import StoreError
from arrakis_ray.harvest.actor import CONCURRENT_SHARDS, HarvestStage
from arrakis_ray.harvest.checks import check_cluster_fits
from arrakis_ray.harvest.model_source import load_tokenizer, vocab_texts
from arrakis_ray.harvest.placement import (
    StoreProbe,
    check_probe,
    check_spread_fits,
    check_store_reachable,
    stage_placement,
    store_probe,
)
from arrakis_ray.harvest.plan import plan_run
from arrakis_ray.harvest.tokenize import TokenizeShard
from arrakis_ray.ray_session import ensure_ray, one_line_error, ray_errors
from arrakis_ray.store import compact, schemas
from arrakis_ray.store.history import harvest_calls
from arrakis_ray.store.inventory import (
    PartsInventory,
    read_parts_inventory,
    read_shard_inventories,
    read_vocab_inventory,
    write_parts_inventory,
)
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.lease import harvest_lease
from arrakis_ray.store.manifest import RunManifest, read_manifest
from arrakis_ray.store.plan import RunPlan
from arrakis_ray.store.verify import damage_hint, remove_orphans, run_damage
from arrakis_ray.store.writer import RunWriter

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


ShardRunner = Callable[..., dict]
"""Runs a run's pending shards: (plan, layout, pending shards, call, probe=...) -> this
call's totals (shards, tokens, bytes, sequences); ``probe`` (a ``StoreProbe`` or None)
goes to every ``HarvestStage``, which checks it before writing. The default streams them
through Ray Data actor pools made for this call; a sweep passes its warm actors'
(``sweeps/warm.py``)."""


def harvest(
    config: PipelineConfig, store: str | Path, run_shards: ShardRunner | None = None
) -> HarvestResult:
    """Harvest ``config`` into ``store`` (created if needed); resumes a partial run.

    One harvest at a time per run: a second call while one runs says so and stops
    (``store/lease.py``) rather than computing every shard twice. ``run_shards``: what
    runs the shards (``ShardRunner``); the manifest, resume, compaction and history are
    this function's whichever it is.
    """
    started = time.perf_counter()
    plan = plan_run(config)  # every input error is raised here, before the store is touched
    tokenizer = load_tokenizer(plan.config.model)
    log.info(
        "run %s: %d documents in %d shards, at most %.1f MB on disk",
        plan.run_id,
        plan.n_documents,
        len(plan.shards),
        plan.predicted_bytes / 1e6,
    )
    writer = RunWriter(store, plan.run_id)
    with harvest_lease(writer.layout):
        return _harvest(plan, tokenizer, writer, started, run_shards or _run_shards)


def _harvest(
    plan: RunPlan, tokenizer, writer: RunWriter, started: float, run_shards: ShardRunner
) -> HarvestResult:
    layout = writer.layout
    call = _now(precise=True)  # names this call in each shard's inventory
    exists = layout.manifest_path.exists()
    remove_orphans(layout)  # temp files of a killed call (the lease says none is live)
    done = layout.completed_shards() if exists else set()
    manifest = read_manifest(layout) if exists else plan.new_manifest(_now(), _versions())
    pending = [s for s in plan.shards if s.shard not in done]
    if not pending:
        if exists and read_vocab_inventory(layout) is None:  # removed by a repair
            writer.write_vocab(_vocab_table(tokenizer, plan.shape.d_vocab))
        damage = run_damage(layout, manifest, check_checksums=False)
        if damage:  # files missing or changed under a finished run: never "complete"
            raise StoreError(damage_hint(layout, damage))
        log.info("run %s is already complete: nothing to do", plan.run_id)
        with ray_errors(f"compaction of run {plan.run_id}"):  # an interrupted one
            manifest = _compact(writer, manifest, len(plan.shards), plan.config.harvest.compact)
        if manifest.status != "complete":
            writer.write_manifest(manifest.with_changes(status="complete", error=None))
        return HarvestResult(
            plan.run_id, layout.root, "already complete", 0, len(plan.shards), 0, 0, 0.0
        )
    if done:
        log.info("resuming run %s: %d of %d shards done", plan.run_id, len(done), len(plan.shards))
        # the done shards' files must still be there (a compacted run under repair is
        # rebuilding its parts: they are checked once written)
        redo = {s.shard for s in pending}
        damage = [
            d
            for d in run_damage(layout, manifest, check_checksums=False)
            if not redo.intersection(d.shards)
        ]
        if damage and manifest.shards_per_part is None:
            raise StoreError(damage_hint(layout, damage))
    ensure_ray()  # a cluster that cannot be reached fails here, before the run is touched
    _check_cluster(plan)
    # kept for the whole call: a node that joins later (an autoscaler's) checks it too
    with store_probe(layout.store_root) as probe:
        check_store_reachable(layout.store_root, probe)  # every node writes into one store
        return _harvest_pending(plan, tokenizer, writer, manifest, started, call, pending,
                                bool(done), run_shards, probe)  # fmt: skip


def _harvest_pending(
    plan: RunPlan,
    tokenizer,
    writer: RunWriter,
    manifest: RunManifest,
    started: float,
    call: str,
    pending: list,
    resuming: bool,
    run_shards: ShardRunner,
    probe: StoreProbe | None,
) -> HarvestResult:
    """Harvest the pending shards, compact, and record the call in the manifest."""
    layout = writer.layout
    resumed = manifest.harvest.resumed or resuming
    manifest = manifest.with_changes(
        status="running", updated_at=_now(), harvest=replace(manifest.harvest, resumed=resumed)
    )
    writer.write_manifest(manifest)
    if read_vocab_inventory(layout) is None:
        writer.write_vocab(_vocab_table(tokenizer, plan.shape.d_vocab))

    try:
        totals = run_shards(plan, layout, pending, call, probe=probe)
        manifest = _compact(writer, manifest, len(plan.shards), plan.config.harvest.compact, probe)
    except Exception as exc:
        # completed shards keep their markers and stay usable; the run says it failed
        error = one_line_error(exc, f"harvest of run {plan.run_id}")  # None: not from Ray
        message = (str(error or exc) or type(exc).__name__)[:2000]  # never empty
        try:
            history = _history(layout, manifest, call, started)
        except StoreError:  # a damaged inventory must not hide the harvest's own error
            history = manifest.harvest
        writer.write_manifest(
            manifest.with_changes(
                status="failed", error=message, updated_at=_now(), harvest=history
            )
        )
        if error is not None:
            raise error from None
        raise
    history = _history(layout, manifest, call, started, finished=True)
    data = manifest.data
    if plan.config.data.mode == "packed":  # known only once tokenized
        data = replace(data, n_sequences=sum(c.sequences for c in history.calls))
    writer.write_manifest(
        manifest.with_changes(
            status="complete", error=None, updated_at=_now(), data=data, harvest=history
        )
    )
    return HarvestResult(
        plan.run_id, layout.root, "complete", len(pending), len(plan.shards),
        totals["tokens"], totals["bytes"], time.perf_counter() - started,
    )  # fmt: skip


def _check_cluster(plan: RunPlan) -> None:
    """Refuse actors the cluster can never place (Ray would wait for them forever)."""
    import ray

    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in (node.get("Resources") or {}).items():
                largest[name] = max(largest.get(name, 0.0), float(amount))
    check_cluster_fits(
        plan.config.harvest, ray.cluster_resources(), plan.config.source, largest or None
    )
    check_spread_fits(plan.config.harvest, len(plan.stages), plan.config.source)


def _history(layout, manifest: RunManifest, call: str, started: float, finished: bool = False):
    """The manifest's harvest record with its calls rebuilt from the shard inventories:
    a call killed before it could record itself still counts its shards."""
    seconds = {call: round(time.perf_counter() - started, 3)} if finished else {}
    calls = harvest_calls(read_shard_inventories(layout), manifest.harvest.calls, seconds)
    return replace(manifest.harvest, calls=calls)


def _run_shards(
    plan: RunPlan, layout: RunLayout, pending: list, call: str, probe: StoreProbe | None = None
) -> dict:
    """Stream the pending shards through the tokenize step and the stages' actor pools;
    returns this call's totals (shards, tokens, bytes, sequences)."""
    import ray.data

    config = plan.config
    ensure_ray()
    items = [s.to_dict() for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # one tokenize task at a time: it is milliseconds per shard, and every extra task is
    # a worker process importing transformers (benchmarks/BENCHMARKS.md: 3x the wall time)
    ds = ds.map_batches(
        _tokenize,
        fn_kwargs={"config": config, "vocab_size": plan.shape.d_vocab},
        batch_size=1,
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    with stage_placement(config.harvest, len(plan.stages), config.source) as placement:
        return _stream(ds, plan, layout, pending, call, placement, probe)


def _stream(ds, plan: RunPlan, layout: RunLayout, pending: list, call: str, placement: dict,
            probe: StoreProbe | None = None):  # fmt: skip
    """Chain the stages' actor pools after the tokenize step and run the dataset;
    ``placement``: Ray remote args that place the stage actors (``stage_placement``);
    ``probe``: the driver's store probe, checked by every stage actor."""
    total = len(plan.shards)
    for stage in range(len(plan.stages)):  # one actor pool per pipeline stage
        with warnings.catch_warnings():
            # Ray 2.60 takes a scheduling strategy only through **ray_remote_args, which
            # it deprecates for 2.64 before its named placement parameters exist
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            ds = _stage_pool(ds, plan, layout, call, stage, placement, probe)
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


def _stage_pool(ds, plan: RunPlan, layout: RunLayout, call: str, stage: int, placement: dict,
                probe: StoreProbe | None = None):  # fmt: skip
    """``ds`` followed by stage ``stage``'s actor pool (``HarvestStage``)."""
    import ray.data

    config = plan.config
    return ds.map_batches(
        HarvestStage,
        fn_constructor_kwargs={
            "config": config,
            "run_id": layout.run_id,
            "store_root": layout.store_root,  # a path object: it carries its fs options
            "hooks": list(plan.hooks),
            "stages": [list(s) for s in plan.stages],
            "stage": stage,
            "call": call,
            "probe": probe,
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
        **placement,
    )


def _compact(
    writer: RunWriter,
    manifest: RunManifest,
    n_shards: int,
    enabled: bool,
    probe: StoreProbe | None = None,
) -> RunManifest:
    """Merge the finished run's small shard files into parts, as Ray tasks over groups
    of directories (``store/compact.py``); returns the manifest, updated once they exist.
    A compacted run whose part ``verify --repair`` removed gets that part written again.
    ``probe``: the harvest call's store probe (else one is written for the tasks)."""
    import ray

    layout = writer.layout
    directories = compact.block_directories(layout)
    per_part = manifest.shards_per_part
    listed = read_parts_inventory(layout)
    if per_part is None and listed is not None:  # interrupted between parts and manifest
        per_part = listed.shards_per_part
    if per_part is None:
        if not enabled:
            return manifest
        per_part = compact.plan_parts(layout, n_shards)
        if per_part <= 1:
            return manifest  # the files are large already
    inventoried = {e.path: e for e in listed.files} if listed is not None else {}
    if listed is None or any(not e.location(layout).exists() for e in inventoried.values()):
        started = time.perf_counter()
        ensure_ray()
        with nullcontext(probe) if probe else store_probe(layout.store_root) as probe:
            # a rerun may finish an interrupted one: its nodes were not checked yet
            check_store_reachable(layout.store_root, probe)
            task = ray.remote(_compact_group).options(num_cpus=1)
            groups = _groups(directories)
            pending = [
                task.remote(layout, g, n_shards, per_part, inventoried, probe) for g in groups
            ]
            entries = sorted((e for group in ray.get(pending) for e in group), key=lambda e: e.path)
        write_parts_inventory(layout, PartsInventory(per_part, tuple(entries)))
        log.info(
            "run %s: compacted %d directories, %d shards per part (%.0f MB) in %.1f s",
            layout.run_id, len(directories), per_part, sum(e.bytes for e in entries) / 1e6,
            time.perf_counter() - started,
        )  # fmt: skip
    if manifest.shards_per_part is None:
        manifest = manifest.with_changes(shards_per_part=per_part)
        writer.write_manifest(manifest)  # readers switch to the parts here
    leftovers = [d for d in directories if any(d.glob("shard-*.parquet"))]
    if leftovers:  # after the switch, or from a call interrupted after it
        ensure_ray()
        task = ray.remote(_remove_group).options(num_cpus=0.25)
        ray.get([task.remote(layout, g, n_shards) for g in _groups(leftovers)])
    return manifest


def _groups(directories: list) -> list[list]:
    """The directories dealt into one group per CPU of the cluster: a Ray task per group,
    not per directory (a task per directory spent seconds starting workers for runs of
    a few MB per directory)."""
    import ray

    n = max(1, min(len(directories), int(ray.cluster_resources().get("CPU", 1))))
    return [directories[i::n] for i in range(n)]


def _compact_group(
    layout, directories: list, n_shards: int, per_part: int, inventoried, probe=None
) -> list:
    check_probe(layout.store_root, probe)  # a node that joined since the driver's check
    return [
        entry
        for d in directories
        for entry in compact.compact_directory(layout, d, n_shards, per_part, inventoried)
    ]


def _remove_group(layout, directories: list, n_shards: int) -> int:
    return sum(compact.remove_shard_files(layout, d, n_shards) for d in directories)


def _tokenize(batch, config, vocab_size):
    return TokenizeShard(config, vocab_size=vocab_size)(batch)


def _vocab_table(tokenizer, vocab_size: int):
    import pyarrow as pa

    texts = vocab_texts(tokenizer, vocab_size)
    return pa.Table.from_arrays(
        [pa.array(range(vocab_size), pa.int32()), pa.array(texts, pa.string())],
        schema=schemas.vocab_schema(),
    )


def _versions() -> dict:
    """Versions of the packages that shaped the run's output."""
    from importlib.metadata import PackageNotFoundError, version

    from arrakis_ray import __version__

    out = {"arrakis-ray": __version__}
    for pkg in ("ray", "torch", "transformers", "pyarrow", "duckdb", "polars", "altair"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _now(precise: bool = False) -> str:
    if precise:  # a call's id: two calls never start in the same microsecond
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
