"""Building blocks of the report site's pages: file names, relative links, tables, SQL.

Every text that comes from the store (run names, token texts, experiment sources) goes
through ``html.escape`` here, so the page builders compose HTML from these helpers and
never format store text into markup themselves. Links are relative between site paths
(``runs/<run>/index.html``), so the site works from any directory, ``file://`` included.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from arrakis_ray.reports.html import Block

BUNDLE_PATH = "assets/vega-bundle.js"  # site path of the one copy of the Vega script
PREVIEW_ROWS = 20  # rows of a result table shown on its tool page
MAX_CELL = 240  # characters of one text cell before it is cut (the full text in a tooltip)

# Neuron firing densities are drawn on a log scale, binned the same way on the feature
# pages and the comparison page, so a bin means one thing across the site.
DENSITY_FLOOR = 1e-6  # log10 of a dead neuron's density would be -inf: drawn at -6
DENSITY_BIN = 0.25  # width of a density bin, in log10(frequency)

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def safe_name(text: str) -> str:
    """A file-name-safe name for ``text``: itself when it is already safe (run ids, tool
    names), else a slug plus a hash of the original, so two names never collide."""
    text = str(text)
    if _SAFE.fullmatch(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:48] or "x"
    return f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def plural(count: int, word: str) -> str:
    """``1 run``, ``2 runs``, ``0 runs``: a count with its noun (plural by ``s``)."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def density_bin_sql(column: str = "freq") -> str:
    """SQL of the lower edge of the log10 density bin of a firing frequency ``column``."""
    return f"floor(log10(greatest({column}, {DENSITY_FLOOR})) / {DENSITY_BIN}) * {DENSITY_BIN}"


def density_log10(freq: float) -> float:
    """A firing frequency on the density charts' axis (the floor as in the SQL)."""
    return math.log10(max(freq, DENSITY_FLOOR))


def sql_text(text: str) -> str:
    """A SQL string literal of ``text`` (quotes doubled)."""
    return "'" + str(text).replace("'", "''") + "'"


def link(from_page: str, to_page: str) -> str:
    """The relative URL of site path ``to_page`` as seen from site path ``from_page``."""
    return posixpath.relpath(to_page, posixpath.dirname(from_page) or ".")


def anchor(from_page: str, to_page: str, text: str) -> str:
    """``<a>`` to another page of the site, its text escaped."""
    return f'<a href="{html.escape(link(from_page, to_page))}">{html.escape(str(text))}</a>'


def nav(from_page: str, trail: Sequence[tuple[str, str]]) -> str:
    """The breadcrumb line at the top of a page: (text, site path) pairs."""
    items = [anchor(from_page, path, text) for text, path in trail]
    return '<nav class="arrakis-nav">' + " › ".join(items) + "</nav>"


def cell(value: Any) -> str:
    """One value as escaped HTML text: numbers to 4 significant digits, null shown."""
    if value is None:
        return '<span class="muted">null</span>'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple | dict):
        value = json.dumps(value, default=str)
    text = str(value)
    if len(text) <= MAX_CELL:
        return html.escape(text)
    return f'<span title="{html.escape(text)}">{html.escape(text[: MAX_CELL - 1])}…</span>'


def table_html(
    frame,
    *,
    links: Mapping[str, Callable[[dict], str | None]] | None = None,
    render: Mapping[str, Callable[[dict], str]] | None = None,
    max_rows: int | None = None,
) -> str:
    """An HTML table of a Polars frame.

    ``links``: column -> function of the row giving a relative URL (or None) for that
    cell; ``render``: column -> function of the row giving the cell's HTML (trusted:
    it must escape what it shows). Numeric columns are right-aligned.
    """
    links, render = links or {}, render or {}
    rows = frame.to_dicts()
    shown = rows if max_rows is None else rows[:max_rows]
    numeric = {c for c, t in zip(frame.columns, frame.dtypes, strict=True) if t.is_numeric()}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in shown:
        cells = []
        for column in frame.columns:
            if column in render:
                content = render[column](row)
            else:
                content = cell(row[column])
                href = links[column](row) if column in links else None
                if href:
                    content = f'<a href="{html.escape(href)}">{content}</a>'
            klass = ' class="num"' if column in numeric else ""
            cells.append(f"<td{klass}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = ""
    if len(shown) < len(rows):
        more = f'<p class="muted">… {len(rows) - len(shown)} more rows</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def sql_block(sql: str, store: str, *, summary: str = "SQL") -> str:
    """The query behind a chart or table, and the command that reruns it."""
    one_line = " ".join(sql.split())
    command = f"arrakis-ray sql {_shell_quote(store)} {_shell_quote(one_line)}"
    return (
        f"<details><summary>{html.escape(summary)}</summary>"
        f"<pre><code>{html.escape(sql.strip())}</code></pre>"
        f"<p>Rerun: <code>{html.escape(command)}</code></p></details>"
    )


def _shell_quote(text: str) -> str:
    """``text`` quoted for a POSIX shell (double quotes read better around SQL)."""
    if not re.search(r'["$`\\!]', text):
        return f'"{text}"'
    return "'" + text.replace("'", "'\\''") + "'"


class QueryLog:
    """An open Store that remembers every query a page ran: the page lists them, and a
    test can check which views a page read."""

    def __init__(self, db):
        self.db = db
        self.queries: list[str] = []

    def sql(self, query: str):
        self.queries.append(query.strip())
        return self.db.sql(query)

    def views(self) -> list[str]:
        return self.db.views()

    @property
    def root(self):
        return self.db.root


@dataclass
class Page:
    """One page of the site before it is written."""

    path: str
    """Site path, e.g. ``runs/<run>/index.html``."""
    title: str
    blocks: list[Block] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    """SQL the page ran, listed at its foot."""


def queries_footer(queries: Sequence[str]) -> str:
    """The page's queries, folded, so every number on it can be traced back."""
    if not queries:
        return ""
    listing = "\n\n".join(q.strip() + ";" for q in queries)
    return (
        f'<details class="muted"><summary>Every SQL query behind this page '
        f"({len(queries)})</summary><pre><code>{html.escape(listing)}</code></pre></details>"
    )
