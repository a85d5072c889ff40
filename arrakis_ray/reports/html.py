"""Self-contained HTML reports (plus one PNG per chart) from Altair charts.

A report is one ``report.html`` that works offline: the Vega, Vega-Lite and
Vega-Embed JavaScript is inlined (from ``vl_convert.javascript_bundle``), every chart's
spec is embedded as JSON, and the page loads nothing from the network. The page
records whether each chart rendered, so a headless browser can check it
(:func:`arrakis_ray.reports.browser.render_in_browser`):

- each chart container (``div.arrakis-chart``) gets ``data-status="rendered"`` once
  ``vegaEmbed`` resolves, or ``data-status="error: <message>"``;
- uncaught errors, unhandled promise rejections and Vega error logs are appended to
  the hidden element ``#arrakis-errors``.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ReportError
from arrakis_ray.reports.browser import RenderResult, render_in_browser

if TYPE_CHECKING:
    import altair as alt

__all__ = ["ReportPaths", "RenderResult", "render_in_browser", "write_report"]

log = logging.getLogger(__name__)

PNG_SCALE = 2  # PNG pixels per chart pixel: sharp on high-density screens and in slides


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    html: Path
    pngs: list[Path] = field(default_factory=list)


def write_report(
    charts: Sequence[tuple[str, alt.TopLevelMixin]],
    out_dir: Path,
    *,
    title: str,
    intro_html: str = "",
    png: bool = True,
) -> ReportPaths:
    """Write ``out_dir/report.html`` (one section per chart) and, if ``png``, one PNG each.

    ``charts`` is a sequence of ``(heading, chart)``; the heading becomes the
    section's ``<h2>`` and, slugified, the PNG's file name (``<slug>.png``).
    ``intro_html`` is inserted as-is under the page title (trusted HTML).
    """
    import vl_convert as vlc

    vl_version = _vegalite_version()
    slugs: list[str] = []
    specs: list[dict[str, Any]] = []
    for i, (heading, chart) in enumerate(charts):
        slugs.append(_slugify(heading, fallback=f"chart-{i + 1}", taken=slugs))
        specs.append(_chart_spec(chart, heading))
    out_dir = Path(out_dir)  # created only once every chart converted: bad input writes nothing
    out_dir.mkdir(parents=True, exist_ok=True)

    page = _render_page(
        title=title,
        intro_html=intro_html,
        sections=[(h, s, spec) for (h, _), s, spec in zip(charts, slugs, specs, strict=True)],
        bundle=_javascript_bundle(vl_version),
    )
    html_path = out_dir / "report.html"
    _write_atomic(html_path, page.encode("utf-8"))

    pngs: list[Path] = []
    if png:
        for (heading, _), slug, spec in zip(charts, slugs, specs, strict=True):
            try:
                data = vlc.vegalite_to_png(spec, vl_version=vl_version, scale=PNG_SCALE)
            except Exception as exc:  # vl-convert raises plain ValueError/RuntimeError
                raise ReportError(f"PNG export of chart {heading!r} failed: {exc}") from exc
            path = out_dir / f"{slug}.png"
            _write_atomic(path, data)
            pngs.append(path)
    log.info("wrote report %s (%d charts, %d PNGs)", html_path, len(specs), len(pngs))
    return ReportPaths(html=html_path, pngs=pngs)


def _vegalite_version() -> str | None:
    """The Vega-Lite version Altair writes specs for, as vl-convert names it (``"6.4"``)."""
    import altair as alt
    import vl_convert as vlc

    match = re.match(r"v?(\d+)\.(\d+)", alt.SCHEMA_VERSION)
    wanted = f"{match.group(1)}.{match.group(2)}" if match else None
    if wanted in vlc.get_vegalite_versions():
        return wanted
    log.warning(
        "vl-convert has no Vega-Lite %s (Altair's schema %s); using its latest",
        wanted,
        alt.SCHEMA_VERSION,
    )
    return None


@functools.lru_cache(maxsize=4)
def _javascript_bundle(vl_version: str | None) -> str:
    """Vega + Vega-Lite + Vega-Embed as one script (~0.9 MB, ~1.5 s to build, so cached)."""
    import vl_convert as vlc

    bundle = vlc.javascript_bundle(vl_version=vl_version)
    # A literal "</script" would end the inline <script> element early.
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


def _chart_spec(chart: alt.TopLevelMixin, heading: str) -> dict[str, Any]:
    """The chart's Vega-Lite spec with its data inlined, JSON-safe."""
    import altair as alt

    if not isinstance(chart, alt.TopLevelMixin):
        raise ReportError(
            f"chart {heading!r}: expected an Altair chart, got {type(chart).__name__}"
        )
    try:
        try:
            spec = chart.to_dict()
        except alt.MaxRowsError:
            log.warning(
                "chart %r has more than %s rows; embedding them all (aggregate in SQL "
                "first for a smaller report)",
                heading,
                alt.data_transformers.options.get("max_rows", 5000),
            )
            with alt.data_transformers.enable("default", max_rows=None):
                spec = chart.to_dict()
    except Exception as exc:  # schema validation errors are long; keep the cause chained
        raise ReportError(f"chart {heading!r} is not a valid Vega-Lite spec: {exc}") from exc
    return _json_safe(spec)


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (invalid JSON, so JSON.parse would fail in the page) with null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _slugify(text: str, *, fallback: str, taken: Sequence[str]) -> str:
    """A file-name-safe, unique slug for a heading (``"Logit lens: L0"`` -> ``logit-lens-l0``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-") or fallback
    unique, n = slug, 2
    while unique in taken:
        unique, n = f"{slug}-{n}", n + 1
    return unique


def _json_for_script(spec: dict[str, Any]) -> str:
    """JSON that can sit inside <script type="application/json">: no "<" at all."""
    # "\u003c" is the same string to JSON.parse, and cannot close the script element.
    return json.dumps(spec, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


# Installed before the Vega bundle so that errors while loading it are recorded too.
_ERROR_HOOK_JS = """
(function () {
  var box = document.getElementById("arrakis-errors");
  window.arrakisRecordError = function (msg) {
    var item = document.createElement("li");
    item.textContent = String(msg);
    box.appendChild(item);
  };
  window.addEventListener("error", function (e) {
    window.arrakisRecordError("error: " + (e.message || e.type));
  });
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    window.arrakisRecordError("unhandled rejection: " + (r && r.message ? r.message : r));
  });
})();
"""

# Embeds every chart with the SVG renderer and records the outcome on its container.
_EMBED_JS = """
(function () {
  function message(err) { return err && err.message ? err.message : String(err); }
  // Vega reports some failures (bad expressions, data errors) through its logger only.
  function logger(el) {
    var level = 2;  // vega.Warn
    return {
      level: function (l) { if (l === undefined) { return level; } level = l; return this; },
      error: function () {
        var text = Array.prototype.map.call(arguments, message).join(" ");
        window.arrakisRecordError(el.id + ": " + text);
        return this;
      },
      warn: function () {
        var text = Array.prototype.map.call(arguments, message).join(" ");
        var prev = el.getAttribute("data-warnings");
        el.setAttribute("data-warnings", prev ? prev + "\\n" + text : text);
        return this;
      },
      info: function () { return this; },
      debug: function () { return this; }
    };
  }
  var charts = document.querySelectorAll("div.arrakis-chart");
  if (typeof window.vegaEmbed !== "function") {
    charts.forEach(function (el) { el.setAttribute("data-status", "error: vegaEmbed missing"); });
    window.arrakisRecordError("vegaEmbed is not defined: the inline bundle did not load");
    return;
  }
  charts.forEach(function (el) {
    var spec;
    try {
      spec = JSON.parse(document.getElementById(el.getAttribute("data-spec")).textContent);
    } catch (err) {
      el.setAttribute("data-status", "error: " + message(err));
      return;
    }
    window.vegaEmbed(el, spec, { renderer: "svg", actions: false, logger: logger(el) })
      .then(function () { el.setAttribute("data-status", "rendered"); })
      .catch(function (err) { el.setAttribute("data-status", "error: " + message(err)); });
  });
})();
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
section { margin: 2.5rem 0; }
.arrakis-chart { overflow-x: auto; }
#arrakis-errors { display: none; }
"""


def _render_page(
    *,
    title: str,
    intro_html: str,
    sections: list[tuple[str, str, dict[str, Any]]],
    bundle: str,
) -> str:
    """The full HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        '<ul id="arrakis-errors" hidden></ul>',
        f"<script>{_ERROR_HOOK_JS}</script>",
        f"<script>{bundle}</script>",
        f"<h1>{html.escape(title)}</h1>",
        intro_html,
    ]
    for heading, slug, spec in sections:
        parts += [
            f'<section id="{slug}">',
            f"<h2>{html.escape(heading)}</h2>",
            f'<div class="arrakis-chart" id="chart-{slug}" data-spec="spec-{slug}"'
            ' data-status="pending"></div>',
            f'<script type="application/json" id="spec-{slug}">{_json_for_script(spec)}</script>',
            "</section>",
        ]
    parts += [f"<script>{_EMBED_JS}</script>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
