"""Reports: chart functions (DataFrame -> Altair chart) and self-contained HTML/PNG output.

Names are imported lazily so that ``import arrakis_ray.reports.browser`` (the demo's
render check) does not pay for importing Altair.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "logit_lens_heatmap": "charts",
    "layer_line_chart": "charts",
    "bar_chart": "charts",
    "write_report": "html",
    "ReportPaths": "html",
    "render_in_browser": "browser",
    "RenderResult": "browser",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
