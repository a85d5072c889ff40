"""The run report, built from SQL over a real harvest, renders in a real headless Chromium."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

from arrakis_ray.reports.run_report import build_report


def test_report_renders_offline_with_token_text(harvested, tmp_path, chromium):
    from arrakis_ray.reports.browser import render_in_browser

    _, store, result = harvested
    report = build_report(result.run_dir, seq_id=3, out_dir=tmp_path / "report")
    html = report.html.read_text()
    assert '<script src="http' not in html and "cdn." not in html
    rendered = render_in_browser(report.html)
    assert rendered.errors == []
    assert len(rendered.statuses) >= 2 and set(rendered.statuses) == {"rendered"}
    assert rendered.svg_count >= 2
    tokens = pq.read_table(result.run_dir / "tokens")
    words = tokens.filter(pc.equal(tokens["seq_id"], 3))["token_text"].to_pylist()
    assert all(word.strip() in rendered.dom for word in words[1:4])
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in report.pngs)
