"""`coordinator fingerprint`, `coordinator certificate rotate`, `coordinator sites enroll|list|revoke`:
the certificate sites pin, and which sites may join (mutual TLS; `coordinator.pki`)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click
from rich.table import Table

from coordinator.commands.common import console, home_option
from coordinator.pki import CoordinatorPKI
from fedimg_core.errors import UserError

_public_host = click.option(
    "--public-host", envvar="FEDIMG_PUBLIC_HOST", default=None, help="Name sites dial (put in a new certificate; default: localhost, or the current one's)."
)


@click.command("fingerprint")
@home_option
@_public_host
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (fingerprint, names, researcher id).")
def fingerprint(home: str, public_host: str | None, as_json: bool) -> None:
    """Print the fingerprint of the coordinator's TLS certificate (created if missing, no server
    started); read it to each site's staff out of band: they pin it at enrolment."""
    pki = CoordinatorPKI(Path(home))
    created = pki.ensure(public_host)
    if as_json:
        click.echo(json.dumps(pki.status(), indent=2))
        return
    click.echo(pki.fingerprint())  # alone on stdout: `coordinator fingerprint > pin` works
    click.echo(f"{'created' if created else 'certificate'} {pki.server_cert}, valid for {', '.join(pki.server_names())}", err=True)


@click.group("certificate")
def certificate() -> None:
    """The coordinator's TLS server certificate (what sites pin)."""


@certificate.command("rotate")
@home_option
@_public_host
@click.option("--drop-old-names", is_flag=True, help="Do not keep the current certificate's names (default: kept, for sites still dialling them).")
def certificate_rotate(home: str, public_host: str | None, drop_old_names: bool) -> None:
    """Replace the server key and certificate (a new public host, a suspected key leak, expiry).

    Sites refuse a certificate they do not pin. The procedure (docs/guide/security.md): rotate (a
    running coordinator keeps serving the old certificate until it restarts), give every site the
    new fingerprint (`site-agent trust add`), restart the coordinator, then remove the old pin at
    each site. The new certificate keeps the current one's names (unless --drop-old-names), so
    sites still dialling an old host name keep working while they change it. Site certificates
    stay valid."""
    pki = CoordinatorPKI(Path(home))
    old = pki.fingerprint() if pki.exists() else None
    new = pki.rotate(public_host, keep_names=not drop_old_names)
    click.echo(new)
    click.echo(
        f"rotated {pki.server_cert} (was {old or 'none'}), valid for {', '.join(pki.server_names())}; give every site the new fingerprint "
        "(`site-agent trust add`), restart the coordinator to serve it, then remove the old pin at every site (`site-agent trust remove`)",
        err=True,
    )


@click.group("sites")
def sites() -> None:
    """Sites enrolled for mutual TLS: only they join and receive anything."""


@sites.command("enroll")
@click.option("--csr", "csr_path", required=True, type=click.Path(dir_okay=False, exists=True), help="The site's request (`site-agent enroll request`).")
@click.option("--site", default=None, help="The site's name (must match the request's; default: the request's).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Where to write the certificate (default: <site>.crt here).")
@click.option("--replace", is_flag=True, help="Replace an enrolled site whose node id differs (another node takes the site's name).")
@home_option
def sites_enroll(csr_path: str, site: str | None, out: str | None, replace: bool, home: str) -> None:
    """Sign a site's certificate request with the site CA and enrol the site (a new enrolment of
    the same site and node replaces its previous certificate; another node for an enrolled site
    needs --replace)."""
    pki = CoordinatorPKI(Path(home))
    try:
        csr = Path(csr_path).read_bytes()
    except OSError as exc:
        raise UserError(f"{csr_path}: cannot read ({exc.strerror or exc})") from None
    pem, record = pki.sign_csr(csr, site, replace=replace)
    target = Path(out or f"{record.site}.crt")
    target.write_bytes(pem)
    click.echo(str(target))
    old = pki.replaced
    if old is not None:
        click.echo(
            f"replaced site {record.site}: node {old.node_id} -> {record.node_id}, certificate {old.sha256} -> {record.sha256} "
            f"(the old certificate no longer opens anything{'; it was revoked at ' + old.revoked if old.revoked else ''})",
            err=True,
        )
    click.echo(
        f"enrolled site {record.site} (node {record.node_id}, certificate {record.sha256}); give the site {target} and the coordinator "
        f"fingerprint {pki.fingerprint()}: `site-agent enroll install {target.name} --coordinator-fingerprint {pki.fingerprint()}`",
        err=True,
    )


@sites.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
def sites_list(home: str, as_json: bool) -> None:
    """Enrolled sites: node id, certificate serial and fingerprint, when enrolled, revoked and when the certificate expires."""
    pki = CoordinatorPKI(Path(home))
    rows = pki.sites.list()
    now = _dt.datetime.now(_dt.timezone.utc)
    expiry = {r.site: pki.site_expiry(r) for r in rows}
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "expires": e.isoformat() if (e := expiry[r.site]) else None} for r in rows], indent=2))
        return
    table = Table("site", "node id", "status", "enrolled", "expires", "certificate")
    for r in rows:
        e = expiry[r.site]
        expires = "unknown" if e is None else e.isoformat() + (" EXPIRED" if e < now else "")
        table.add_row(r.site, r.node_id, f"revoked {r.revoked}" if r.revoked else "enrolled", r.enrolled, expires, r.sha256[:23] + "..")
    console.print(table if rows else "no enrolled sites")


@sites.command("revoke")
@click.argument("site")
@home_option
def sites_revoke(site: str, home: str) -> None:
    """Revoke SITE: a running coordinator refuses it from its next request (no restart)."""
    record = CoordinatorPKI(Path(home)).sites.revoke(site)
    click.echo(f"revoked site {record.site} (node {record.node_id}) at {record.revoked}")
