"""The ``live`` tool scope: a prompt dataset fanned out over actors holding the model.

Like the harvest, a live tool runs on the run's own actor layout (``harvest.actors``
replicas, ``harvest.stages`` stages, ``num_gpus_per_actor`` each), so 10,000 patching
pairs on 8 GPUs is the same command as 10 pairs on a laptop. Each replica is one
``LiveActor`` holding the first stage and handles to ``StageActor``s holding the others;
the tool's ``compute_live`` runs inside the LiveActor, on a ``LiveModel`` over that
chain. The dataset is cut into slices of ``items_per_task`` rows; each slice is one
actor call that writes its own result files (``results/<output>/shard-NNNNN.parquet``,
NNNNN the slice) and returns their inventory entries to the driver, which records the
call like any tool's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

from arrakis_ray.config import HarvestConfig, build_dataclass

if TYPE_CHECKING:
    import pyarrow as pa

    from arrakis_ray.store.inventory import FileEntry
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.base import Tool

log = logging.getLogger(__name__)


def prompt_items(tool: Tool, reader: RunReader) -> pa.Table:
    """The tool's prompt dataset (checked in the driver), with ``item`` and ``run_id``;
    a tool without prompts gets one row (it runs once)."""
    import pyarrow as pa

    from arrakis_ray.live.prompts import read_prompts

    if not tool.prompt_columns:
        items = pa.table({"item": pa.array([0], pa.int64())})
    else:
        path = tool.prompts_path(reader.manifest)
        if path is None:
            from arrakis_ray.errors import ToolError

            raise ToolError(f"tool {tool.name}: give params.prompts (a .jsonl or .parquet file)")
        items = read_prompts(path, tool.prompt_columns, where=f"tool {tool.name}: prompts")
    return items.append_column("run_id", pa.array([reader.run_id] * items.num_rows, pa.string()))


def slices(items: pa.Table, size: int) -> list[pa.Table]:
    return [items.slice(start, size) for start in range(0, items.num_rows, max(1, size))]


def run_live(
    tool: Tool, reader: RunReader, payload: tuple, probe=None
) -> tuple[list[FileEntry], int]:
    """Run a live tool over its prompts on the run's actor layout; (files, slices).

    ``payload``: (tool class, parameters, store root, run id, call), as the runner
    hands it to every task; ``probe``: the driver's store probe
    (``placement.store_probe``), checked by an actor before it writes a slice."""
    import ray
    from ray.util import ActorPool

    manifest = reader.manifest
    items = prompt_items(tool, reader)
    work = slices(items, tool.items_per_task)
    harvest = build_dataclass(HarvestConfig, manifest.config.get("harvest"), "manifest", "harvest")
    stages = [tuple(s) for s in manifest.stages] or [(0, manifest.shape.n_layers)]
    replicas = min(harvest.actors, len(work), _replicas_that_fit(harvest, len(stages)))
    gpus, cpus = harvest.num_gpus_per_actor, harvest.num_cpus_per_actor
    sharing = replicas * len(stages)
    live_actor = ray.remote(LiveActor).options(num_cpus=cpus, num_gpus=gpus)
    stage_actor = ray.remote(StageActor).options(num_cpus=cpus, num_gpus=gpus)
    model_config = manifest.model_config
    actors: list = []
    helpers: list = []
    try:
        for _ in range(replicas):
            rest = [stage_actor.remote(model_config, s, gpus, sharing) for s in stages[1:]]
            helpers += rest
            actors.append(live_actor.remote(model_config, stages, gpus, sharing, rest))
        prepared = None
        if tool.prepare is not None:
            tool_cls, params = payload[:2]
            prepared = ray.get(actors[0].prepare.remote(tool_cls, params, items))
        prepared_ref = ray.put(prepared)
        pool = ActorPool(actors)
        files: list[FileEntry] = []
        for entries in pool.map_unordered(
            lambda actor, job: actor.compute.remote(
                *payload, job[0], job[1], prepared_ref, probe=probe
            ),
            list(enumerate(work)),
        ):
            files += entries
    finally:  # a failed slice stops the others mid-write: the runner removes the call's files
        for actor in actors + helpers:
            ray.kill(actor)
    return files, len(work)


def _replicas_that_fit(harvest: HarvestConfig, n_stages: int) -> int:
    """How many replicas (chains of ``n_stages`` actors) the cluster holds at once.

    Every chain's actors must live together (a LiveActor waits on its StageActors), so
    replicas beyond what fits would wait forever; one chain must fit, or the call is
    refused as a harvest is (``check_cluster_fits``)."""
    import ray

    from arrakis_ray.harvest.checks import check_cluster_fits

    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in (node.get("Resources") or {}).items():
                largest[name] = max(largest.get(name, 0.0), float(amount))
    total = ray.cluster_resources()
    check_cluster_fits(harvest, total, "the run's harvest config", largest or None)
    fits = harvest.actors
    for per_actor, resource in (
        (harvest.num_cpus_per_actor, "CPU"),
        (harvest.num_gpus_per_actor, "GPU"),
    ):
        if per_actor > 0:
            fits = min(fits, int(float(total.get(resource, 0.0)) // (per_actor * n_stages)))
    return max(1, fits)


class StageActor:
    """A Ray actor holding one later stage of the model (a StageWorker)."""

    def __init__(self, model_config, stage, num_gpus: float, sharing: int):
        from arrakis_ray.live.holder import ModelHolder
        from arrakis_ray.live.stage_worker import StageWorker

        self.worker = StageWorker(ModelHolder(model_config, tuple(stage), num_gpus, sharing))

    def forward(self, *args):
        return _to_cpu(self.worker.forward(*args))

    def backward(self, grad):
        return _to_cpu(self.worker.backward(grad))

    def final_logits(self, resid):
        return self.worker.final_logits(resid).cpu()


class StageRange(NamedTuple):
    start: int
    stop: int


class RemoteStage:
    """A StageActor seen as a StageWorker by LiveModel (each call waits for its result)."""

    def __init__(self, handle, stage: tuple[int, int]):
        self.handle = handle
        self.stage = StageRange(*stage)

    def forward(self, *args):
        import ray

        return ray.get(self.handle.forward.remote(*args))

    def backward(self, grad):
        import ray

        return ray.get(self.handle.backward.remote(grad))

    def final_logits(self, resid):
        import ray

        return ray.get(self.handle.final_logits.remote(resid))


class LiveActor:
    """A Ray actor holding the first stage (or the whole model) and running a live tool.

    ``rest``: handles of the StageActors holding ``stages[1:]``, in order.
    """

    def __init__(self, model_config, stages: list, num_gpus: float, sharing: int, rest: list):
        from arrakis_ray.live.holder import ModelHolder
        from arrakis_ray.live.model import LiveModel
        from arrakis_ray.live.stage_worker import StageWorker

        first = StageWorker(ModelHolder(model_config, tuple(stages[0]), num_gpus, sharing))
        remote = [RemoteStage(h, tuple(s)) for h, s in zip(rest, stages[1:], strict=True)]
        self.model = LiveModel([first, *remote])

    def prepare(self, tool_cls, params: dict, items):
        """The tool's ``prepare`` over every prompt (once, before the slices)."""
        from arrakis_ray.tools.runner import make_tool

        return make_tool(tool_cls, params).prepare(items, self.model)

    def compute(
        self,
        tool_cls,
        params: dict,
        store_root,
        run_id: str,
        call: str,
        index: int,
        items,
        prepared,
        probe=None,
    ):
        """One slice of the prompts: compute its rows, write them; returns the files."""
        from arrakis_ray.harvest.placement import check_probe
        from arrakis_ray.store.layout import RunLayout
        from arrakis_ray.tools.runner import make_tool, write_outputs

        check_probe(store_root, probe)  # a node that joined since the driver's check
        tool = make_tool(tool_cls, params)
        result = tool.compute_live(items, self.model, prepared)
        return write_outputs(tool, RunLayout(store_root, run_id), result, index, call)


def _to_cpu(out):
    """A StageOutput with every tensor on the CPU, to travel through Ray's object store."""
    out.cache = {k: v.cpu() for k, v in out.cache.items()}
    out.grads = {k: v.cpu() for k, v in out.grads.items()}
    out.probed = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in out.probed.items()}
    for name in ("resid", "logits", "values", "grad_resid"):
        value = getattr(out, name)
        if value is not None:
            setattr(out, name, value.cpu())
    return out
