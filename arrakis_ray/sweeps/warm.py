"""Warm harvest actors: a sweep's runs that share a model share the actors holding it.

``arrakis-ray run`` streams a run's shards through Ray Data actor pools made for that
run: each actor is a new process that imports torch and loads the model, seconds that a
sweep of many runs on one model would pay once per run. A sweep instead keeps one pool
of ``WarmHarvester`` actors per model setting (the model config, GPUs and CPUs per actor,
replicas) for the whole sweep. Each actor holds the model once (``ModelHolder.shared``)
and harvests shard after shard of run after run: the tokenize step and ``HarvestStage``,
the same callables as the Ray Data steps, called directly. The harvest driver keeps
everything else (manifest, resume, compaction, history): a pool is only its
``run_shards`` (``harvest.driver.ShardRunner``).

A staged run (``harvest.stages > 1``) hands a residual stream from stage to stage; it
goes through the driver's Ray Data path, whose actor pools chain the stages.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from arrakis_ray.config import PipelineConfig, to_dict
from arrakis_ray.harvest.actor import CONCURRENT_SHARDS
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.plan import RunPlan

log = logging.getLogger(__name__)


class WarmHarvester:
    """A Ray actor harvesting shards of any run of its model, loaded once.

    Runs with ``max_concurrency=CONCURRENT_SHARDS``: like a Ray Data harvest actor, one
    shard's files are written while the next one runs through the model (the holder's
    lock lets one shard at a time use it).
    """

    def __init__(self) -> None:
        self._steps: dict[tuple, tuple] = {}  # (run id, call) -> (tokenize, harvest)
        self._lock = threading.Lock()

    def harvest(
        self, config, run_id, store_root, hooks, stage, vocab_size, shard, call, probe=None
    ) -> dict:
        """Tokenize and harvest one shard of run ``run_id``; its statistics row."""
        import numpy as np

        from arrakis_ray.harvest.batch import batch_column, batch_rows

        tokenize, step = self._steps_for(
            config, run_id, store_root, hooks, stage, vocab_size, call, probe
        )
        batch = {key: batch_column([value]) for key, value in shard.items()}
        out = step(tokenize(batch))
        (row,) = batch_rows(out)
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}

    def _steps_for(
        self, config, run_id, store_root, hooks, stage, vocab_size, call, probe=None
    ) -> tuple:
        from arrakis_ray.harvest.actor import HarvestStage
        from arrakis_ray.harvest.tokenize import TokenizeShard

        key = (run_id, call)
        with self._lock:  # two concurrent shards of a new run build its steps once
            if key not in self._steps:  # kept until the run's call is done (``forget``)
                tokenize = TokenizeShard(config, vocab_size=vocab_size)
                step = HarvestStage(
                    config, run_id, store_root, list(hooks), [stage], 0, call, probe=probe
                )
                self._steps[key] = (tokenize, step)
            return self._steps[key]

    def forget(self, run_id: str, call: str) -> None:
        """Drop a finished harvest call's steps (its writer and threads)."""
        with self._lock:
            self._steps.pop((run_id, call), None)

    def loads(self) -> int:
        """Models this actor's process has loaded (1 for a warm actor, whatever the runs)."""
        from arrakis_ray.live.holder import ModelHolder

        return ModelHolder.loads


