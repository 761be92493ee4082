"""`coordinator registry`: list (and verify) the artifacts published to the coordinator's registry."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from coordinator.commands.common import console, home_option
from coordinator.registry import Registry


@click.command()
@home_option
@click.option("--kind", default=None, help="Only artifacts of this kind (factory, segmentation-branch).")
@click.option("--verify", is_flag=True, help="Recompute every file's checksum.")
@click.option("--json", "as_json", is_flag=True)
def registry(home, kind, verify, as_json) -> None:
    """Artifacts published to this coordinator's registry (weights and configs only)."""
    reg = Registry(Path(home))
    rows = reg.list(kind)
    if verify:
        rows = [reg.verify(r["kind"], r["name"], r["version"]) for r in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("kind", "name", "version", "created", "files", "MB")
    for r in rows:
        size = sum(f["bytes"] for f in r["files"].values()) / 1e6
        table.add_row(r["kind"], r["name"], r["version"], r["created"], ", ".join(sorted(r["files"])), f"{size:.1f}")
    console.print(table if rows else "the registry is empty")
