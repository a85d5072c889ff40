"""``BaseInterpretabilityBench``: the original Arrakis' experiment bench, on the store.

Each decorator runs the function and records the call in the bench's store
(``bench/calls.py``, ``bench/records.py``), so a later process, ``arrakis-ray sql`` and
the report site all see it:

- ``@exp.log_experiment``: source, arguments, result, printed output, wall time, status
  (and the exception), package versions; the version is a content hash
  (``bench/versions.py``).
- ``@exp.use_tools("write_read", ...)``: passes the bench's tools by keyword
  (``self.tools``: the built-in ones of ``bench/tools.py`` plus any you add).
- ``@exp.profile_model`` or ``exp.profile_model(input_ids=...)``: per-module time and
  memory (``bench/profiling.py``).
- ``@exp.test_hypothesis(alpha=...)``: the function returns two samples; Welch's t, a
  permutation test, a bootstrap interval and Cohen's d are recorded
  (``bench/hypothesis.py``; view ``hypotheses``).
- ``@exp.plot_results(PlotSpec(...), input_ids=...)``: the function receives ``fig``,
  an Altair chart of the model's activations, saved with the version.
- ``exp.map(fn, grid)``: a function over a parameter grid as Ray tasks, each call
  recorded (``bench/fanout.py``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from arrakis_ray.bench import calls, records, versions
from arrakis_ray.errors import DataError, ToolError


class BaseInterpretabilityBench:
    """Experiments on ``model`` (a HookedModel), recorded in the store ``save_dir``
    (a local directory or ``s3://bucket/prefix``; created when missing)."""

    def __init__(self, model, save_dir: str = "experiments"):
        from arrakis_ray.bench.tools import builtin_tools
        from arrakis_ray.store.layout import init_store

        self.model = model
        self.save_dir = save_dir
        self.store = init_store(save_dir)
        self.tools: dict[str, Any] = builtin_tools(model, self.store)
        self.last_profile = None
        """The module table of the last ``@profile_model`` call (a Polars frame)."""

    # -- recording ------------------------------------------------------------------

    def _spec(self, func, name, kind, source, args, kwargs, extra=None, fingerprint=True):
        """The call's identity: source, canonical arguments, model, version.
        ``fingerprint=False``: arguments checked only (``map``, before its tasks)."""
        injected = set(getattr(func, "__bench_injected__", ()))
        tool_ids = {id(t): key for key, t in self.tools.items()}
        supplied = injected | set(extra or ())
        bound = versions.bound_arguments(
            inspect.unwrap(func), args, kwargs, skip=injected, supplied=supplied
        )
        bound = {k: {"tool": tool_ids[id(v)]} if id(v) in tool_ids else v for k, v in bound.items()}
        if extra:
            bound.update(extra)
        arguments = versions.canonical(bound, f"experiment {name}:")
        model_print = arch = None
        if fingerprint and _is_hooked(self.model):
            model_print, arch = versions.fingerprint(self.model), self.model.arch
        version = versions.version_of(name, source[1], arguments, model_print)
        return calls.CallSpec(name, kind, source[0], arguments, version, model_print, arch)

    def _runs_read(self) -> list[str]:
        used = []
        for tool in self.tools.values():
            runs = getattr(tool, "runs_used", None)
            if isinstance(runs, list):
                used.extend(runs)
                runs.clear()
        return used

    def _call(self, func, name, kind, source, args, kwargs, finish=calls.plain_outcome, extra=None):
        spec = self._spec(func, name, kind, source, args, kwargs, extra)
        self._runs_read()  # forget what earlier calls read
        return calls.record_call(
            self.store, spec, lambda: func(*args, **kwargs), finish, self._runs_read
        )

    def _decorate(self, func, kind, finish=calls.plain_outcome, extra=None):
        name = records.check_name(func.__name__)
        # read here, in the process that defined it: a Ray worker of ``map`` may not see
        # the file
        source = getattr(func, "__bench_source__", None) or versions.source_of(func)

        @functools.wraps(func)
        def logged(*args, **kwargs):
            return self._call(func, name, kind, source, args, kwargs, finish, extra)

        logged.__bench_records__ = True  # a use_tools wrapper around it keeps the mark
        logged.__bench_spec__ = functools.partial(
            self._spec, func, name, kind, source, extra=extra, fingerprint=False
        )  # for map: every grid point's arguments checked before any task starts
        return logged

    # -- the original's API ------------------------------------------------------------

    def log_experiment(self, func: Callable) -> Callable:
        """Record every call of ``func`` (see the module docstring)."""
        return self._decorate(func, "experiment")

    def list_versions(self, experiment_name: str) -> list[str]:
        """The versions of an experiment, oldest first (from the store: any process)."""
        found = self._query(
            "SELECT version FROM experiments WHERE name = ? ORDER BY first_call, version",
            [experiment_name],
        )
        return [row["version"] for row in found]

    def get_version(self, experiment_name: str, version_hash: str) -> dict | None:
        """One version: ``source``, ``arguments``, ``model_fingerprint``, its ``calls``
        (oldest first), the last successful call's ``result`` (JSON values as Python
        values, a table as a Polars frame, an array as numpy, a chart as its Vega-Lite
        dict) and ``profile`` (``@profile_model``'s module table). A unique prefix of
        the version is enough; None if there is no such one."""
        found = self._query(
            "SELECT * FROM experiments WHERE name = ? AND starts_with(version, ?)",
            [experiment_name, version_hash],
        )
        if not found:
            return None
        if len(found) > 1:
            matches = ", ".join(sorted(r["version"] for r in found))
            raise DataError(f"version prefix {version_hash!r} matches several: {matches}")
        version = found[0]
        call_rows = self._query(
            "SELECT * EXCLUDE (source, arguments) FROM experiment_calls "
            "WHERE name = ? AND version = ? ORDER BY started_at",
            [experiment_name, version["version"]],
        )
        ok = [c for c in call_rows if c["status"] == "ok"]
        return {
            "name": experiment_name,
            "version": version["version"],
            "kind": version["kind"],
            "source": version["source"],
            "arguments": records.loads(version["arguments"]),
            "model_fingerprint": version["model_fingerprint"],
            "model_arch": version["model_arch"],
            "calls": call_rows,
            "result": self._result(ok[-1]) if ok else None,
            "profile": self._profile(ok[-1]) if ok else None,
        }

    def _profile(self, call: Mapping[str, Any]):
        import polars as pl

        if not call.get("profile_file"):
            return None
        return pl.from_arrow(records.read_table(self.store, call["profile_file"]))

    def _result(self, call: Mapping[str, Any]) -> Any:
        import json

        import polars as pl

        kind = call["result_kind"]
        if kind in ("json", "repr"):
            return records.loads(call["result_json"])
        if kind in ("table", "array"):
            table = records.read_table(self.store, call["result_file"])
            return pl.from_arrow(table) if kind == "table" else versions.array_from(table)
        if kind == "chart":
            with (self.store / call["chart_file"]).open("rb") as f:
                return json.loads(f.read())
        return None

    def _query(self, sql: str, params: list) -> list[dict[str, Any]]:
        """Rows of a query over this store's experiment views (a small DuckDB of its own:
        opening the whole catalog would read every run's manifest)."""
        import duckdb

        from arrakis_ray.store.remote_views import arrow_dataset

        con = duckdb.connect(":memory:")
        try:

            def register(name, files, schema):
                con.register(f"_arrow_{name}", arrow_dataset(files, schema))
                return f'"_arrow_{name}"'

            records.create_views(con, self.store, register)
            return records.rows(con, sql, params)
        finally:
            con.close()

    def use_tools(self, *names: str) -> Callable:
        """Pass the bench's tools ``names`` to the function, each as a keyword argument
        of the same name (``write_read=``)."""
        for name in names:
            if name not in self.tools:
                close = difflib.get_close_matches(name, list(self.tools), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ToolError(
                    f"use_tools: no tool {name!r}{hint} (this bench has: {', '.join(self.tools)})"
                )

        def decorator(func):
            @functools.wraps(func)
            def with_tools(*args, **kwargs):
                return func(*args, **kwargs, **{name: self.tools[name] for name in names})

            with_tools.__bench_injected__ = names
            return with_tools

        return decorator

    def profile_model(
        self, func: Callable | None = None, /, *, granularity: str | None = None, **options
    ):
        """Per-module time and memory, as a decorator or a method.

        - ``@exp.profile_model`` (or ``@exp.profile_model(granularity=...)``): every forward
          the function runs is timed per module; the table is recorded with the call
          (``profile.parquet``) and kept in ``exp.last_profile``; the function's own
          result is returned unchanged.
        - ``exp.profile_model(input_ids=None, batch_size=..., seq_len=..., repeats=...)``:
          the ``profile_model`` tool on this model (parameters, FLOPs and activation
          bytes per token, seconds per forward): a Polars frame, recorded as a call.
        """
        if func is None and granularity is not None:
            if options:
                raise ToolError(
                    f"profile_model: granularity is for the decorator, {', '.join(options)} "
                    "for the method (exp.profile_model(input_ids=...)): not both"
                )
            return lambda f: self._profiled(f, granularity)
        if func is not None:
            return self._profiled(func, granularity or "component")
        return self._profile_forward(**options)

    def _profiled(self, func: Callable, granularity: str) -> Callable:
        from arrakis_ray.bench.profiling import ModuleProfiler

        if granularity not in ("component", "layer"):
            raise ToolError(f"profile_model: granularity {granularity!r} is not component or layer")
        profiler_box: dict[str, Any] = {}

        def run_profiled(*args, **kwargs):
            with ModuleProfiler(self.model) as profiler:
                result = func(*args, **kwargs)
            profiler_box["table"] = _by_granularity(profiler.table(), granularity)
            return result

        def finish(result):
            table = profiler_box.pop("table")
            self.last_profile = table
            outcome = calls.plain_outcome(result)
            outcome.artifacts["profile.parquet"] = table.to_arrow()
            return outcome

        functools.update_wrapper(run_profiled, func)
        run_profiled.__bench_source__ = versions.source_of(func)
        return self._decorate(run_profiled, "profile", finish, extra={"granularity": granularity})

    def _profile_forward(self, **options):
        from arrakis_ray.bench.profiling import profile_forward

        def profile_model(input_ids=None, **opts):
            return profile_forward(self.model, input_ids, **opts)

        source = versions.source_of(profile_forward)
        return self._call(profile_model, "profile_model", "profile", source, (), options)

    def test_hypothesis(self, func: Callable | None = None, /, **options) -> Callable:
        """The function returns two samples (a pair, or a dict of two conditions); the
        call returns and records a ``HypothesisTest`` (``bench/hypothesis.py``: Welch's
        t, permutation p, bootstrap interval, Cohen's d, verdict at ``alpha``).
        Options: alpha, alternative, n_permutations, n_bootstrap, ci_level, seed."""
        from arrakis_ray.bench.hypothesis import compare_samples, samples_from

        try:  # bad options fail here, at decoration, not at the first call
            compare_samples([0.0, 1.0], [0.0, 2.0], **options)
        except TypeError as e:
            raise ToolError(f"test_hypothesis: {e}".replace("compare_samples() ", "")) from None

        def decorator(f):
            def finish(result):
                import dataclasses

                a, b, label_a, label_b = samples_from(result, name=f.__name__)
                test = compare_samples(a, b, label_a=label_a, label_b=label_b, **options)
                fields = dataclasses.asdict(test)
                kind, text = versions.result_json(fields)
                return calls.Outcome(test, {"result_kind": kind, "result_json": text}, fields)

            return self._decorate(f, "hypothesis", finish, extra={"test_options": options})

        return decorator(func) if func is not None else decorator

    def plot_results(self, *plots, input_ids, **kwargs) -> Callable:
        """Run the model on ``input_ids`` and build each ``PlotSpec``'s chart; the
        function gets ``fig`` (one chart, or several stacked) and ``kwargs``. Its return
        value is returned and recorded; the chart it returns (else ``fig``) is saved
        with the call (``chart_file``)."""
        from arrakis_ray.bench.plots import PlotSpec, build_chart

        if not plots or not all(isinstance(p, PlotSpec) for p in plots):
            raise ToolError("plot_results: pass one or more PlotSpec(plot_type=..., data_keys=...)")

        def decorator(func):
            def with_figure(*args, **kw):
                import altair as alt

                charts = [build_chart(self.model, spec, input_ids) for spec in plots]
                fig = charts[0] if len(charts) == 1 else alt.vconcat(*charts)
                return func(*args, fig=fig, **kw, **kwargs), fig

            def finish(plotted):
                returned, fig = plotted
                outcome = calls.plain_outcome(returned)
                if "chart.vl.json" not in outcome.artifacts:  # it returned something else
                    outcome.artifacts["chart.vl.json"] = fig.to_json(indent=None).encode()
                return outcome

            functools.update_wrapper(with_figure, func)
            with_figure.__bench_source__ = versions.source_of(func)
            with_figure.__bench_injected__ = ("fig",)
            specs = [dict(vars(p)) for p in plots]
            # the decorator's keyword arguments go to the function: they are its arguments
            extra = {"plots": specs, "input_ids": input_ids, **kwargs}
            return self._decorate(with_figure, "plot", finish, extra=extra)

        return decorator

    def map(
        self, fn: Callable, grid: Mapping[str, Iterable] | Iterable[Mapping], *, num_cpus: float = 1
    ):
        """Call ``fn`` once per point of ``grid`` as Ray tasks; each call is recorded as a
        direct call would be (a hypothesis test, a plot, a profile included).

        ``fn`` is a bench-decorated function (a plain one is logged as an experiment).
        ``grid``: a dict of parameter -> values (every combination, in order) or a list
        of keyword dicts. Every point's arguments are checked here, before any task
        starts. Returns the results in grid order. Calls that fail are recorded; one
        error naming how many failed is raised after all have run.
        """
        from arrakis_ray.bench.fanout import grid_points, run_points

        if not getattr(fn, "__bench_records__", False):
            fn = self.log_experiment(fn)
        points = grid_points(grid)
        for point in points:
            fn.__bench_spec__((), point)  # DataError / TypeError naming the argument
        return run_points(fn, points, num_cpus)


def _by_granularity(table, granularity: str):
    """The profiler's per-component table, or summed per block (``layer``)."""
    import polars as pl

    if granularity == "component":
        return table
    return (
        table.group_by("layer", maintain_order=True)
        .agg(
            pl.col("calls").max(),
            pl.col("seconds").sum(),
            pl.col("output_bytes").sum(),
            pl.col("params").sum(),
        )
        .with_columns(share_of_time=pl.col("seconds") / pl.col("seconds").sum())
    )


def _is_hooked(model) -> bool:
    from arrakis_ray.models.hooked import HookedModel

    return isinstance(model, HookedModel)