class WarmPool:
    """The sweep's warm actors, one pool per model setting; a ``ShardRunner``.

    ``pool.run_shards`` is passed to ``harvest(config, store, run_shards=...)``. Close it
    (or use it as a context manager) to end the actors.
    """

    def __init__(self) -> None:
        self._pools: dict[str, list] = {}
        self._lock = threading.Lock()  # sweeps harvest several runs at once
        self._released_loads = 0  # models loaded by pools already released

    @staticmethod
    def key(config: PipelineConfig, model_fingerprint: str) -> str:
        """The pool a run's harvest uses: its model (config and weights' fingerprint, so a
        checkpoint rewritten in place gets new actors) and its actors' resources."""
        h = config.harvest
        return json.dumps(
            [to_dict(config.model), model_fingerprint, h.actors, h.num_gpus_per_actor,
             h.num_cpus_per_actor],
            sort_keys=True,
        )  # fmt: skip

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_shards(
        self, plan: RunPlan, layout: RunLayout, pending: list, call: str, probe=None
    ) -> dict:
        """Harvest ``pending`` shards of ``plan``'s run on the warm actors of its model."""
        import ray
        from ray.exceptions import RayActorError

        if len(plan.stages) != 1:  # the stages' residual hand-over is Ray Data's (above)
            raise ValueError(f"run {plan.run_id} is staged: harvest it without a warm pool")
        config = plan.config
        key = self.key(config, plan.identity["model"])
        actors = self._actors(key, config)
        stage = list(plan.stages[0])
        args = (
            config,
            layout.run_id,
            layout.store_root,
            list(plan.hooks),
            stage,
            plan.shape.d_vocab,
        )
        queue = [s.to_dict() for s in pending]
        in_flight: dict = {}  # object ref -> actor
        load = {i: 0 for i in range(len(actors))}
        done = {"tokens": 0, "bytes": 0, "sequences": 0, "shards": 0}
        t0 = time.perf_counter()
        try:
            while queue or in_flight:
                while queue and min(load.values()) < CONCURRENT_SHARDS:
                    i = min(load, key=load.get)  # the least busy actor
                    ref = actors[i].harvest.remote(*args, queue.pop(0), call, probe=probe)
                    in_flight[ref] = i
                    load[i] += 1
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                load[in_flight.pop(ready)] -= 1
                row = ray.get(ready)
                for total in ("tokens", "bytes", "sequences"):
                    done[total] += int(row[total])
                done["shards"] += 1
                elapsed = time.perf_counter() - t0
                log.info(
                    "run %s: shard %d done (%d/%d this call) on a warm actor, %.0f tokens/s",
                    layout.run_id,
                    row["shard"],
                    done["shards"],
                    len(pending),
                    done["tokens"] / elapsed if elapsed > 0 else 0.0,
                )
        except BaseException as exc:
            for ref in in_flight:  # the driver records the failure; stop the rest
                ray.cancel(ref)
            if isinstance(exc, RayActorError):  # out of restarts: a retry gets new actors
                self.release(key)
            raise
        finally:
            try:  # never hides the shard's own error
                ray.get([a.forget.remote(layout.run_id, call) for a in actors], timeout=60)
            except Exception as exc:
                log.warning("run %s: warm actors could not drop its steps: %s", plan.run_id, exc)
        return done

    def loads(self) -> int:
        """Models loaded by every warm actor so far (one per actor if all went well)."""
        import ray

        actors = [a for pool in self._pools.values() for a in pool]
        live = sum(ray.get([a.loads.remote() for a in actors])) if actors else 0
        return self._released_loads + live

    def release(self, key: str) -> None:
        """End one pool's actors (its model's last harvest is done): their GPUs go to
        the next pool or to the live tools' actors."""
        import ray

        with self._lock:
            pool = self._pools.pop(key, [])
        if not pool:
            return
        try:  # a dead or unplaceable actor must not stop the release
            n = sum(ray.get([a.loads.remote() for a in pool], timeout=10))
        except Exception as exc:
            n = 0
            log.warning("warm pool: model loads not counted (%s)", exc)
        for actor in pool:
            ray.kill(actor)
        with self._lock:
            self._released_loads += n

    def close(self) -> None:
        """End every warm actor (their models go with them)."""
        for key in list(self._pools):
            self.release(key)

    def _actors(self, key: str, config: PipelineConfig) -> list:
        import ray

        h = config.harvest
        with self._lock:
            if key not in self._pools:
                remote = ray.remote(WarmHarvester).options(
                    num_cpus=h.num_cpus_per_actor,
                    num_gpus=h.num_gpus_per_actor,
                    max_concurrency=CONCURRENT_SHARDS,
                    # a killed actor is started again and its shard retried: it costs a
                    # retry, not the run (as in a Ray Data pool)
                    max_restarts=2,
                    max_task_retries=2,
                )
                self._pools[key] = [remote.remote() for _ in range(h.actors)]
                log.info("warm pool: %d actors for model %s", h.actors, config.model)
            actors = self._pools[key]
        _wait_started(actors, config)
        return actors


def _wait_started(actors: list, config: PipelineConfig) -> None:
    """Wait for the actors to be placed, saying every minute what they wait for (an
    autoscaler may be starting nodes; another pool or live tool may hold the GPUs)."""
    import ray

    pending = [a.loads.remote() for a in actors]
    waited = 0
    while pending:
        _ready, pending = ray.wait(pending, num_returns=len(pending), timeout=60)
        if pending:
            waited += 60
            h = config.harvest
            log.warning(
                "%d warm actors of model %s still wait to start after %d s: each needs "
                "%s CPU and %s GPU (cluster free: %s)",
                len(pending), config.model, waited, h.num_cpus_per_actor,
                h.num_gpus_per_actor, ray.available_resources(),
            )  # fmt: skip
