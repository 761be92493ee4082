"""`site-agent models list|pull|show`: the federation's published model packages at this site."""

from __future__ import annotations

import json

import click
from rich.table import Table

from site_agent.commands.common import console, load_site


@click.group()
def models() -> None:
    """Models the federation published (site-agent infer --model NAME runs them)."""


@models.command("list")
@click.option("--local", "local_only", is_flag=True, help="Only the versions pulled to this site (does not ask the registry).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models_list(ctx: click.Context, local_only: bool, as_json: bool) -> None:
    """Published model packages, and which versions this site has pulled."""
    from site_agent.models import list_models

    rows = list_models(load_site(ctx), remote=not local_only)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "version", "pulled", "classes", "model", "run")
    for r in rows:
        table.add_row(
            r["name"], r["version"], "yes" if r["pulled"] else "no", ", ".join(r.get("classes") or []), str(r.get("model") or ""), str(r.get("run_id") or "")
        )
    console.print(table if rows else "no model packages" + (" pulled here" if local_only else " published"))


@models.command("pull")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models_pull(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Pull REF (NAME or NAME@vNNNN): every file checked against its checksum, kept only if the package loads."""
    from site_agent.models import pull_model

    package = pull_model(load_site(ctx), ref)
    if as_json:
        click.echo(json.dumps({"ref": package.ref, "folder": str(package.folder), "classes": package.class_ids}, indent=2))
        return
    click.echo(f"{package.ref}: {', '.join(k for k in package.class_ids if k != 'background')}")
    click.echo(str(package.folder))


@models.command("show")
@click.argument("ref")
@click.pass_context
def models_show(ctx: click.Context, ref: str) -> None:
    """Print the model card of REF (NAME[@vNNNN] or a package folder), after checking every file."""
    from pathlib import Path

    from pipelines.model_package import CARD_FILE
    from site_agent.models import open_model

    package = open_model(None if Path(ref).is_dir() else load_site(ctx), ref)
    click.echo((package.folder / CARD_FILE).read_text(encoding="utf-8"))
