"""`coordinator site-token issue|revoke|list`: the tokens sites use with the registry."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from coordinator.commands.common import console, home_option
from coordinator.site_tokens import SiteTokens


@click.group("site-token")
def site_token() -> None:
    """Tokens sites use to pull from and push to the registry (coordinator side)."""


@site_token.command("issue")
@click.argument("site")
@home_option
def site_token_issue(site, home) -> None:
    """Issue a token for SITE (replaces its previous one); printed once, only its hash is kept."""
    store = SiteTokens(Path(home))
    token = store.issue(site)
    click.echo(token)  # alone on stdout: `coordinator site-token issue a > token-file` works
    click.echo(
        f"site token for {site}: shown only now ({store.path} keeps its hash). On the site, save it in a "
        "file only the site's user can read (e.g. /srv/fedimg/site-token, mode 0600, or a docker secret "
        "at /run/secrets/site-token) and add to site.yaml:\n"
        "  registry: {url: http://<coordinator>:8750, token_file: /srv/fedimg/site-token}\n"
        "or set FEDIMG_SITE_TOKEN in the site's environment.",
        err=True,
    )


@site_token.command("revoke")
@click.argument("site")
@home_option
def site_token_revoke(site, home) -> None:
    """Revoke SITE's token (it stops working at once)."""
    SiteTokens(Path(home)).revoke(site)
    click.echo(f"revoked the token of {site}")


@site_token.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
def site_token_list(home, as_json) -> None:
    """Sites holding a token, and when it was issued (never the tokens)."""
    rows = SiteTokens(Path(home)).list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("site", "issued")
    for r in rows:
        table.add_row(r["site"], str(r["created"]))
    console.print(table if rows else "no site tokens")
