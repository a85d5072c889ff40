"""Run a planned sweep: only what is missing, each harvest once, on warm actors.

``plan_sweep`` (``sweeps/plan.py``) has already said, without Ray, which points are
complete in the store and which repeat an earlier point. What is left is grouped by
harvest: the points of one group differ only in their tools' parameters, so they share
one run; the group harvests it (resuming whatever an earlier call left), then runs each
point's tools, each setting recorded as a variant of its tool on that run
(``tools/runner.tool_variant``), so the settings live side by side. ``max_concurrent``
groups run at once. Every harvest of the sweep goes through one ``WarmPool``: runs that
share a model share the actors holding it.

A failure is retried up to ``retries`` times (the harvest resumes from its finished
shards; a tool call starts again), then recorded and reported at the end; it never stops
the other groups. Each point's state goes to the store as events (``sweeps/records.py``),
which the ``sweep_runs`` view reads: rerunning the sweep finishes only what is missing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime

from arrakis_ray.errors import ArrakisError

log = logging.getLogger(__name__)


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


def run_sweep(plan, store, echo: Callable[[str], None] = print) -> SweepOutcome:
    """Run every point of ``plan`` (a ``SweepPlan``) that is not complete into ``store``."""
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
            len(plan.points), _now(),
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
        with WarmPool() as pool:
            workers = max(1, min(sweep.max_concurrent, len(groups)))
            with ThreadPoolExecutor(workers, thread_name_prefix="arrakis-sweep") as threads:
                futures = [
                    threads.submit(_run_group, group, store, sweep, pool, echo)
                    for group in groups.values()
                ]
                for future in as_completed(futures):
                    ran, failed, harvested = future.result()
                    outcome.ran += ran
                    outcome.failed += failed
                    outcome.harvests += harvested
            outcome.model_loads = pool.loads()
    outcome.ran.sort()
    outcome.failed.sort()
    outcome.seconds = time.perf_counter() - started
    return outcome


def _run_group(points: list, store, sweep, pool, echo) -> tuple[list, list, int]:
    """Harvest the group's run, then each point's tools; (ran, failed, harvests)."""
    from arrakis_ray.harvest.driver import harvest

    first = points[0]
    config = first.config
    staged = config.harvest.stages > 1 or len(config.harvest.layer_ranges) > 1
    runner = None if staged else pool.run_shards  # stages chain through Ray Data
    for point in points:
        _event(store, sweep, point, "running", attempt=1)
    try:
        result = _retried(
            sweep.retries,
            lambda: harvest(config, store, run_shards=runner),
            f"harvest of run {first.run_id}",
        )
    except Exception as exc:
        error = _message(exc)
        for point in points:
            _event(store, sweep, point, "failed", attempt=sweep.retries + 1, error=error)
            echo(f"point {point.index}: FAILED: {error}")
        return [], [(p.index, error) for p in points], 0
    echo(
        f"run {result.run_id}: {result.status}"
        + (f", {result.tokens} tokens in {result.seconds:.1f} s" if result.tokens else "")
    )
    ran, failed = [], []
    for point in points:
        point_started = time.perf_counter()
        try:
            attempts = 1
            for name, variant, params in point.tools:
                attempts = max(
                    attempts, _run_tool(store, sweep, result.run_dir, name, variant, params)
                )
        except Exception as exc:
            error = _message(exc)
            failed.append((point.index, error))
            _event(store, sweep, point, "failed", attempt=sweep.retries + 1, error=error)
            echo(f"point {point.index}: FAILED: {error}")
            continue
        seconds = time.perf_counter() - point_started
        ran.append(point.index)
        _event(store, sweep, point, "complete", attempt=attempts, seconds=seconds)
        echo(f"point {point.index} complete ({_params_text(point.params)}) in {seconds:.1f} s")
    return ran, failed, 1


def _run_tool(store, sweep, run_dir, name: str, variant: str, params: dict) -> int:
    """One tool setting of a point, unless the run holds it already; attempts made."""
    from arrakis_ray.store.layout import RunLayout, open_store
    from arrakis_ray.tools.runner import analyze, make_tool, stored_record

    layout = RunLayout(open_store(store), run_dir.name)
    if stored_record(layout, make_tool(name, params), variant) is not None:
        return 1  # another point of the sweep (or an earlier call) computed it
    attempts = [0]

    def call():
        attempts[0] += 1
        return analyze(run_dir, name, params, variant=variant)

    _retried(sweep.retries, call, f"tool {name}")
    return attempts[0]


def _retried(retries: int, work: Callable, what: str):
    """``work()``, tried up to ``retries`` more times when it raises."""
    for attempt in range(retries + 1):
        try:
            return work()
        except Exception as exc:
            if attempt == retries:
                raise
            log.warning("%s failed (attempt %d of %d): %s", what, attempt + 1, retries + 1, exc)
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
            at=_now(),
            host=socket.gethostname(),
            pid=os.getpid(),
        ),
    )


def _spec_json(sweep) -> str:
    """The parsed spec as JSON: what the ``sweeps`` view shows of it."""
    import json

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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
