"""Offline HTML pages (plus one PNG per chart) from Altair charts.

Two kinds of page share one renderer:

- a report (:func:`write_report`): one ``report.html`` that works offline on its own:
  the Vega, Vega-Lite and Vega-Embed JavaScript is inlined (from
  ``vl_convert.javascript_bundle``), so the file can be mailed or opened anywhere;
- a page of a site (:func:`write_page`): the same markup, but the ~1 MB bundle is one
  file of the site (:func:`write_bundle`, ``assets/vega-bundle.js``) that every page
  loads by a relative URL, so a site of a hundred pages stays small and still needs no
  network.

Every chart's spec is embedded as JSON and the page loads nothing from the network. The
page records whether each chart rendered, so a headless browser can check it
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
from arrakis_ray.reports.page_assets import EMBED_JS, ERROR_HOOK_JS, PAGE_CSS

if TYPE_CHECKING:
    import altair as alt

__all__ = [
    "ChartBlock",
    "ChartRow",
    "ReportPaths",
    "RenderResult",
    "render_in_browser",
    "write_bundle",
    "write_page",
    "write_report",
]

log = logging.getLogger(__name__)

PNG_SCALE = 2  # PNG pixels per chart pixel: sharp on high-density screens and in slides
BUNDLE_FILE = "vega-bundle.js"  # the name write_bundle gives the site's shared script


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    html: Path
    pngs: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ChartBlock:
    """A section of a page holding one chart."""

    heading: str
    chart: Any
    """An Altair chart, or a Vega-Lite spec as a dict (a saved ``.vl.json``)."""
    before_html: str = ""
    """Trusted HTML between the heading and the chart (escape store text first)."""
    after_html: str = ""
    """Trusted HTML under the chart."""


@dataclass(frozen=True)
class ChartRow:
    """Charts side by side under one heading: the same chart for several runs."""

    heading: str
    charts: tuple[ChartBlock, ...]
    """Each one's heading is its caption."""
    before_html: str = ""


Block = str | ChartBlock | ChartRow  # a str is trusted HTML, inserted as-is


@dataclass(frozen=True)
class _Embedded:
    """A chart ready for the page: its caption, unique slug and JSON-safe spec."""

    heading: str
    slug: str
    spec: dict[str, Any]


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
    ``intro_html`` is inserted as-is under the page title (trusted HTML). The page
    inlines the Vega bundle: it is one file that works offline on its own.
    """
    import vl_convert as vlc

    vl_version = _vegalite_version()
    blocks: list[Block] = [intro_html, *(ChartBlock(h, c) for h, c in charts)]
    embedded = _embed_all(blocks)  # converted before anything is written
    out_dir = Path(out_dir)  # created only once every chart converted: bad input writes nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    page = _render_page(title, blocks, embedded, _inline_bundle(vl_version))
    html_path = out_dir / "report.html"
    _write_atomic(html_path, page.encode("utf-8"))

    pngs: list[Path] = []
    if png:
        for chart in (e for item in embedded for e in item):
            try:
                data = vlc.vegalite_to_png(chart.spec, vl_version=vl_version, scale=PNG_SCALE)
            except Exception as exc:  # vl-convert raises plain ValueError/RuntimeError
                raise ReportError(f"PNG export of chart {chart.heading!r} failed: {exc}") from exc
            path = out_dir / f"{chart.slug}.png"
            _write_atomic(path, data)
            pngs.append(path)
    log.info("wrote report %s (%d charts, %d PNGs)", html_path, len(charts), len(pngs))
    return ReportPaths(html=html_path, pngs=pngs)


def write_page(path: Path, *, title: str, blocks: Sequence[Block], bundle_src: str) -> Path:
    """Write one page of a site to ``path``: ``blocks`` in order, charts drawn by the
    script at ``bundle_src`` (a URL relative to the page, written by :func:`write_bundle`).

    A page without charts loads no script but the error recorder.
    """
    embedded = _embed_all(blocks)
    has_charts = any(embedded)
    script = f'<script src="{html.escape(bundle_src)}"></script>' if has_charts else ""
    page = _render_page(title, blocks, embedded, script)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, page.encode("utf-8"))
    return path


def write_bundle(path: Path) -> Path:
    """Write Vega + Vega-Lite + Vega-Embed as one script file (~1 MB), the one copy that
    every page of a site loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, _javascript_bundle(_vegalite_version()).encode("utf-8"))
    return path


