"""HTML/PNG reports, checked by rendering them in a real headless Chromium."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import altair as alt
import polars as pl
import pytest

from arrakis_ray.reports import (
    bar_chart,
    layer_line_chart,
    logit_lens_heatmap,
    render_in_browser,
    write_report,
)
from arrakis_ray.reports.html import PNG_SCALE

SPEC_RE = re.compile(r'(<script type="application/json" id="spec-([\w-]+)">)(.*?)(</script>)', re.S)


@pytest.fixture(scope="module")
def report(tmp_path_factory, logit_lens_df):
    """A three-chart report written once for the module."""
    norms = pl.DataFrame(
        {"layer": [0, 1, 2, 0, 1, 2], "norm": [1.0, 2.0, 3.0, 2.0, 3.5, 5.0], "run": list("aaabbb")}
    )
    timings = pl.DataFrame({"tool": ["logit_lens", "probe"], "seconds": [1.5, 0.25]})
    charts = [
        ("Logit lens", logit_lens_heatmap(logit_lens_df, title="toy lens")),
        ("Residual norm per layer", layer_line_chart(norms, x="layer:O", y="norm", color="run")),
        ("Tool timings", bar_chart(timings, x="tool", y="seconds")),
    ]
    out = tmp_path_factory.mktemp("report")
    return charts, write_report(charts, out, title="Toy <report>", intro_html="<p>hi</p>")


@pytest.fixture(scope="module")
def rendered(report, chromium):
    return render_in_browser(report[1].html)


def _specs(html_text: str) -> dict[str, dict]:
    return {m.group(2): json.loads(m.group(3)) for m in SPEC_RE.finditer(html_text)}


def test_report_renders_in_chromium(rendered, logit_lens_rows):
    assert rendered.statuses == ["rendered"] * 3
    assert rendered.errors == []
    assert rendered.svg_count == 3
    texts = set(rendered.svg_texts)
    # x labels "pos: token_text", the embed row label, the in-cell top-1 predictions.
    for row in logit_lens_rows:
        assert f"{row['pos']}: {row['token_text']}" in texts
        assert row["top1_token"].strip() in texts
    assert {"embed", "toy lens", "norm", "seconds"} <= texts


def test_report_is_one_offline_file(report):
    charts, paths = report
    text = paths.html.read_text(encoding="utf-8")
    # Nothing beside the page and its PNGs: no JS or CSS files for it to load.
    assert {p.name for p in paths.html.parent.iterdir()} == {"report.html"} | {
        p.name for p in paths.pngs
    }
    assert not re.search(r"<script[^>]*\ssrc=", text, re.I)
    assert not re.search(r"<link[^>]*\shref=", text, re.I)
    for cdn in ("cdn.jsdelivr", "unpkg.com", "cdnjs", "esm.sh"):
        assert cdn not in text
    assert "window.vegaEmbed=" in text  # the bundle is inline
    assert "<title>Toy &lt;report&gt;</title>" in text and "<p>hi</p>" in text
    # The embedded specs are exactly what Altair produces for each chart.
    specs = _specs(text)
    assert list(specs) == ["logit-lens", "residual-norm-per-layer", "tool-timings"]
    for (_, chart), spec in zip(charts, specs.values(), strict=True):
        assert spec == chart.to_dict()


def test_broken_spec_shows_error(report, chromium, tmp_path):
    """Negative control: a bad field type in the embedded JSON must surface as an error."""
    text = report[1].html.read_text(encoding="utf-8")

    def break_heatmap(m: re.Match) -> str:
        spec = json.loads(m.group(3))
        if m.group(2) == "logit-lens":
            spec["layer"][1]["encoding"]["color"]["type"] = "not-a-type"
        return m.group(1) + json.dumps(spec).replace("<", "\\u003c") + m.group(4)

    broken = tmp_path / "broken.html"
    broken.write_text(SPEC_RE.sub(break_heatmap, text), encoding="utf-8")
    result = render_in_browser(broken)
    assert result.statuses[0].startswith("error: ")
    assert "field type" in result.statuses[0]
    assert result.statuses[1:] == ["rendered", "rendered"]
    assert result.svg_count == 2


def test_browser_has_no_network(chromium, tmp_path, logit_lens_df):
    """Altair's default HTML loads Vega from a CDN: in our browser it must not render."""
    page = tmp_path / "cdn.html"
    logit_lens_heatmap(logit_lens_df).save(page)
    assert "cdn.jsdelivr.net" in page.read_text(encoding="utf-8")
    result = render_in_browser(page)
    assert result.svg_count == 0


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pngs_are_valid(report):
    paths = report[1]
    assert [p.name for p in paths.pngs] == [
        "logit-lens.png",
        "residual-norm-per-layer.png",
        "tool-timings.png",
    ]
    # The heatmap: 5 cells of 64 px across and 3 of 26 px down, plus axes and legend.
    width, height = _png_size(paths.pngs[0])
    assert PNG_SCALE * 5 * 64 < width < PNG_SCALE * 5 * 64 * 2
    assert PNG_SCALE * 3 * 26 < height < PNG_SCALE * 3 * 26 * 3
    for png in paths.pngs[1:]:
        assert min(_png_size(png)) > 50


def test_pngs_match_browser_render(report, rendered):
    # vl-convert's PNG is the same view Chromium drew, at PNG_SCALE pixels per CSS pixel.
    for png, (svg_w, svg_h) in zip(report[1].pngs, rendered.svg_sizes, strict=True):
        width, height = _png_size(png)
        assert abs(width - PNG_SCALE * svg_w) <= 0.03 * width
        assert abs(height - PNG_SCALE * svg_h) <= 0.03 * height


def test_many_rows_are_embedded_not_refused(tmp_path, caplog):
    n = 6000  # over Altair's 5000-row default limit
    df = pl.DataFrame({"layer": list(range(n)), "norm": [float(i % 7) for i in range(n)]})
    chart = bar_chart(df, x="layer:O", y="norm")
    paths = write_report([("Big", chart)], tmp_path, title="big", png=False)
    (spec,) = _specs(paths.html.read_text(encoding="utf-8")).values()
    (values,) = spec["datasets"].values()
    assert len(values) == n and values[-1] == {"layer": n - 1, "norm": float((n - 1) % 7)}
    assert paths.pngs == []
    assert "aggregate in SQL" in caplog.text
    with pytest.raises(alt.MaxRowsError):  # the global limit is back in place afterwards
        chart.to_dict()


def test_duplicate_headings_get_distinct_files(tmp_path):
    df = pl.DataFrame({"x": ["a", "b"], "y": [1.0, 2.0]})
    charts = [
        ("Same: name", bar_chart(df, x="x", y="y")),
        ("Same name", bar_chart(df, x="x", y="y")),
    ]
    paths = write_report(charts, tmp_path, title="dup")
    assert [p.name for p in paths.pngs] == ["same-name.png", "same-name-2.png"]
    assert all(_png_size(p)[0] > 0 for p in paths.pngs)
