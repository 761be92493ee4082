"""`site-agent atlas pull|list`: the FedSR atlases this site keeps (pulled from the coordinator's registry)."""

from __future__ import annotations

import click
from rich.table import Table

from site_agent.commands.common import console, load_site


@click.group()
def atlas() -> None:
    """FedSR atlases: the one labelled image a FedSR run registers to this site's scans."""


@atlas.command("pull")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def atlas_pull(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Pull REF (NAME or NAME@vNNNN): files checked against the registry's sha256, kept only if the atlas reads."""
    from site_agent.atlas import describe, pull_atlas

    row = pull_atlas(load_site(ctx), ref)
    if as_json:
        click.echo(describe([row]))
        return
    click.echo(f"atlas {row['name']} {row['version']}: {', '.join(row['classes'])}")
    click.echo(f"source: {row['source']}; shared as: {row['sharing']}")
    click.echo(f"sha256 {row['sha256']}")
    click.echo(row["folder"])


@atlas.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def atlas_list(ctx: click.Context, as_json: bool) -> None:
    """The atlas versions pulled to this site, each verified."""
    from site_agent.atlas import describe, list_atlases

    rows = list_atlases(load_site(ctx))
    if as_json:
        click.echo(describe(rows))
        return
    table = Table("name", "version", "sha256", "classes", "source", "problem")
    for r in rows:
        table.add_row(
            r["name"], r["version"], str(r.get("sha256", ""))[:16], ", ".join(r.get("classes", [])), str(r.get("source", "")), str(r.get("problem", ""))
        )
    console.print(table if rows else "no atlas pulled here")
