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

from arrakis_ray.errors import ConfigError
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
    """Call the sweep's report function; the page's path."""
    out = report_path(store, sweep.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_function(sweep.report, sweep.source)(store, sweep.sweep_id, out)
    return out