def _embed_all(blocks: Sequence[Block]) -> list[list[_Embedded]]:
    """Per block, its charts as specs with page-unique slugs ([] for HTML blocks)."""
    slugs: list[str] = []
    embedded: list[list[_Embedded]] = []
    for block in blocks:
        if isinstance(block, str):
            embedded.append([])
            continue
        if isinstance(block, ChartBlock):
            items = [(block.heading, block.chart)]
        elif isinstance(block, ChartRow):
            items = [(f"{block.heading}: {c.heading}", c.chart) for c in block.charts]
        else:
            raise ReportError(
                f"page block: expected HTML, a ChartBlock or a ChartRow, got {block!r}"
            )
        charts = []
        for heading, chart in items:
            slug = _slugify(heading, fallback=f"chart-{len(slugs) + 1}", taken=slugs)
            slugs.append(slug)
            charts.append(_Embedded(heading, slug, _chart_spec(chart, heading)))
        embedded.append(charts)
    return embedded


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

    return vlc.javascript_bundle(vl_version=vl_version)


def _inline_bundle(vl_version: str | None) -> str:
    """The bundle as an inline <script> element."""
    # A literal "</script" would end the inline <script> element early.
    bundle = re.sub(r"</(script)", r"<\\/\1", _javascript_bundle(vl_version), flags=re.IGNORECASE)
    return f"<script>{bundle}</script>"


def _chart_spec(chart: Any, heading: str) -> dict[str, Any]:
    """The chart's Vega-Lite spec with its data inlined, JSON-safe."""
    import altair as alt

    if isinstance(chart, dict):  # a spec saved earlier (an experiment's .vl.json)
        return _json_safe(chart)
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


def _chart_html(chart: _Embedded) -> list[str]:
    return [
        f'<div class="arrakis-chart" id="chart-{chart.slug}" data-spec="spec-{chart.slug}"'
        ' data-status="pending"></div>',
        f'<script type="application/json" id="spec-{chart.slug}">'
        f"{_json_for_script(chart.spec)}</script>",
    ]


def _render_page(
    title: str, blocks: Sequence[Block], embedded: list[list[_Embedded]], bundle_html: str
) -> str:
    """The full HTML document; ``bundle_html`` is the element that loads Vega."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{PAGE_CSS}</style>",
        "</head>",
        "<body>",
        '<ul id="arrakis-errors" hidden></ul>',
        f"<script>{ERROR_HOOK_JS}</script>",
        bundle_html,
        f"<h1>{html.escape(title)}</h1>",
    ]
    for block, charts in zip(blocks, embedded, strict=True):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, ChartBlock):
            (chart,) = charts
            parts += [
                f'<section id="{chart.slug}">',
                f"<h2>{html.escape(block.heading)}</h2>",
                block.before_html,
                *_chart_html(chart),
                block.after_html,
                "</section>",
            ]
        else:
            row_id = _slugify(block.heading, fallback="row", taken=[])
            parts += [
                f'<section id="row-{row_id}">',
                f"<h2>{html.escape(block.heading)}</h2>",
                block.before_html,
                '<div class="arrakis-row">',
            ]
            for child, chart in zip(block.charts, charts, strict=True):
                parts += [
                    "<figure>",
                    f"<figcaption>{html.escape(child.heading)}</figcaption>",
                    child.before_html,
                    *_chart_html(chart),
                    child.after_html,
                    "</figure>",
                ]
            parts += ["</div>", "</section>"]
    if any(embedded):
        parts.append(f"<script>{EMBED_JS}</script>")
    parts += ["</body>", "</html>", ""]
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
