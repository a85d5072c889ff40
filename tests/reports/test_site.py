"""The report site, built once from a real store (two harvested runs, their tools, bench
experiments), checked in a real headless Chromium and against values computed from the
activations themselves."""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import polars as pl
import pytest
from support import pipeline_dict

from arrakis_ray.reports.browser import find_chromium, render_in_browser
from arrakis_ray.reports.feature_pages import feature_page_path
from arrakis_ray.reports.site import build_site
from arrakis_ray.store.catalog import Store

HOOKS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
DASHBOARD = {"layers": [2], "k": 4, "window": 2}
DASHBOARD_VIEWS = {
    "results_neuron_stats",
    "results_neuron_top_contexts",
    "results_neuron_quantile_contexts",
    "results_neuron_histograms",
    "results_neuron_logit_effects",
}


@pytest.fixture(scope="module")
def site(ray_session, tmp_path_factory):
    """Two runs (different data slices) with logit lens and neuron dashboard (layer 2),
    three bench experiments, and the site of it all (one feature page per layer)."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.tools.runner import analyze

    root = tmp_path_factory.mktemp("site")
    store = root / "store"
    runs = []
    for n_docs, context in ((16, 24), (12, 16)):
        raw = pipeline_dict(hooks=HOOKS, shard_size=16)  # one shard: fewer Ray tasks
        raw["data"].update(max_documents=n_docs, context_length=context)
        result = harvest(pipeline_from_dict(raw), store)
        analyze(result.run_dir, "logit_lens")
        analyze(result.run_dir, "neuron_dashboard", DASHBOARD)
        runs.append(result)
    bench = _experiments(store)
    built = build_site(store, root / "site", top_features=1)
    return SimpleNamespace(store=store, out=root / "site", runs=runs, built=built, **bench)


def _experiments(store: Path) -> dict:
    """Bench records in the store: versions, a failing call, a hypothesis, a chart."""
    import torch

    from arrakis_ray.bench import (
        BaseInterpretabilityBench,
        HookedAutoConfig,
        HookedAutoModel,
        PlotSpec,
    )

    config = HookedAutoConfig(
        "gpt2", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4
    )
    exp = BaseInterpretabilityBench(HookedAutoModel(config), save_dir=str(store))

    @exp.log_experiment
    def scaled(n):
        print(f"scaling <{n}>")
        if n < 0:
            raise ValueError("<b>boom</b>")
        return {"n": n, "values": [2.0 * i for i in range(n)]}

    scaled(3), scaled(3), scaled(4)
    with pytest.raises(ValueError):
        scaled(-1)

    @exp.test_hypothesis(seed=0)
    def two_groups():
        return {"clean": [1.0, 2.0, 3.0, 4.0, 5.0], "corrupted": [3.0, 4.5, 5.0, 6.0, 7.5]}

    test = two_groups()

    @exp.plot_results(PlotSpec(plot_type="residual_norms"), input_ids=torch.tensor([[1, 2, 3]]))
    def norms(fig=None):
        return fig

    norms()

    forwards = []

    @exp.profile_model
    def profiled():
        # two forwards, then the same version fails: its last successful result stays
        if forwards:
            raise RuntimeError("second call fails")
        for _ in range(2):
            exp.model.run_with_cache(torch.tensor([[1, 2, 3]]))  # a full forward
            forwards.append(1)
        return {"forwards": len(forwards)}

    profiled()
    with pytest.raises(RuntimeError):
        profiled()
    return {
        "versions": exp.list_versions("scaled"),
        "hypothesis": test,
        "profile": exp.last_profile,
    }


# -- reading pages back -------------------------------------------------------------


class _Page(HTMLParser):
    """Links, tables (header + rows of cell text), highlighted tokens and specs of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.tables: list[dict] = []
        self.marks: list[str] = []
        self.specs: list[dict] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._mark: list[str] | None = None
        self._spec: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "table":
            self.tables.append({"header": [], "rows": [], "marks": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "mark":
            self._mark = []
        elif tag == "script" and a.get("type") == "application/json":
            self._spec = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[-1]
            if table["header"]:
                table["rows"].append(self._row)
            else:  # a table's first row is its header (table_html writes <th> cells)
                table["header"] = self._row
            self._row = None
        elif tag == "mark" and self._mark is not None:
            self.marks.append("".join(self._mark))
            if self.tables:
                self.tables[-1]["marks"].append("".join(self._mark))
            self._mark = None
        elif tag == "script" and self._spec is not None:
            self.specs.append(json.loads("".join(self._spec)))
            self._spec = None

    def handle_data(self, data):
        for buf in (self._cell, self._mark, self._spec):
            if buf is not None:
                buf.append(data)


def _read(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


def _tables(page: _Page, first_column: str) -> list[list[dict]]:
    """The page's tables whose first column is ``first_column``, as lists of rows."""
    return [
        [dict(zip(t["header"], row, strict=True)) for row in t["rows"]]
        for t in page.tables
        if t["header"] and t["header"][0] == first_column
    ]


def _png_pixels(path: Path) -> np.ndarray:
    """RGB pixels of an 8-bit non-interlaced PNG (what Chromium writes), decoded with
    zlib: the five row filters of the PNG specification undone row by row."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and interlace == 0 and color in (2, 6)
    c = 3 if color == 2 else 4
    stride = width * c
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            cur = np.cumsum(line.reshape(width, c), axis=0).ravel() % 256
        elif kind == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average, Paeth: each byte depends on the one before it
            done, up = [0] * stride, prev.tolist()
            for i, x in enumerate(line.tolist()):
                left = done[i - c] if i >= c else 0
                if kind == 3:
                    done[i] = (x + (left + up[i]) // 2) & 255
                    continue
                corner = up[i - c] if i >= c else 0
                p = left + up[i] - corner
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else corner)
                done[i] = (x + guess) & 255
            cur = np.array(done, np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, c)[:, :, :3]


def _screenshot(page: Path, png: Path) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="arrakis-shot-") as profile:
        subprocess.run(
            [
                find_chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                "--window-size=1000,1100",
                "--virtual-time-budget=10000",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return _png_pixels(png)


def _near(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(pixels.astype(int) - rgb).sum(-1) < 30).sum())


# -- the tests ----------------------------------------------------------------------


def test_the_site_has_every_page(site):
    a, b = (r.run_id for r in site.runs)
    names = {p.relative_to(site.out).as_posix() for p in site.built.pages}
    assert site.built.index == site.out / "index.html" == site.built.pages[0]
    for run in (a, b):
        assert {
            f"runs/{run}/index.html",
            f"runs/{run}/tools/logit_lens.html",
            f"runs/{run}/tools/neuron_dashboard.html",
            f"runs/{run}/features/index.html",
        } <= names
        # one feature page per layer summarised (top_features=1)
        assert sum(n.startswith(f"runs/{run}/features/mlp_post-l2-") for n in names) == 1
    assert {"compare.html"} | {
        f"experiments/{n}.html" for n in ("scaled", "two_groups", "norms", "profiled")
    } <= names
    assert len(names) == 1 + 1 + 2 * 5 + 4
    assert ": 2 runs.</p>" in site.built.index.read_text(encoding="utf-8")


def test_every_page_renders_in_chromium(site, chromium):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(render_in_browser, site.built.pages))
    rendered = dict(zip(site.built.pages, results, strict=True))
    charted = 0
    for page, result in rendered.items():
        assert result.errors == [], page
        assert set(result.statuses) <= {"rendered"}, (page, result.statuses)
        assert result.svg_count >= len(result.statuses), page
        charted += bool(result.statuses)
    run_page = site.out / "runs" / site.runs[0].run_id / "index.html"
    assert len(rendered[run_page].statuses) >= 2  # the report's logit lens charts
    assert len(rendered[site.out / "compare.html"].statuses) >= 2
    assert len(rendered[site.out / "experiments" / "norms.html"].statuses) == 1
    assert charted >= 8  # runs, lens tool pages, feature pages, comparison, a chart


def test_every_local_link_resolves_and_every_page_is_reachable(site):
    pages = {p.resolve() for p in site.built.pages}
    reached, todo = set(), [site.built.index.resolve()]
    for page in site.built.pages:
        for target in _read(page).links:
            assert not re.match(r"^([a-z]+:|//)", target), (page, target)  # offline
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_file(), (page, target)
    while todo:  # breadth-first from the index, over links to pages
        page = todo.pop()
        reached.add(page)
        for target in _read(page).links:
            path = (page.parent / target.split("#")[0]).resolve()
            if path.suffix == ".html" and path not in reached:
                todo.append(path)
    assert pages <= reached


def test_the_vega_bundle_is_one_shared_file(site):
    bundle = site.out / "assets" / "vega-bundle.js"
    assert "vegaEmbed" in bundle.read_text(encoding="utf-8")
    for page in site.built.pages:
        text = page.read_text(encoding="utf-8")
        scripts = re.findall(r'<script src="([^"]+)"', text)
        if 'class="arrakis-chart"' in text:
            assert len(scripts) == 1 and scripts[0].endswith("assets/vega-bundle.js"), page
            assert (page.parent / scripts[0]).resolve() == bundle.resolve()
        assert "window.vegaEmbed=" not in text, page  # never inlined
        assert "cdn." not in text


def test_screenshots_are_not_blank(site, chromium, tmp_path):
    a = site.runs[0].run_id
    feature = next(p for p in site.built.pages if "/features/mlp_post-l" in p.as_posix())
    compare = site.out / "compare.html"
    shots = {}
    for page in (site.built.index, site.out / "runs" / a / "index.html", feature, compare):
        pixels = shots[page] = _screenshot(page, tmp_path / f"{len(shots)}.png")
        not_white = (pixels < 245).any(-1).mean()
        assert not_white > 0.01, page
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2, page
    # the feature page's density chart drew its red marker of this neuron
    assert _near(shots[feature], (214, 39, 40)) > 50
    # the comparison overlays draw each run in its colour (Vega's first two categories)
    assert _near(shots[compare], (76, 120, 168)) > 20 and _near(shots[compare], (245, 133, 24)) > 20


def _activations(store: Path, run_id: str, layer: int) -> tuple[np.ndarray, pl.DataFrame]:
    with Store(store) as db:
        rows = db.sql(
            f"SELECT * FROM act_mlp_post WHERE run_id = '{run_id}' AND layer = {layer} "
            "ORDER BY seq_id, pos"
        )
        tokens = db.sql(f"SELECT seq_id, pos, token_text FROM tokens WHERE run_id = '{run_id}'")
    dims = sorted((c for c in rows.columns if re.fullmatch(r"d\d+", c)), key=lambda c: int(c[1:]))
    keys = rows.select("seq_id", "pos").join(tokens, on=["seq_id", "pos"], how="left")
    return rows.select(dims).to_numpy(), keys.sort("seq_id", "pos")


def test_a_feature_page_shows_what_the_activations_say(site):
    run_id, layer = site.runs[0].run_id, 2
    x, keys = _activations(site.store, run_id, layer)
    neuron = int(np.argmax(x.max(0)))  # top_features=1: the neuron with the largest max
    path = site.out / feature_page_path(run_id, "mlp_post", layer, neuron)
    assert path in site.built.pages
    page = _read(path)
    (stats,) = _tables(page, "freq")[0]
    freqs = (x > 0).mean(0)
    assert stats["max"] == f"{x[:, neuron].max():.4g}"
    assert stats["freq"] == f"{freqs[neuron]:.4g}"
    assert stats["n_tokens"] == str(len(x))
    # density among the layer: from the activations of every neuron of the layer
    text = path.read_text(encoding="utf-8")
    match = re.search(r"Of the (\d+) neurons of its layer, (\S+)% fire less often and "
                      r"(\S+)% more often; (\d+) never fire", text)  # fmt: skip
    n = x.shape[1]
    assert match.groups() == (
        str(n),
        f"{100 * (freqs < freqs[neuron]).sum() / n:.4g}",
        f"{100 * (freqs > freqs[neuron]).sum() / n:.4g}",
        str(int((freqs == 0).sum())),
    )
    # the top context: the argmax token (ties: lower seq_id, then pos), its token marked
    order = np.lexsort((keys["pos"].to_numpy(), keys["seq_id"].to_numpy(), -x[:, neuron]))
    top = keys.row(int(order[0]), named=True)
    first = _tables(page, "rank")[0][0]  # the top contexts come first
    assert (first["seq_id"], first["pos"]) == (str(top["seq_id"]), str(top["pos"]))
    assert first["activation"] == f"{x[order[0], neuron]:.4g}"
    table = next(t for t in page.tables if t["header"][:3] == ["rank", "activation", "context"])
    assert table["marks"][0] == top["token_text"]
    with Store(site.store) as db:
        context = db.sql(
            "SELECT context FROM results_neuron_top_contexts WHERE run_id = "
            f"'{run_id}' AND layer = {layer} AND neuron = {neuron} AND rank = 1"
        )["context"][0]
        views = set(db.views())
    # the page shows the stored context with its centre marked instead of bracketed
    assert f"[{top['token_text']}]" in context
    assert first["context"] == context.replace(f"[{top['token_text']}]", top["token_text"], 1)
    expected = {
        "results_neuron_quantile_contexts": "Contexts sampled from activation quantiles",
        "results_neuron_histograms": "Activation histogram",
        "results_neuron_logit_effects": "Logit effect",
    }
    for view, heading in expected.items():
        assert (heading in text) == (view in views), view


def _tables_read(query: str) -> tuple[set[str], set[str]]:
    """(base tables, table functions) a query reads, from DuckDB's own parse tree."""
    con = duckdb.connect()
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    assert not tree["error"], query
    tables, functions = set(), set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE":
                tables.add(node["table_name"])
            if node.get("type") == "TABLE_FUNCTION":
                functions.add(json.dumps(node["function"])[:80])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return tables, functions


def test_feature_pages_read_only_the_dashboard_tables(site):
    pages = [p for p in site.built.pages if "/features/" in p.as_posix()]
    assert len(pages) == 2 * 2  # an index and a feature per run
    for page in pages:
        queries = site.built.queries[page]
        assert queries, page
        for query in queries:
            tables, functions = _tables_read(query)
            assert tables and tables <= DASHBOARD_VIEWS and not functions, (page, query)
            assert re.search(r"run_id = '[0-9a-f]+'", query)  # a lookup of one run
        # the page lists the queries it ran
        assert f"Every SQL query behind this page ({len(queries)})" in page.read_text()


def test_the_comparison_overlays_the_runs_from_one_query(site):
    a, b = (r.run_id for r in site.runs)
    (lens,) = [
        s
        for s in _read(site.out / "compare.html").specs
        if any("measure" in row for d in s.get("datasets", {}).values() for row in d)
    ]
    rows = [row for d in lens["datasets"].values() for row in d]
    drawn = {(r["run_id"], r["layer"], r["measure"]): r["value"] for r in rows}
    with Store(site.store) as db:
        raw = db.sql("SELECT run_id, layer, target_prob, target_rank FROM results_logit_lens")
    expected = (
        raw.filter(pl.col("target_rank").is_not_null())
        .group_by("run_id", "layer")
        .agg(
            pl.col("target_prob").cast(pl.Float64).mean().alias("mean_next_token_prob"),
            (pl.col("target_rank") == 1).cast(pl.Float64).mean().alias("top1_accuracy"),
        )
    )
    assert {r for r, _, _ in drawn} == {a, b}
    assert len(drawn) == 2 * len(expected)
    for row in expected.iter_rows(named=True):
        for measure in ("mean_next_token_prob", "top1_accuracy"):
            got = drawn[(row["run_id"], row["layer"], measure)]
            assert got == pytest.approx(row[measure], rel=1e-9, abs=1e-12)


def test_experiment_pages_show_versions_calls_tests_and_charts(site):
    experiments = site.out / "experiments"
    scaled = (experiments / "scaled.html").read_text(encoding="utf-8")
    assert f"Versions ({len(site.versions)})" in scaled and "Calls (4)" in scaled
    assert all(v in scaled for v in site.versions)
    assert "def scaled(n):" in scaled
    assert "scaling &lt;3&gt;" in scaled and "scaling <3>" not in scaled  # escaped stdout
    assert "&lt;b&gt;boom&lt;/b&gt;" in scaled and "<b>boom</b>" not in scaled  # the error
    test = site.hypothesis
    (row,) = _tables(_read(experiments / "two_groups.html"), "version")[-1]  # hypotheses
    assert row["welch_p"] == f"{test.welch_p:.4g}"
    assert row["permutation_p"] == f"{test.permutation_p:.4g}"
    assert row["n_permutations"] == str(test.n_permutations)
    assert row["verdict"] == test.verdict
    # the chart the call saved is embedded as it was saved
    with Store(site.store) as db:
        chart_file = db.sql("SELECT chart_file FROM experiment_calls WHERE name = 'norms'")
    saved = json.loads((site.store / chart_file["chart_file"][0]).read_text())
    assert _read(experiments / "norms.html").specs == [saved]
    index = (site.out / "index.html").read_text(encoding="utf-8")
    assert "<h2>Experiments</h2>" in index and 'href="experiments/two_groups.html"' in index


def test_an_experiment_page_previews_the_profile_and_the_last_successful_result(site):
    """profiled() succeeded (two forwards) and then failed, in one version."""
    with Store(site.store) as db:
        calls = db.sql(
            "SELECT call_id, status, profile_file FROM experiment_calls "
            "WHERE name = 'profiled' ORDER BY started_at"
        )
        version = db.sql("SELECT * FROM experiments WHERE name = 'profiled'")
    assert calls["status"].to_list() == ["ok", "error"]
    assert version["last_status"][0] == "error"
    assert json.loads(version["last_ok_result_json"][0]) == {"forwards": 2}
    text = (site.out / "experiments" / "profiled.html").read_text(encoding="utf-8")
    assert "<summary>Last successful result</summary>" in text
    assert html.escape(json.dumps({"forwards": 2}, indent=2)) in text
    # the ok call's per-module table, previewed as stored (and as the bench measured it)
    ok_call, profile_file = calls["call_id"][0], calls["profile_file"][0]
    stored = pl.read_parquet(site.store / profile_file)
    assert stored["module"].to_list() == site.profile["module"].to_list()
    assert set(stored["calls"].to_list()) == {2}  # every module ran in both forwards
    assert f"Per-module profile of call {ok_call}</h3>" in text
    assert f"<code>{profile_file}</code>: {len(stored)} rows, the first" in text
    page = _read(site.out / "experiments" / "profiled.html")
    (preview,) = [t for t in page.tables if t["header"][:1] == ["module"]]
    shown = min(len(stored), 10)
    assert [r[0] for r in preview["rows"]] == stored["module"].to_list()[:shown]
    calls_column = preview["header"].index("calls")
    assert [r[calls_column] for r in preview["rows"]] == ["2"] * shown
    # the failed call recorded no profile: one preview only
    assert text.count("Per-module profile of call") == calls["profile_file"].is_not_null().sum()


def test_cli_site_for_chosen_runs_and_its_errors(site, tmp_path, capsys):
    from arrakis_ray.cli import main

    a = site.runs[0].run_id
    out = tmp_path / "one"
    args = ["site", str(site.store), "--out", str(out), "--runs", a[:6], "--top-features", "0"]
    assert main(args) == 0
    assert f"site:   {out / 'index.html'}" in capsys.readouterr().out
    runs = {p.name for p in (out / "runs").iterdir()}
    assert runs == {a}
    assert not (out / "runs" / a / "features").exists() and not (out / "compare.html").exists()

    assert main(["site", str(site.store), "--out", str(out), "--runs", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arrakis-ray: error: run 'nope' is not a run of the store")
    assert "\n" not in err
    assert main(["site", str(site.store), "--out", str(out / "index.html" / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write the site to" in err and "is a file" in err
    assert ": 1 run.</p>" in (out / "index.html").read_text(encoding="utf-8")


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_the_site_is_never_written_into_the_store_data(site, tmp_path, capsys):
    """Pages in the store root, runs/ or experiments/ would be strays for `verify`."""
    from arrakis_ray.cli import main
    from arrakis_ray.errors import ReportError

    store, run = site.store, site.runs[0].run_id
    before = _listing(store)
    (tmp_path / "to_runs").symlink_to(store / "runs")
    (tmp_path / "to_store").symlink_to(store)
    refused = {
        store: "it is the store",
        store / "runs" / ".." / ".": "it is the store",
        tmp_path / "to_store": "it is the store",
        store / "runs": "inside the store's runs/",
        store / "runs" / run / "site": "inside the store's runs/",
        store / "experiments" / "new" / "site": "inside the store's experiments/",
        tmp_path / "to_runs" / "x": "inside the store's runs/",
        tmp_path / "to_store" / "experiments": "inside the store's experiments/",
    }
    for out, why in refused.items():
        with pytest.raises(ReportError, match=re.escape(why)):
            build_site(store, out)
    assert main(["site", str(tmp_path / "to_store"), "--out", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"arrakis-ray: error: cannot write the site to {store}: it is the store")
    assert "\n" not in err
    assert _listing(store) == before  # nothing written, not even a directory


def test_a_site_beside_the_data_of_an_empty_store(tmp_path):
    from arrakis_ray.store.layout import init_store

    store = init_store(tmp_path / "store")
    built = build_site(store, store / "site")  # as the demo writes it
    assert built.index == store / "site" / "index.html"
    assert ": 0 runs.</p>" in built.index.read_text(encoding="utf-8")
    assert not any((store / "runs").iterdir())


def test_plural_and_the_shared_density_bins():
    from arrakis_ray.reports import comparison, feature_pages
    from arrakis_ray.reports.site_pages import density_bin_sql, density_log10, plural

    assert [plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    # one definition of the bins: both pages' SQL carry it, and it bins as the axis does
    assert density_bin_sql("freq") in feature_pages.LAYER_DENSITY
    assert density_bin_sql("freq") in comparison.DENSITY_BY_LAYER
    freqs = [0.0, 1e-7, 1e-6, 0.003, 0.05, 0.5, 1.0]
    got = duckdb.sql(
        f"SELECT {density_bin_sql('freq')} AS b FROM unnest({freqs}) AS t(freq) ORDER BY freq"
    ).fetchall()
    expected = [np.floor(density_log10(f) / 0.25) * 0.25 for f in freqs]
    assert [b for (b,) in got] == pytest.approx(expected)
    assert expected[:3] == [-6.0, -6.0, -6.0] and expected[-1] == 0.0


# -- the building blocks, without a store --------------------------------------------


def test_safe_names_keep_ids_and_never_collide():
    from arrakis_ray.reports.site_pages import link, safe_name

    assert safe_name("1f57be910aac1ede") == "1f57be910aac1ede"
    assert safe_name("mlp_post") == "mlp_post"
    names = [safe_name(t) for t in ("sae:blocks.3", "sae-blocks.3", "sae:blocks-3", "../x", "a b")]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names)
    assert (
        link("runs/a/features/x.html", "assets/vega-bundle.js") == "../../../assets/vega-bundle.js"
    )
    assert link("index.html", "runs/a/index.html") == "runs/a/index.html"


def test_context_marks_its_centre_token_and_escapes_the_rest():
    from arrakis_ray.reports.feature_pages import context_html

    shown = context_html("… <b> the [capital] of & …")
    centre = '<mark class="centre">capital</mark>'
    assert shown == f'<span class="context">… &lt;b&gt; the {centre} of &amp; …</span>'
    # a token that is itself a bracket makes the centre ambiguous: shown as stored
    assert "<mark" not in context_html("a [[] b [c]")


def test_a_row_of_charts_and_a_saved_spec_render_in_chromium(tmp_path, chromium):
    import altair as alt

    from arrakis_ray.reports.html import ChartBlock, ChartRow, write_bundle, write_page

    frame = pl.DataFrame({"layer": [0, 1, 2], "value": [0.1, 0.5, 0.9]})
    line = alt.Chart(frame).mark_line().encode(x="layer:O", y="value:Q")
    saved = json.loads(
        json.dumps(alt.Chart(frame).mark_bar().encode(x="layer:O", y="value").to_dict())
    )
    write_bundle(tmp_path / "assets" / "vega-bundle.js")
    page = write_page(
        tmp_path / "deep" / "page.html",
        title="A <row>",
        blocks=[
            "<p>intro</p>",
            ChartRow("Per run", (ChartBlock("run a", line), ChartBlock("run b", line))),
            ChartBlock("Saved", saved, after_html="<p>after</p>"),
        ],
        bundle_src="../assets/vega-bundle.js",
    )
    text = page.read_text(encoding="utf-8")
    assert "<title>A &lt;row&gt;</title>" in text and text.count("<figcaption>") == 2
    result = render_in_browser(page)
    assert result.statuses == ["rendered"] * 3 and result.errors == []
    assert result.svg_count == 3
    # without the bundle the charts fail loudly rather than silently
    (tmp_path / "assets" / "vega-bundle.js").unlink()
    broken = render_in_browser(page)
    assert broken.statuses == ["error: vegaEmbed missing"] * 3
    assert any("did not load" in e for e in broken.errors)
    # a page without charts loads no script
    plain = write_page(tmp_path / "plain.html", title="t", blocks=["<p>x</p>"], bundle_src="no.js")
    assert "<script src=" not in plain.read_text(encoding="utf-8")


def test_bad_top_features_and_store_are_one_line_errors(tmp_path):
    from arrakis_ray.errors import ConfigError, StoreError

    with pytest.raises(ConfigError, match="top_features must be an integer >= 0, got -1"):
        build_site(tmp_path, tmp_path / "site", top_features=-1)
    with pytest.raises(StoreError):
        build_site(tmp_path / "nowhere", tmp_path / "site")
    assert not (tmp_path / "site").exists()
