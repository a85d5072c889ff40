"""The site's sweep pages, from real sweep records over a real harvested run: the tables
equal the SQL views (and the records written), store text is escaped, the links
resolve, and the pages render in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from reports.test_site import _read, _tables

from arrakis_ray.reports.browser import render_in_browser
from arrakis_ray.reports.site import build_site
from arrakis_ray.store.catalog import Store
from arrakis_ray.sweeps.records import (
    FiringEvent,
    RunEvent,
    ScheduleRecord,
    SweepRecord,
    append_firing,
    append_run_event,
    write_schedule,
    write_sweep,
)

HOOKS = "a1b2c3d4e5f60718"  # sweep over hook sets and batch sizes: 5 points, 4 recorded
DOCS = "0f1e2d3c4b5a6978"  # another sweep, over a parameter the first does not set
ERROR = '<script>alert("boom")</script> & <b>bold</b>'
ELSEWHERE = "feedfacefeedface"  # a run id the site has no page of
SOURCE = "pipelines/sweeps/hooks.yaml"
PARAMS = ["harvest.batch_size", "harvest.hooks"]  # the hooks sweep's own, struct order


@pytest.fixture(scope="module")
def sweeps(harvested, tmp_path_factory):
    """A copy of the shared store with two sweeps' records (a point that failed twice
    with HTML in its error, a duplicate, pending points), two schedules (one fired the
    hooks sweep) and the site of it all."""
    _config, shared, result = harvested
    root = tmp_path_factory.mktemp("sweep-site")
    store = root / "store"
    shutil.copytree(shared, store)  # the shared store stays as it is
    run = result.run_id
    clock = iter(datetime(2025, 1, 2, 3, 0, tzinfo=UTC) + timedelta(seconds=i) for i in range(99))
    spec = {"method": "grid", "parameters": {"harvest.batch_size": [4, 8]}, "retries": 1}
    write_sweep(store, SweepRecord(HOOKS, "hooks", SOURCE, "grid", json.dumps(spec), 5))
    write_sweep(store, SweepRecord(DOCS, "docs", "sweeps/docs.yaml", "grid", "{}", 1))
    resid = ["blocks.*.hook_resid_post"]
    both = [*resid, "blocks.*.mlp.hook_post"]
    written = {  # point -> (params, variants, its events: (status, attempt, error, seconds))
        0: ({"harvest.batch_size": 4, "harvest.hooks": resid}, {"logit_lens": "0123456789ab"},
            [("pending", 0, None, None), ("running", 1, None, None),
             ("complete", 1, None, 1.25)]),
        1: ({"harvest.batch_size": 8, "harvest.hooks": both}, {},
            [("running", 1, None, None), ("failed", 1, ERROR, 0.5),
             ("running", 2, None, None), ("failed", 2, ERROR, 0.75)]),
        2: ({"harvest.batch_size": 4, "harvest.hooks": resid}, {}, [("duplicate", 0, None, None)]),
        3: ({"harvest.batch_size": 8, "harvest.hooks": resid}, {}, [("pending", 0, None, None)]),
    }  # fmt: skip
    for point, (params, variants, events) in written.items():
        for status, attempt, error, seconds in events:
            event = RunEvent(
                HOOKS, "hooks", point, f"key{point:013d}", ELSEWHERE if point == 3 else run,
                params, variants, status, attempt, error, seconds, at=next(clock).isoformat(),
            )  # fmt: skip
            append_run_event(store, event)
    append_run_event(
        store,
        RunEvent(DOCS, "docs", 0, "docs0", run, {"data.max_documents": 40}, {}, "skipped"),
    )
    write_schedule(store, ScheduleRecord("nightly", SOURCE, "name: hooks\n", "0 3 * * *", "s"))
    write_schedule(store, ScheduleRecord("weekly", "/elsewhere.yaml", "x", "0 4 * * 0", "s"))
    # added on a laptop: its file is no sweep's source, its sweep id is the docs sweep's
    laptop = "/home/me/proj/sweeps/docs.yaml"
    write_schedule(store, ScheduleRecord("laptop", laptop, "x", "0 5 * * *", "s", sweep_id=DOCS))
    append_firing(store, FiringEvent("nightly", "2025-01-02T03:00", "sub-1", "submitted"))
    append_firing(
        store, FiringEvent("nightly", "2025-01-03T03:00", "sub-2", "submitted", sweep_id=HOOKS)
    )
    built = build_site(store, root / "site", top_features=0)
    return SimpleNamespace(store=store, out=root / "site", built=built, run=run, written=written)


class _Cells(HTMLParser):
    """A page's tables as rows of (text, href) cells, and the text of its code blocks."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[tuple[str, str | None]]]] = []
        self.code: list[str] = []
        self._cell = self._row = self._code = None
        self._href = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell, self._href = [], None
        elif tag == "a" and self._cell is not None:
            self._href = dict(attrs).get("href")
        elif tag == "code":
            self._code = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(("".join(self._cell), self._href))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "code" and self._code is not None:
            self.code.append("".join(self._code))
            self._code = None

    def handle_data(self, data):
        for buf in (self._cell, self._code):
            if buf is not None:
                buf.append(data)

    def table(self, first: str) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
        """The one table whose first header is ``first``: (header, rows)."""
        found = [t for t in self.tables if t and t[0][0][0] == first]
        assert len(found) == 1, first
        return [text for text, _href in found[0][0]], found[0][1:]


