#!/usr/bin/env python3
"""Render the help of both command lines (`site-agent`, `coordinator`) into docs/cli.md.

    .venv/bin/python scripts/cli_reference.py           # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check   # exit 1 when docs/cli.md is out of date

The page is click's own ``--help`` text of every group and command, walked recursively at a
fixed width, so it says exactly what ``--help`` says; ``tests/test_cli_reference.py`` fails
when a CLI changes and the page was not regenerated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
WIDTH = 120  # fixed, so the page does not depend on the terminal that generated it

HEADER = """# CLI reference

Generated from the CLIs' own `--help` by `.venv/bin/python scripts/cli_reference.py`; do not edit by hand
(`tests/test_cli_reference.py` checks that this page matches the code). Every verb also answers `--help`
(or `-h`) in the terminal.
"""


def _walk(cmd: click.Command, name: str, parent: click.Context | None) -> list[tuple[str, str]]:
    """Help text of ``cmd`` and, for a group, of every sub-command, depth first in name order.

    Args:
        cmd: the click command or group.
        name: the name it is invoked as (the program name for the root).
        parent: the parent context, None for the root.

    Returns:
        (full command path, help text) pairs.
    """
    settings = {"terminal_width": WIDTH, "max_content_width": WIDTH, **cmd.context_settings}  # as make_context applies them
    ctx = click.Context(cmd, info_name=name, parent=parent, **settings)
    pages = [(ctx.command_path, cmd.get_help(ctx))]
    if isinstance(cmd, click.Group):
        for sub_name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                pages += _walk(sub, sub_name, ctx)
    return pages


def render() -> str:
    """The whole reference page as Markdown.

    Returns:
        The text of docs/cli.md.
    """
    sys.path.insert(0, str(ROOT))
    from coordinator.cli import cli as coordinator_cli
    from site_agent.cli import cli as site_cli

    parts = [HEADER]
    for prog, group in (("site-agent", site_cli), ("coordinator", coordinator_cli)):
        pages = _walk(group, prog, None)
        parts.append(f"## {prog}\n\n" + "".join(f"- [`{path}`](#{_anchor(path)})\n" for path, _ in pages))
        for path, text in pages:
            parts.append(f"### `{path}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def _anchor(path: str) -> str:
    """GitHub's anchor for a ``### `path` `` heading: lower case, spaces to dashes, punctuation dropped."""
    return "".join(c for c in path.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv: list[str] | None = None) -> int:
    """Write docs/cli.md, or with ``--check`` compare it with the CLIs.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 1 when ``--check`` finds the page out of date.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when they differ")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
