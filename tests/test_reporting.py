"""The shared reporting layer (fedimg_core.reporting): pages, escaping, Markdown, figures."""

from __future__ import annotations

import pytest

from fedimg_core.reporting import Section, Table, cell, figures, render, render_markdown, render_sections

EVIL = "<script>alert('x')</script> & | pipe"


def _page() -> list[Section]:
    table = Table(["site", "liver", "mean"], [[EVIL, 0.5, float("nan")], ["b", None, 1]], "Dice", [("", 1), ("global", 2)])
    return [Section(EVIL, [EVIL], [table, Table(["x"], [], "empty")], [("a.png", EVIL)]), Section("", ["no heading"])]


def test_html_page_escapes_every_value_and_has_one_look():
    page = render_sections(f"title {EVIL}", _page())
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; | pipe" in page  # html.escape, as the reports always wrote it
    assert '<tr><th scope="row">&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; | pipe</th><td>0.500</td><td></td></tr>' in page
    assert '<tr><th colspan="1"></th><th colspan="2">global</th></tr>' in page
    assert "<p>empty: nothing recorded.</p>" in page and "<h2></h2>" not in page
    assert "Content-Security-Policy" in page and "http://" not in page and "https://" not in page
    assert "table { border-collapse: collapse" in page  # the shared stylesheet, inlined


def test_markdown_page_escapes_html_and_pipes():
    md = render_markdown("t", _page())
    assert "<script" not in md and "&lt;script&gt;alert('x')&lt;/script&gt; &amp; \\| pipe" in md
    assert "| site | global: liver | global: mean |\n|:---|---:|---:|\n" in md
    assert "empty: nothing recorded." in md and md.endswith("\n")


def test_templates_autoescape_and_refuse_missing_variables():
    assert "&lt;b&gt;" in render("qc.html.j2", **_qc_context(schema_name="<b>"))
    with pytest.raises(Exception, match="undefined"):
        render("qc.html.j2", title="x")


def _qc_context(**over):
    ctx = dict(
        title="QC report", schema_name="s", schema_version="1", modality="CT", labelled=[], mismatch=False, n_cases=0, n_ok=0,
        n_flagged=0, n_refused=0, flag_totals=[], strip_slices=7, swatches=[], volume_columns=[], rows=[], refused=[],
    )  # fmt: skip
    return {**ctx, **over}


def test_cell():
    assert [cell(None), cell(float("inf")), cell(0.25), cell(3), cell("a")] == ["", "", "0.250", "3", "a"]


def test_figures_are_pngs_without_text_metadata(tmp_path):
    bars = figures.grouped_bars(["a", "b"], [("s", [0.5, None]), ("mean", [0.4, None])], "t", grey=("mean",))
    empty = figures.grouped_bars(["a"], [("s", [None])], "t")
    boxes = figures.boxplots([("liver", [("global", [0.5, 0.7]), ("local", [])])], "t")
    figures.write_png(tmp_path / "lines.png", figures.line_panels([("loss", {"a": [(1, 0.5), (2, 0.4)]})], "round"))
    for data in (bars, empty, boxes, (tmp_path / "lines.png").read_bytes()):
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXt" not in data and b"iTXt" not in data
