"""Run a planned sweep: only what is missing, each harvest once, on warm actors.

``plan_sweep`` (``sweeps/plan.py``) has already said, without Ray, which points are
complete in the store and which repeat an earlier point. What is left is grouped by
harvest: the points of one group differ only in their tools' parameters, so they share
one run. Then two phases, each ``max_concurrent`` wide:

1. every group's harvest (resuming whatever an earlier call left), through one
   ``WarmPool``: runs that share a model share the actors holding it, and a model's
   pool is ended once its last harvest is done, so the next model's actors (or a live
   tool's) get its GPUs;
2. every point's tools, each setting recorded as a variant of its tool on the run
   (``tools/runner.tool_variant``), so the settings live side by side.

A failure is retried up to ``retries`` times, a little later each time (the harvest
resumes from its finished shards; a tool call starts again; bad input is not retried),
then recorded and reported at the end; it never stops the other points. Each point's
state goes to the store as events (``sweeps/records.py``), which the ``sweep_runs`` view
reads: rerunning the sweep finishes only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from arrakis_ray.errors import (
    ArrakisError,
    ConfigError,
    DataError,
    ModelLoadError,
    StoreError,
    UnknownHookError,
)
from arrakis_ray.sweeps.records import utc_now

log = logging.getLogger(__name__)

# bad input fails alike on every try
NOT_RETRIED = (ConfigError, DataError, ModelLoadError, UnknownHookError)
# (a ToolError is retried: a tool's own failure may be a node's, or a flaky input)


@dataclass
class SweepOutcome:
    """What a ``run_sweep`` call did."""

    sweep_id: str
    points: int
    ran: list[int] = field(default_factory=list)  # points completed by this call
    already_complete: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (point, last error)
    harvests: int = 0  # runs harvested (or finished) by this call
    model_loads: int = 0  # models loaded by the warm actors
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"sweep {self.sweep_id}: {self.points} points: {len(self.ran)} run now, "
            f"{len(self.already_complete)} already complete, {len(self.duplicates)} "
            f"duplicates, {len(self.failed)} failed; {self.harvests} harvests, "
            f"{self.model_loads} model loads, {self.seconds:.1f} s"
        ]
        lines += [f"  point {i} failed: {error}" for i, error in self.failed]
        return "\n".join(lines)


def run_sweep(plan, store, echo: Callable[[str], None] = log.info) -> SweepOutcome:
    """Run every point of ``plan`` (a ``SweepPlan``) that is not complete into ``store``.

    Two phases: every missing harvest first, on the warm actors (a pool is ended when
    its model's last harvest is done, so that the next model's pool, or a live tool's
    actors, get its GPUs); then every point's tools. ``echo`` gets one line per step.
    """
    from arrakis_ray.ray_session import ensure_ray
    from arrakis_ray.sweeps.records import SweepRecord, latest_run_events, write_sweep
    from arrakis_ray.sweeps.warm import WarmPool

    started = time.perf_counter()
    sweep = plan.sweep
    outcome = SweepOutcome(sweep.sweep_id, len(plan.points))
    write_sweep(
        store,
        SweepRecord(
            sweep.sweep_id, sweep.name, sweep.source, sweep.method, _spec_json(sweep),
            len(plan.points), utc_now(),
        ),
    )  # fmt: skip
    # a rerun adds no event to a point whose state it does not change
    latest = {i: e.status for i, e in latest_run_events(store, sweep.sweep_id).items()}
    groups: dict[str, list] = {}
    for point in plan.points:
        if point.status == "duplicate":
            outcome.duplicates.append(point.index)
            if latest.get(point.index) != "duplicate":
                _event(store, sweep, point, "duplicate")
            echo(f"point {point.index}: the same run as point {point.duplicate_of}: skipped")
        elif point.status == "complete":
            outcome.already_complete.append(point.index)
            if latest.get(point.index) not in ("complete", "skipped"):
                _event(store, sweep, point, "skipped")  # complete before this sweep ran
            echo(f"point {point.index}: already complete (run {point.run_id}): skipped")
        else:
            groups.setdefault(point.run_id, []).append(point)
    if groups:
        ensure_ray()
        # transformers resolves its names lazily, and not thread-safely: two harvests
        # starting at once failed with "cannot import name 'AutoTokenizer'"
        from transformers import AutoTokenizer  # noqa: F401

        workers = max(1, min(sweep.max_concurrent, len(groups)))
        harvested: list[tuple[list, object]] = []
        with WarmPool() as pool, ThreadPoolExecutor(workers, "arrakis-sweep") as threads:
            # one model's harvests at a time: its pool is ended before the next model's
            # starts (two pools could each hold half the GPUs and wait for the rest), and
            # before the staged runs, whose Ray Data actors need the same GPUs
            for key, model_groups in _by_pool(groups.values()):
                results = list(
                    threads.map(lambda g: _harvest_group(g, store, sweep, pool, echo), model_groups)
                )
                if key is not None:
                    pool.release(key)
                for points, result in zip(model_groups, results, strict=True):
                    if isinstance(result, str):  # the group's error
                        outcome.failed += [(p.index, result) for p in points]
                    else:
                        outcome.harvests += result.status != "already complete"
                        harvested.append((points, result))
            outcome.model_loads = pool.loads()
            ran, failed = _run_tools(harvested, store, sweep, threads, echo)
            outcome.ran += ran
            outcome.failed += failed
    outcome.ran.sort()
    outcome.failed.sort()
    outcome.seconds = time.perf_counter() - started
    return outcome


def _by_pool(groups) -> list[tuple[str | None, list]]:
    """The groups by warm pool, in a stable order; staged runs (no pool: they go through
    Ray Data's stages) last, under None."""
    from arrakis_ray.sweeps.warm import WarmPool

    by_key: dict[str | None, list] = {}
    for points in groups:
        point = points[0]
        h = point.config.harvest
        staged = h.stages > 1 or len(h.layer_ranges) > 1
        key = None if staged else WarmPool.key(point.config, point.run_plan.identity["model"])
        by_key.setdefault(key, []).append(points)
    return sorted(by_key.items(), key=lambda item: (item[0] is None, item[0] or ""))


def _harvest_group(points: list, store, sweep, pool, echo):
    """Harvest the run the group's points share: its HarvestResult, or the error line
    (recorded as each point's failure)."""
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.harvest.plan import plan_run

    first = points[0]
    config = first.config
    staged = config.harvest.stages > 1 or len(config.harvest.layer_ranges) > 1
    runner = None if staged else pool.run_shards  # stages chain through Ray Data
    tries = [0]
    try:
        for point in points:
            _event(store, sweep, point, "running", attempt=1)
        now = plan_run(config).run_id  # cached: the files' stamps, no model built
        if now != first.run_id:  # a data or model file changed since the plan
            raise StoreError(
                f"the inputs of run {first.run_id} changed since the sweep was planned "
                f"(they now make run {now}); run the sweep again"
            )
        result = _retried(
            sweep.retries,
            lambda: harvest(config, store, run_shards=runner),
            f"harvest of run {first.run_id}",
            tries,
        )
    except Exception as exc:
        error = _message(exc)
        for point in points:
            _record_failure(store, sweep, point, error, echo, max(1, tries[0]))
        return error
    echo(
        f"run {result.run_id}: {result.status}"
        + (f", {result.tokens} tokens in {result.seconds:.1f} s" if result.tokens else "")
    )
    return result


def _run_tools(harvested: list, store, sweep, threads, echo) -> tuple[list, list]:
    """Every distinct tool setting of the harvested points once, then each point's
    outcome from its settings': (points complete, [(point, error)])."""
    from arrakis_ray.tools.runner import tool_class

    settings: dict[tuple, tuple] = {}  # (run id, tool, variant) -> _run_setting's arguments
    for points, result in harvested:
        for point in points:
            for name, variant, params in point.tools:
                key = (result.run_id, name, variant)
                settings.setdefault(key, (result.run_dir, name, variant, params))
    # live tools size their actors to the whole cluster: one at a time
    live = [k for k, args in settings.items() if tool_class(args[1]).scope == "live"]
    other = [k for k in settings if k not in live]
    outcomes = threads.map(lambda k: _run_setting(store, sweep, *settings[k]), other)
    done = dict(zip(other, outcomes, strict=True))
    done.update({k: _run_setting(store, sweep, *settings[k]) for k in live})
    ran, failed = [], []
    for points, result in harvested:
        for point in points:
            mine = [done[(result.run_id, name, variant)] for name, variant, _ in point.tools]
            attempts = max((tries for tries, _seconds, _error in mine), default=1)
            seconds = sum(seconds for _tries, seconds, _error in mine)
            error = next((error for _tries, _seconds, error in mine if error), None)
            try:
                if error is not None:
                    _record_failure(store, sweep, point, error, echo, attempts)
                    failed.append((point.index, error))
                    continue
                _event(store, sweep, point, "complete", attempt=attempts, seconds=seconds)
            except Exception as exc:  # the outcome still says so: never lose the summary
                failed.append((point.index, _message(exc)))
                continue
            ran.append(point.index)
            echo(f"point {point.index} complete ({_params_text(point.params)}) in {seconds:.1f} s")
    return ran, failed


def _record_failure(store, sweep, point, error: str, echo, attempt: int) -> None:
    echo(f"point {point.index}: FAILED: {error}")
    try:
        _event(store, sweep, point, "failed", attempt=attempt, error=error)
    except Exception as exc:  # the outcome still says so: never lose the summary
        log.warning("point %d: could not record its failure: %s", point.index, exc)


def _run_setting(store, sweep, run_dir, name: str, variant: str, params: dict) -> tuple:
    """One tool setting on a run, unless the run holds it already: (tries, seconds, error
    line or None)."""
    from arrakis_ray.store.layout import RunLayout, open_store
    from arrakis_ray.tools.runner import analyze, make_tool, stored_record

    started = time.perf_counter()
    tries = [0]
    try:
        layout = RunLayout(open_store(store), run_dir.name)
        if stored_record(layout, make_tool(name, params), variant) is not None:
            return 1, 0.0, None  # an earlier call computed it
        _retried(
            sweep.retries,
            lambda: analyze(run_dir, name, params, variant=variant),
            f"tool {name}",
            tries,
        )
    except Exception as exc:
        return max(1, tries[0]), time.perf_counter() - started, _message(exc)
    return tries[0], time.perf_counter() - started, None


def _retried(retries: int, work: Callable, what: str, tries: list[int]):
    """``work()``, tried up to ``retries`` more times when it raises, waiting 2, 4, 8 ...
    (at most 30) seconds in between: a harvest another process holds (its lease), a
    node lost. Input errors are the same on every try and are not retried. ``tries[0]``
    counts the tries."""
    for attempt in range(retries + 1):
        tries[0] += 1
        try:
            return work()
        except NOT_RETRIED:
            raise
        except Exception as exc:
            if attempt == retries:
                raise
            wait = min(30, 2 ** (attempt + 1))
            log.warning(
                "%s failed (try %d of %d), again in %d s: %s",
                what, attempt + 1, retries + 1, wait, exc,
            )  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


def _event(store, sweep, point, status: str, attempt: int = 0, error=None, seconds=None) -> None:
    from arrakis_ray.sweeps.records import RunEvent, append_run_event

    append_run_event(
        store,
        RunEvent(
            sweep_id=sweep.sweep_id,
            sweep_name=sweep.name,
            point=point.index,
            point_key=point.point_key,
            run_id=point.run_id,
            params=dict(point.params),
            variants={name: variant for name, variant, _params in point.tools},
            status=status,
            attempt=attempt,
            error=error,
            seconds=None if seconds is None else round(seconds, 3),
            at=utc_now(),
            host=socket.gethostname(),
            pid=os.getpid(),
        ),
    )


def _spec_json(sweep) -> str:
    """The parsed spec as JSON: what the ``sweeps`` view shows of it."""
    spec = {
        "base": str(sweep.base),
        "method": sweep.method,
        "parameters": {path: list(values) for path, values in sweep.parameters.items()},
        "count": sweep.count,
        "seed": sweep.seed,
        "max_concurrent": sweep.max_concurrent,
        "retries": sweep.retries,
    }
    return json.dumps(spec, sort_keys=True, default=str)


def _message(exc: BaseException) -> str:
    from arrakis_ray.ray_session import one_line

    text = one_line(str(exc)) or type(exc).__name__
    return text if isinstance(exc, ArrakisError) else f"{type(exc).__name__}: {text}"


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
