"""Plan a sweep without Ray: every point's run id and tool variants, and what is done.

Each point's config goes through ``plan_run`` (its harvest's run id, size and checks)
and each analyze step becomes one variant of its tool (``tool_variant``: a hash of the
tool's validated parameters). A point is the pair (run id, tool variants): two points
with the same pair are one point, the later a duplicate; a point whose run is harvested
and whose every variant is recorded on it (``stored_record``) is complete. A sweep over
tool parameters alone plans one harvest, shared by every point. Nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from arrakis_ray.config import PipelineConfig, to_dict
from arrakis_ray.errors import ArrakisError, ConfigError, StoreError, ToolError
from arrakis_ray.store.plan import RunPlan
from arrakis_ray.sweeps.spec import Sweep, SweepPoint, expand

log = logging.getLogger(__name__)

Status = Literal["complete", "pending", "duplicate"]
MAX_LISTED = 3  # points whose planning failed, shown in the one error
CELL = 40  # characters of a parameter value shown in a column of ``describe``


@dataclass(frozen=True)
class PlannedPoint:
    """One point of a sweep, planned: what it harvests and analyses, and its status."""

    index: int
    params: dict[str, Any]
    """Dotted path -> value, in spec order."""
    config: PipelineConfig
    run_id: str
    """The harvest's run id (``plan_run``): points that differ only in tools share it."""
    tools: tuple[tuple[str, str, dict[str, Any]], ...]
    """(tool name, variant, validated parameters) of each analyze step."""
    point_key: str
    """16 hex of (run id, tool variants): equal keys are the same work."""
    status: Status
    duplicate_of: int | None
    """The index of the first point with this key (status "duplicate")."""
    predicted_bytes: int
    """Upper bound of the run's size on disk (``RunPlan.predicted_bytes``)."""
    harvested: bool
    """The store holds this run's complete harvest."""
    run_plan: RunPlan = field(repr=False, compare=False)


@dataclass(frozen=True)
class SweepPlan:
    """Every point of a sweep, planned against a store (``plan_sweep``)."""

    sweep: Sweep
    store: str
    points: list[PlannedPoint]

    def with_status(self, status: Status) -> list[PlannedPoint]:
        """The points of one status, in order."""
        return [p for p in self.points if p.status == status]

    @property
    def pending(self) -> list[PlannedPoint]:
        """The points left to do (neither complete nor duplicates)."""
        return self.with_status("pending")

    @cached_property
    def harvests_to_run(self) -> list[str]:
        """Run ids of the harvests the pending points need, each once, in order."""
        return list(dict.fromkeys(p.run_id for p in self.pending if not p.harvested))

    @property
    def predicted_bytes(self) -> int:
        """Upper bound of what the harvests to run write (each distinct run once)."""
        sizes = {p.run_id: p.predicted_bytes for p in self.pending if not p.harvested}
        return sum(sizes.values())

    def describe(self) -> str:
        """The plan as a table and a line of totals (what ``sweep --dry-run`` prints).

        A parameter whose values are too long for a column (a list of hooks) shows each
        value's number, and the numbers are listed below the table.
        """
        s = self.sweep
        titles, param_cells, legend = _param_columns(s.parameters, [p.params for p in self.points])
        head = ["index", "key", "run id", "status", "harvest", *titles]
        rows = [head]
        for p, cells in zip(self.points, param_cells, strict=True):
            status = p.status if p.duplicate_of is None else f"duplicate of {p.duplicate_of}"
            harvest = "" if p.status == "duplicate" else ("stored" if p.harvested else "to run")
            rows.append([str(p.index), p.point_key, p.run_id, status, harvest, *cells])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        table = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        n, dup = len(self.points), len(self.with_status("duplicate"))
        done, runs, size = (
            len(self.with_status("complete")),
            len(self.harvests_to_run),
            self.predicted_bytes,
        )
        return "\n".join(
            [
                f"sweep {s.name} ({s.sweep_id}): {s.source}, {s.method}, base {s.base}; "
                f"store {self.store}",
                *table,
                *(
                    f"{column} #{i}: {value}"
                    for column, values in legend.items()
                    for i, value in enumerate(values)
                ),
                f"{n} points: {n - dup} distinct, {dup} duplicates, {done} complete, "
                f"{len(self.pending)} to run; {runs} distinct harvest{'s' * (runs != 1)} to "
                f"run, predicted {size:,} bytes ({_human(size)})",
            ]
        )


