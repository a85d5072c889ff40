"""Open a report in headless Chromium and read back what rendered.

Used by the tests and by the demo's self-check: it proves a report renders in a real
browser with no network, which a string check of the HTML cannot.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from arrakis_ray.errors import ReportError

log = logging.getLogger(__name__)

# Looked up in this order; ARRAKIS_CHROMIUM (a path) overrides them all.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass(frozen=True)
class RenderResult:
    """What a report's page recorded after loading in a headless browser."""

    statuses: list[str]
    """``data-status`` of each chart container in page order: ``"rendered"`` or ``"error: ..."``."""
    errors: list[str]
    """Entries of the page's ``#arrakis-errors`` list (uncaught errors, Vega error logs)."""
    svg_count: int
    """Number of ``<svg>`` elements in the rendered DOM (one per rendered chart)."""
    svg_sizes: list[tuple[float, float]] = field(default_factory=list)
    """``(width, height)`` attributes of each ``<svg>``, in CSS pixels."""
    svg_texts: list[str] = field(default_factory=list)
    """Text of every SVG ``<text>`` element: axis labels, titles, in-cell text."""
    warnings: list[str] = field(default_factory=list)
    """Vega/Vega-Lite warnings recorded on the chart containers."""
    dom: str = ""
    """The serialized DOM as Chromium dumped it."""


def find_chromium() -> str:
    """Path of a Chromium/Chrome executable, or a ReportError saying how to get one."""
    override = os.environ.get("ARRAKIS_CHROMIUM")
    if override:
        if shutil.which(override):
            return shutil.which(override)  # type: ignore[return-value]
        raise ReportError(f"ARRAKIS_CHROMIUM={override!r} is not an executable")
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ReportError(
        "no Chromium found on PATH (looked for " + ", ".join(BROWSER_NAMES) + "): install it "
        "(Debian: apt-get install chromium, or `make browser` as root) or set ARRAKIS_CHROMIUM"
    )


def render_in_browser(
    html_path: Path, *, timeout_s: float = 30, virtual_time_ms: int = 10_000
) -> RenderResult:
    """Load ``html_path`` in headless Chromium with the network cut off; parse the DOM.

    ``virtual_time_ms`` is how much page time Chromium lets pass (it fast-forwards idle
    time) before dumping the DOM; ``timeout_s`` bounds the real time of the whole run.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise ReportError(f"report not found: {html_path}")
    exe = find_chromium()
    with tempfile.TemporaryDirectory(prefix="arrakis-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",  # needed as root in containers; the page is our own file
            "--disable-gpu",
            "--disable-quic",
            "--disable-dev-shm-usage",  # /dev/shm is tiny in many containers
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Every host name fails to resolve: a report that needs a CDN cannot render.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={int(virtual_time_ms)}",
            "--dump-dom",
            html_path.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ReportError(
                f"Chromium did not finish rendering {html_path} within {timeout_s} s"
            ) from exc
    if not proc.stdout.strip():
        tail = proc.stderr.strip()[-2000:]
        raise ReportError(
            f"Chromium ({exe}) returned no DOM for {html_path} (exit {proc.returncode}): {tail}"
        )
    if proc.returncode != 0:
        log.warning("Chromium exited %d but dumped a DOM; using it", proc.returncode)
    return parse_dom(proc.stdout)


class _DomReader(HTMLParser):
    """Collects chart statuses, recorded errors and SVG text from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.statuses: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.svg_count = 0
        self.svg_sizes: list[tuple[float, float]] = []
        self.svg_texts: list[str] = []
        self._open: list[str] = []  # stack of open tags we care about: "errors", "li", "text"
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "arrakis-chart" in a.get("class", "").split():
            self.statuses.append(a.get("data-status", ""))
            if a.get("data-warnings"):
                self.warnings.extend(a["data-warnings"].split("\n"))
        if tag == "svg":
            self.svg_count += 1
            try:
                self.svg_sizes.append((float(a["width"]), float(a["height"])))
            except (KeyError, ValueError):
                pass  # an SVG sized by CSS; its size is not needed
        if a.get("id") == "arrakis-errors":
            self._open.append("errors")
        elif tag == "li" and "errors" in self._open:
            self._open.append("li")
            self._buf = []
        elif tag == "text":
            self._open.append("text")
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if not self._open:
            return
        top = self._open[-1]
        if top == "li" and tag == "li":
            self.errors.append("".join(self._buf).strip())
        elif top == "text" and tag == "text":
            self.svg_texts.append("".join(self._buf))
        elif not (top == "errors" and tag == "ul"):
            return
        self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] in ("li", "text"):
            self._buf.append(data)


def parse_dom(dom: str) -> RenderResult:
    """Read the render record out of a serialized report DOM."""
    reader = _DomReader()
    reader.feed(dom)
    reader.close()
    return RenderResult(
        statuses=reader.statuses,
        errors=reader.errors,
        svg_count=reader.svg_count,
        svg_sizes=reader.svg_sizes,
        svg_texts=reader.svg_texts,
        warnings=reader.warnings,
        dom=dom,
    )
