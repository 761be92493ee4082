"""Report pages: the page model (`Table`, `Section`) and its rendering through Jinja2 templates.

HTML templates are rendered with autoescaping on: the values in these reports come from sites
and researchers (site names, run names, error messages). Markdown is rendered by its own
environment whose every value goes through `markdown_text` (HTML-escaped, pipes escaped).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup

TEMPLATES = "templates"  # inside this package (package data)


@dataclass
class Table:
    """A table of a report page.

    Attributes:
        columns: the header row; empty for a table without one (a table of facts).
        rows: the rows; the first cell of a row is its row header. Cells are shown by `cell`.
        caption: shown above the table; an empty table is shown as "<caption>: nothing recorded.".
        groups: header groups spanning columns, (name, number of columns), above the header row.
    """

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    groups: list[tuple[str, int]] = field(default_factory=list)

    def flat_columns(self) -> list[str]:
        """Column names with their group as prefix (Markdown has a single header row).

        Returns:
            One name per column.
        """
        if not self.groups:
            return list(self.columns)
        prefixes = [g for g, n in self.groups for _ in range(n)]
        return [f"{g}: {c}" if g else c for g, c in zip(prefixes, self.columns)]


@dataclass
class Section:
    """A section of a report page: a heading (none when empty), paragraphs, tables, figures.

    Attributes:
        title: the heading.
        text: paragraphs of plain text.
        tables: the tables, in order.
        images: (file name beside the page, description) of each figure.
    """

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)


def cell(v: object) -> str:
    """How a table cell is shown: floats with 3 decimals; None, NaN and inf as an empty cell.

    Args:
        v: the value.

    Returns:
        The text of the cell.
    """
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else ""
    return str(v)


def fixed(v: float | None, digits: int) -> str:
    """``v`` with ``digits`` decimals, or an empty string for None.

    Args:
        v: the number or None.
        digits: decimals shown.

    Returns:
        The text.
    """
    return "" if v is None else f"{v:.{digits}f}"


def markdown_text(v: object) -> str:
    """A value as Markdown text: HTML-escaped (no raw HTML gets through), pipes escaped
    (they would split a table cell) and on one line.

    Args:
        v: the value.

    Returns:
        The escaped text.
    """
    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def html_text(v: object) -> Markup:
    """A value as HTML text, escaped by `html.escape` (``'`` as ``&#x27;``, as the reports
    always wrote it); markup made by a template (a macro's output) is kept as it is.

    Args:
        v: the value.

    Returns:
        Markup that autoescaping leaves alone.
    """
    return v if isinstance(v, Markup) else Markup(html.escape(str(v), quote=True))


@cache
def _environment(markdown: bool = False) -> jinja2.Environment:
    # Autoescape stays on for HTML; `html_text` as finalize escapes every value first, the
    # standard library's way, so escaped text reads the same as before the templates.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedimg_core.reporting", TEMPLATES),
        autoescape=not markdown,
        finalize=markdown_text if markdown else html_text,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = cell
    return env


def render(template: str, **context: Any) -> str:
    """Render one of this package's HTML templates with autoescaping on.

    Args:
        template: the template's file name in ``templates/`` (e.g. ``"qc.html.j2"``).
        context: the template's variables.

    Returns:
        The page.

    Raises:
        jinja2.TemplateError: no such template, or a variable it uses is missing.
    """
    return _environment().get_template(template).render(**context)


def render_sections(title: str, sections: list[Section]) -> str:
    """A page of sections as a self-contained HTML document (figures referenced by file name).

    Args:
        title: the page title and its first heading.
        sections: the sections, in order.

    Returns:
        The HTML document.
    """
    return render("sections.html.j2", title=title, sections=sections)


def render_markdown(title: str, sections: list[Section]) -> str:
    """The same page as Markdown (tables with one header row, figures as image links).

    Args:
        title: the page title.
        sections: the sections, in order.

    Returns:
        The Markdown text.
    """
    return _environment(markdown=True).get_template("sections.md.j2").render(title=title, sections=sections)