def plan_sweep(sweep: Sweep, store: str | Path) -> SweepPlan:
    """Expand ``sweep`` and plan every point against ``store`` (which may not exist yet:
    then nothing is complete). Raises, before anything runs, the errors of every point
    that cannot be planned (a hook the model lacks, a tool's hook not harvested)."""
    from arrakis_ray.store.layout import RunLayout

    root = _existing_store(store)
    planner = _Planner()
    first: dict[str, int] = {}  # point key -> index of its first point
    harvested: dict[str, bool] = {}  # run id -> complete in the store
    planned, failures = [], {}
    for point in expand(sweep):
        try:
            plan, tools = planner.plan(point)
        except ArrakisError as exc:
            failures.setdefault(_unpointed(str(exc), sweep), []).append(point.index)
            continue
        variants = [[tool.name, variant] for tool, variant in tools]
        text = json.dumps({"run_id": plan.run_id, "tools": variants}, sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        if plan.run_id not in harvested:
            harvested[plan.run_id] = root is not None and _harvested(RunLayout(root, plan.run_id))
        status: Status = "pending"
        if key in first:
            status = "duplicate"
        elif harvested[plan.run_id] and _recorded(RunLayout(root, plan.run_id), tools):
            status = "complete"
        first.setdefault(key, point.index)
        planned.append(
            PlannedPoint(
                index=point.index,
                params=point.params,
                config=point.config,
                run_id=plan.run_id,
                tools=tuple((t.name, v, to_dict(t.params)) for t, v in tools),
                point_key=key,
                status=status,
                duplicate_of=first[key] if status == "duplicate" else None,
                predicted_bytes=plan.predicted_bytes,
                harvested=harvested[plan.run_id],
                run_plan=plan,
            )
        )
    if failures:
        raise ConfigError(_failure_message(sweep, failures))
    log.info("sweep %s: %d points planned", sweep.name, len(planned))
    return SweepPlan(sweep, str(store), planned)


class _Planner:
    """``plan_run`` and the tools' checks, each done once per distinct input."""

    def __init__(self) -> None:
        self.runs: dict[str, RunPlan | ArrakisError] = {}
        self.manifests: dict[str, Any] = {}
        self.checked: set[tuple[str, str]] = set()
        self.tools: dict[str, tuple[Any, str]] = {}  # a step's (tool, params) -> tool, variant

    def plan(self, point: SweepPoint) -> tuple[RunPlan, list]:
        from arrakis_ray.harvest.plan import plan_run
        from arrakis_ray.tools.runner import make_tool, tool_variant

        config = point.config
        # every point is the base with its values set: the values outside analyze make
        # the harvest's part of the config
        harvest_values = [[p, v] for p, v in point.params.items() if p.split(".")[0] != "analyze"]
        key = json.dumps(harvest_values, default=str)
        if key not in self.runs:
            try:
                self.runs[key] = plan_run(config)
            except ArrakisError as exc:
                self.runs[key] = exc
        plan = self.runs[key]
        if isinstance(plan, ArrakisError):
            raise plan
        tools = []
        for i, step in enumerate(config.analyze):
            text = json.dumps([step.tool, step.params], sort_keys=True, default=str)
            if text not in self.tools:
                tool = make_tool(step.tool, step.params, source=config.source)
                self.tools[text] = (tool, tool_variant(tool))
            tool, variant = self.tools[text]
            if (plan.run_id, variant) not in self.checked:
                self._check_tool(plan, tool, i, config.source)
                self.checked.add((plan.run_id, variant))
            tools.append((tool, variant))
        return plan, tools

    def _check_tool(self, plan: RunPlan, tool, step: int, source: str) -> None:
        """What ``analyze`` checks before it starts, on the manifest the run will have."""
        from arrakis_ray.tools.runner import harvest_hint

        if plan.run_id not in self.manifests:
            self.manifests[plan.run_id] = plan.new_manifest(created_at="", versions={})
        manifest = self.manifests[plan.run_id]
        where = f"{source}: analyze.{step}: tool {tool.name}"
        try:
            tool.check(manifest)
            missing = [h for h in tool.required_hooks(manifest) if h not in manifest.hooks]
        except ToolError as exc:
            raise ToolError(f"{where}: {exc}") from None
        if missing:
            raise ToolError(
                f"{where}: needs hooks the harvest does not capture: "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; add "
                f"{', '.join(harvest_hint(missing))} to harvest.hooks"
            )


def _existing_store(store: str | Path):
    """The store's root if it holds anything; None for a store not made yet (a missing
    or empty directory). A directory that is not a store is refused (StoreError)."""
    from arrakis_ray.store.layout import open_store
    from arrakis_ray.store.location import store_path

    path = store_path(store)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    return open_store(store)


def _harvested(layout) -> bool:
    """The run's harvest is complete in the store (an unreadable manifest: it is not)."""
    from arrakis_ray.store.manifest import read_manifest

    if not layout.manifest_path.exists():
        return False
    try:
        return read_manifest(layout).status == "complete"
    except StoreError as exc:
        log.warning("%s (run taken as not harvested)", exc)
        return False


def _recorded(layout, tools: list) -> bool:
    """Every tool variant is recorded on the run with its parameters and schema."""
    from arrakis_ray.store.manifest import record_key
    from arrakis_ray.tools.runner import stored_record

    for tool, variant in tools:
        # most points of a new sweep have no record: skip reading the run's records
        if not layout.tool_record_path(record_key(tool.name, variant)).exists():
            return False
        if stored_record(layout, tool, variant) is None:
            return False
    return True


def _unpointed(text: str, sweep: Sweep) -> str:
    """An error's text with its point's number as a placeholder (points that fail alike
    are listed in one message; a failed plan is reused, naming the first such point)."""
    text, found = re.subn(
        rf"({re.escape(sweep.source)}) \(point \d+\)", r"\1 ({points})", text, count=1
    )
    return text if found else f"{sweep.source} ({{points}}): {text}"  # an error naming no file


def _failure_message(sweep: Sweep, failures: dict[str, list[int]]) -> str:
    """One line: each distinct error once, with the points it hits."""
    several = len(failures) > 1
    texts = []
    for text, indices in failures.items():
        shown = ", ".join(map(str, indices[:MAX_LISTED]))
        more = len(indices) - MAX_LISTED
        label = f"point {shown}" if len(indices) == 1 else f"points {shown}"
        label += f" and {more} more" if more > 0 else ""
        if several:  # the file is named once, in front: "points 0, 1: ..."
            text = text.replace(f"{sweep.source} ({{points}})", "{points}")
        texts.append(text.replace("{points}", label))
    if not several:
        return texts[0]
    n_bad = sum(len(ix) for ix in failures.values())
    more = len(texts) - MAX_LISTED
    return (
        f"{sweep.source}: {n_bad} of {sweep.size} points cannot be planned: "
        f"{'; '.join(texts[:MAX_LISTED])}" + (f"; and {more} more" if more > 0 else "")
    )


def _param_columns(parameters: dict, params: list[dict]) -> tuple[list[str], list, dict]:
    """(column titles: each path's shortest distinct dotted suffix, every row's cells,
    legend): a column with a value longer than CELL shows numbers, which the legend
    lists ({title: [value #0, value #1, ...]})."""
    paths = list(parameters)
    titles = []
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            title = ".".join(parts[-n:])
            if not any(o != path and (o == title or o.endswith("." + title)) for o in paths):
                break
        titles.append(title)
    legend: dict[str, Any] = {}
    columns = []
    for path, title in zip(paths, titles, strict=True):
        texts = [_text(row.get(path)) for row in params]
        if any(len(t) > CELL for t in texts):
            numbers = {t: i for i, t in enumerate(dict.fromkeys(texts))}
            legend[title] = list(numbers)
            texts = [f"#{numbers[t]}" for t in texts]
        columns.append(texts)
    rows = [list(cells) for cells in zip(*columns, strict=True)] if columns else [[]] * len(params)
    return titles, rows, legend


def _text(value: Any) -> str:
    return (
        value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "), default=str)
    )


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""