def _page(sweeps, sweep_id: str) -> Path:
    return sweeps.out / "sweeps" / f"{sweep_id}.html"


def _shown(value) -> str:
    """A value as the page's cells show it (numbers to 4 significant digits)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _sql(store: Path, query: str) -> list[tuple]:
    with Store(store) as db:
        return db.sql(query).rows()


def test_the_index_lists_each_sweep_and_schedule_linked_to_its_page(sweeps):
    index = _read(sweeps.built.index)
    listed = {r["sweep_id"]: r for r in _tables(index, "sweep_id")[0]}
    view = _sql(
        sweeps.store,
        "SELECT sweep_id, name, n_points, n_complete, n_failed, n_duplicate, n_skipped, "
        "n_pending FROM sweeps",
    )
    assert set(listed) == {HOOKS, DOCS}
    for sweep_id, *counts in view:
        row = listed[sweep_id]
        columns = ["name", "n_points", "n_complete", "n_failed", "n_duplicate", "n_skipped"]
        assert [row[c] for c in [*columns, "n_pending"]] == [_shown(v) for v in counts]
    # counted from the records written: point 3 pending, point 4 never recorded
    assert [listed[HOOKS][c] for c in ("n_complete", "n_failed", "n_duplicate")] == ["1"] * 3
    assert (listed[HOOKS]["n_pending"], listed[DOCS]["n_skipped"]) == ("2", "1")
    pages = {p.relative_to(sweeps.out).as_posix() for p in sweeps.built.pages}
    for sweep_id in (HOOKS, DOCS):
        assert f"sweeps/{sweep_id}.html" in index.links
        assert f"sweeps/{sweep_id}.html" in pages
    header, rows = _Cells(sweeps.built.index.read_text(encoding="utf-8")).table("schedule")
    schedules = {row[0][0]: dict(zip(header, row, strict=True)) for row in rows}
    # nightly's latest firing names the sweep; weekly never fired, its file is no sweep's
    assert schedules["nightly"]["sweep_id"] == (HOOKS, f"sweeps/{HOOKS}.html")
    assert schedules["nightly"]["firings"][0] == "2"
    assert schedules["weekly"]["sweep_id"] == ("null", None)
    # never fired: linked by the sweep id it was added with, not by its file
    assert schedules["laptop"]["sweep_id"] == (DOCS, f"sweeps/{DOCS}.html")


def test_a_sweep_page_has_its_points_as_sweep_runs_has_them(sweeps):
    text = _page(sweeps, HOOKS).read_text(encoding="utf-8")
    page = _Cells(text)
    header, rows = page.table("point")
    assert header == [
        "point",
        *PARAMS,
        "status",
        "attempt",
        "seconds",
        "error",
        "run_id",
        "variants",
    ]
    query = (
        "SELECT point, params['harvest.batch_size'], params['harvest.hooks'], status, "
        f"attempt, seconds, error, run_id, variants FROM sweep_runs WHERE sweep_id = '{HOOKS}' "
        "ORDER BY point"
    )
    view = _sql(sweeps.store, query)
    assert [[cell for cell, _href in row] for row in rows] == [
        [_shown(v) for v in row] for row in view
    ]
    # and as written: each point's parameters and its latest event
    for row, (point, (params, variants, events)) in zip(rows, sweeps.written.items(), strict=True):
        status, attempt, error, seconds = events[-1]
        assert [c for c, _h in row] == [
            str(point), *(_shown(params[p]) for p in PARAMS), status, str(attempt),
            _shown(seconds), _shown(error), ELSEWHERE if point == 3 else sweeps.run,
            json.dumps(variants),
        ]  # fmt: skip
    # the failed point's error, shown as text: escaped in the HTML
    assert rows[1][header.index("error")][0] == ERROR
    assert html.escape(ERROR) in text and "<script>alert" not in text
    # a run with a page in the site links to it; the other run has none
    links = [row[header.index("run_id")][1] for row in rows]
    assert links == [f"../runs/{sweeps.run}/index.html"] * 3 + [None]
    assert (_page(sweeps, HOOKS).parent / links[0]).resolve().is_file()
    # the SQL shown under the table rebuilds it
    shown = [c for c in page.code if "FROM sweep_runs" in c and "ORDER BY point" in c]
    assert _sql(sweeps.store, shown[0]) == view


def test_a_sweep_page_shows_its_spec_chart_and_schedules(sweeps):
    path = _page(sweeps, HOOKS)
    page, cells = _read(path), _Cells(path.read_text(encoding="utf-8"))
    spec = [c for c in cells.code if '"parameters"' in c]
    assert json.loads(spec[0])["parameters"] == {"harvest.batch_size": [4, 8]}
    # the chart: the seconds of the points that ran, by status
    (chart,) = page.specs
    (data,) = chart["datasets"].values()
    assert [(d["point"], d["status"], d["seconds"]) for d in data] == [
        (0, "complete", 1.25),
        (1, "failed", 0.75),
    ]
    # nightly runs it (a firing names the sweep): both firings; weekly does not
    _header, schedules = cells.table("name")
    assert [row[0][0] for row in schedules] == ["nightly"]
    _header, firings = cells.table("schedule")
    assert [(r[1][0], r[2][0], r[3][0]) for r in firings] == [
        ("2025-01-03 03:00:00", "submitted", "sub-2"),
        ("2025-01-02 03:00:00", "submitted", "sub-1"),
    ]
    # the other sweep: its own parameter only, no schedule, nothing timed
    other = _Cells(_page(sweeps, DOCS).read_text(encoding="utf-8"))
    header, rows = other.table("point")
    assert header[:3] == ["point", "data.max_documents", "status"]
    assert [c for c, _h in rows[0]][:3] == ["0", "40", "skipped"]
    assert not [t for t in other.tables if t[0][0][0] == "schedule"]  # no firing yet
    assert [row[0][0] for row in other.table("name")[1]] == ["laptop"]
    assert "No point has run yet" in _page(sweeps, DOCS).read_text(encoding="utf-8")


def test_the_sweep_pages_link_and_render_in_chromium(sweeps, chromium):
    checked = [sweeps.built.index, _page(sweeps, HOOKS), _page(sweeps, DOCS)]
    for page in checked:
        for target in _read(page).links:
            assert not re.match(r"^([a-z]+:|//)", target), (page, target)  # offline
            assert (page.parent / target.split("#")[0]).resolve().is_file(), (page, target)
    results = [render_in_browser(p) for p in checked]
    for page, result in zip(checked, results, strict=True):
        assert result.errors == [], page
    assert results[1].statuses == ["rendered"] and results[1].svg_count >= 1
    assert results[1].warnings == []
    assert results[2].statuses == []
