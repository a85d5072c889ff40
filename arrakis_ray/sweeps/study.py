"""Studies: a sweep whose file names a report that reads all its runs together.

A study file is a sweep file (``spec.py``) with one more key, ``report:
"package.module:function"``. ``arrakis-ray run STUDY.yaml`` (and ``arrakis-ray sweep``)
runs the sweep, then calls ``function(store, sweep_id, out)``, which writes one
self-contained HTML page to ``out`` from the store's SQL views (``sweep_runs`` gives each
point's run and parameters). Grokking's checkpoints and Leviathan's two models are
studies: each checkpoint or model is a point, so a run in the store.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from arrakis_ray.errors import ArrakisError, ConfigError, ReportError
from arrakis_ray.reports.site_pages import sql_text
from arrakis_ray.store.location import is_uri

ReportFunction = Callable[[str, str, Path], None]


def report_function(spec: str, source: str) -> ReportFunction:
    """The function ``package.module:function`` names; ConfigError naming ``source``."""
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{source}: report: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{source}: report: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{source}: report: {module_name} has no function {attr}")
    return fn


def report_path(store: str, name: str) -> Path:
    """Where a study's page goes: in the store (a local one), else in ``./report-NAME``
    (a page is opened in a browser, and an object store is not a directory)."""
    if is_uri(store):
        return Path(f"report-{name}").absolute() / "report.html"
    return Path(store).expanduser().absolute() / "studies" / name / "report.html"


def write_study_report(sweep, store: str) -> Path:
    """Call the sweep's report function; the page's path. What the function raises (a
    store without a point it needs, a query that fails) becomes one ReportError line."""
    out = report_path(store, sweep.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    write = report_function(sweep.report, sweep.source)
    try:
        write(store, sweep.sweep_id, out)
    except ArrakisError:
        raise
    except Exception as exc:  # noqa: BLE001  (a report's own failure, said in one line)
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ReportError(f"{sweep.source}: report {sweep.report}: {text}") from None
    return out


def points_sql(sweep_id: str, param: str, name: str) -> str:
    """SQL CTE ``points``: each completed point of the sweep, with its run, its value of
    the swept parameter ``param`` (a dotted path, as column ``name``) and the variant of
    each tool it ran (``variants``: tool -> variant)."""
    return (
        f'WITH points AS (SELECT params."{param}" AS {name}, run_id, variants '
        f"FROM sweep_runs WHERE sweep_id = {sql_text(sweep_id)} "
        "AND status IN ('complete', 'skipped')) "
    )


def point_results_sql(
    sweep_id: str, param: str, name: str, tool: str, view: str, columns: str, where: str = ""
) -> str:
    """The rows of ``view`` (a results view of ``tool``) that each point's own call of the
    tool wrote, with the point's ``name`` column. A sweep records every tool call as a
    variant, and a store may hold several (another checkout's paths, another setting):
    joining on the point's variant keeps one call per run."""
    return (
        f"{points_sql(sweep_id, param, name)}SELECT p.{name}, {columns} FROM {view} r "
        f"JOIN points p ON r.run_id = p.run_id "
        f"AND r.variant IS NOT DISTINCT FROM p.variants[{sql_text(tool)}] {where}"
    )
