"""The reporting layer every HTML report is built with: one page model, one look, one figure toolkit.

- `fedimg_core.reporting.pages`: `Table` and `Section` (what a page holds), `render_sections`
  and `render_markdown` (a page of sections as HTML or Markdown), `render` (any template of
  ``templates/`` with autoescaping on) and `cell` (how a number is shown).
- `fedimg_core.reporting.figures`: matplotlib figures on the Agg canvas (no pyplot state)
  and the shared plots (grouped bars, boxplots, line panels, grey image grids), saved as PNG.

The run report, the run comparison, the QC report, the factory report and the adaptation
report all extend ``templates/base.html.j2`` and share ``templates/style.css``.
"""

from fedimg_core.reporting.pages import Section, Table, cell, fixed, render, render_markdown, render_sections

__all__ = ["Section", "Table", "cell", "fixed", "render", "render_markdown", "render_sections"]
