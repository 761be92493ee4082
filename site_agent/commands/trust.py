"""`site-agent enroll request|install` and `site-agent trust list|add|remove`: the site's
certificate and the coordinator fingerprints it accepts (`site_agent.trust`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from site_agent import trust as site_trust
from site_agent.commands.common import load_site


@click.group("enroll")
def enroll() -> None:
    """Enrol this site with the coordinator: a key and request here, a certificate from the coordinator's operator."""


@enroll.command("request")
@click.pass_context
def enroll_request(ctx: click.Context) -> None:
    """Write the site's private key (kept here, mode 0600) and a certificate request; send the
    printed .csr file to the coordinator's operator (`coordinator sites enroll --csr FILE`)."""
    site = load_site(ctx)
    path = site_trust.request(site)
    click.echo(str(path))
    click.echo(f"certificate request for site {site.site_name} (node {site_trust.node_id(site)}): send {path} to the coordinator's operator", err=True)


@enroll.command("install")
@click.argument("cert", type=click.Path(dir_okay=False, exists=True))
@click.option("--coordinator-fingerprint", "fingerprint", default=None,
              help="The coordinator's certificate fingerprint (SHA256:...), checked out of band with its operator (`coordinator fingerprint`).")  # fmt: skip
@click.pass_context
def enroll_install(ctx: click.Context, cert: str, fingerprint: str | None) -> None:
    """Install the certificate CERT the coordinator issued for this site, and pin the coordinator."""
    site = load_site(ctx)
    info = site_trust.install(site, Path(cert).read_bytes(), fingerprint)
    click.echo(f"site {info['site']} enrolled (node {info['node_id']}); coordinator pinned to {', '.join(info['pins'])}")


@click.group("trust")
def trust() -> None:
    """The coordinator certificate fingerprints this site accepts (certificate rotation)."""


@trust.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def trust_list(ctx: click.Context, as_json: bool) -> None:
    """Pinned fingerprints, this site's certificate, and what the node last saw."""
    info = site_trust.summary(load_site(ctx))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for pin in info["pins"]:
        click.echo(f"pinned {pin}")
    if info["certificate"]:
        click.echo(f"site certificate {info['certificate']['subject']}: {info['certificate']['validity_line']}")
    if info["unsafe"]:
        click.echo(f"UNSAFE: {info['unsafe']}")
    if info["last"]:
        click.echo(f"node: {info['last']['state']} at {info['last']['time']}: {info['last']['message']}")
    if info["problem"]:
        click.echo(f"not enrolled: {info['problem']}")


@trust.command("add")
@click.argument("fingerprint")
@click.pass_context
def trust_add(ctx: click.Context, fingerprint: str) -> None:
    """Also accept the coordinator certificate FINGERPRINT (before the coordinator rotates; no node restart needed)."""
    pins = site_trust.add_pin(site_trust.TrustFiles.of(load_site(ctx)), fingerprint)
    click.echo(f"pinned: {', '.join(pins)}")


@trust.command("remove")
@click.argument("fingerprint")
@click.pass_context
def trust_remove(ctx: click.Context, fingerprint: str) -> None:
    """Stop accepting FINGERPRINT (after the rotation; the last pin cannot be removed)."""
    site = load_site(ctx)
    pins = site_trust.remove_pin(site_trust.TrustFiles.of(site), fingerprint)
    click.echo(f"pinned: {', '.join(pins)}; restart the node (`site-agent stop && site-agent start`) to drop a connection it holds")
