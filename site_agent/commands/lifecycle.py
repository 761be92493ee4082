"""`site-agent init|start|stop|status|logs|doctor`: the node's life, from its config to its health."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from site_agent import config as site_config
from site_agent.commands import common
from site_agent.commands.common import load_site
from site_agent.errors import UserError

if TYPE_CHECKING:
    from site_agent.runtime import DockerRuntime, ProcessRuntime

# deferred: start-up time (`--help` stays fast): site_agent.node, .runtime and .doctor import
# nibabel and, when they talk to the node, Fed-BioMed; .connectivity imports psutil and
# cryptography. The commands import them when they run.

_runtime_option = click.option("--runtime", type=click.Choice(site_config.RUNTIMES), default=None, help="Override the config's runtime.")


def _runtime(site: site_config.SiteConfig, override: str | None) -> ProcessRuntime | DockerRuntime:
    from site_agent.runtime import get_runtime

    return get_runtime(site, override)


@click.command()
@click.option("--site-name", required=True, help="Short name of this site (a-z 0-9 _ -).")
@click.option("--coordinator-host", required=True, help="Host name or address of the coordinator.")
@click.option("--coordinator-port", default=50051, show_default=True, type=int, help="Coordinator's Fed-BioMed port.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Folder holding prepared datasets.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False), help="Folder for the node, logs, pid file.")
@click.option("--runtime", type=click.Choice(site_config.RUNTIMES), default="auto", show_default=True)
@click.option("--image", default=site_config.DEFAULT_IMAGE, show_default=True, help="Site image for the docker runtime.")
@click.option("--device", default="auto", show_default=True, callback=common.device_option,
              help="Where the node trains and local jobs run: auto (a GPU when torch sees one), cpu, cuda or cuda:N.")  # fmt: skip
@click.option("--registry-url", default=None, help="The coordinator's artifact registry, e.g. http://coordinator:8750 (for `adapt`).")
@click.option("--registry-token-file", default=None, type=click.Path(dir_okay=False), help="File holding this site's registry token.")
@click.option("--coordinator-fingerprint", "fingerprint", default=None,
              help="The coordinator's certificate fingerprint (SHA256:..., from its operator: `coordinator fingerprint`); the node refuses any other.")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing site config (the node and its data are kept).")
@click.pass_context
def init(
    ctx: click.Context,
    site_name: str,
    coordinator_host: str,
    coordinator_port: int,
    data_dir: str,
    work_dir: str,
    runtime: str,
    image: str,
    device: str,
    registry_url: str | None,
    registry_token_file: str | None,
    fingerprint: str | None,
    force: bool,
) -> None:
    """Write the site config, create the Fed-BioMed node (plan approval ON, default plans OFF) and
    the site's key and certificate request (`site-agent enroll request`); with
    --coordinator-fingerprint, pin the coordinator's certificate. Then install the certificate
    the coordinator issues (`site-agent enroll install`, docs/guide/security.md)."""
    from fedimg_core.tls_pins import parse_pin
    from site_agent import node
    from site_agent import trust as site_trust

    path = Path(ctx.obj["config_path"])
    if path.exists() and not force:
        raise UserError(f"{path}: already exists (use --force to overwrite the config; the node is kept)")
    raw: dict[str, Any] = {
        "site_name": site_name,
        "coordinator": {"host": coordinator_host, "port": coordinator_port},
        "data_dir": str(Path(data_dir).resolve()),
        "work_dir": str(Path(work_dir).resolve()),
        "runtime": runtime,
        "docker": {"image": image},
        "device": device,
    }
    if registry_url:
        raw["registry"] = {"url": registry_url}
        if registry_token_file:
            raw["registry"]["token_file"] = str(Path(registry_token_file).resolve())
    elif registry_token_file:
        raise UserError("--registry-token-file needs --registry-url")
    site = site_config.validate(raw, "command line")
    pin = parse_pin(fingerprint) if fingerprint else None  # a typo fails before anything is written
    site.data_dir.mkdir(parents=True, exist_ok=True)
    site.work_dir.mkdir(parents=True, exist_ok=True)
    node_id = node.create_node(site)
    site.save(path)
    if pin:
        site_trust.add_pin(site_trust.TrustFiles.of(site), pin)
    csr = site_trust.request(site)  # the site's key stays here; the request goes to the coordinator's operator
    click.echo(f"site {site.site_name}: config {path}, node {node_id} in {site.node_dir}")
    click.echo(f"enrolment: send {csr} to the coordinator's operator (`coordinator sites enroll --csr FILE`), then "
               f"`site-agent --config {path} enroll install CERT{'' if pin else ' --coordinator-fingerprint SHA256:...'}`", err=True)  # fmt: skip


@click.command()
@_runtime_option
@click.option("--foreground", is_flag=True, help="Run the node in this process (container entrypoint).")
@click.option(
    "--device",
    default=None,
    callback=common.device_option,
    help="Where this node trains, instead of the config's device: auto, cpu, cuda or cuda:N (the container entrypoint passes cuda:0 for the one card it sees).",
)
@click.pass_context
def start(ctx: click.Context, runtime: str | None, foreground: bool, device: str | None) -> None:
    """Start the node (it connects out to the coordinator; no inbound port)."""
    from site_agent.runtime import require_node
    from site_agent.trust import check_enrolled

    site = load_site(ctx)
    if device is not None:
        site.device = device
    require_node(site)  # enrolment names the node: a site without one is told to init first
    check_enrolled(site)  # any runtime: one line saying how to enrol, before a container is made
    if foreground:
        _runtime(site, "process").run_foreground()  # the container's entrypoint: always the process runtime
        return
    st = _runtime(site, runtime).start()
    click.echo(f"node {'running' if st.running else 'not running'} ({st.runtime}{f', pid {st.pid}' if st.pid else ''}): {st.detail}")
    if st.running:
        click.echo(f"it connects out to {site.coordinator_host}:{site.coordinator_port} within ~15 s; `site-agent status` shows whether it did")


@click.command()
@_runtime_option
@click.pass_context
def stop(ctx: click.Context, runtime: str | None) -> None:
    """Stop the node cleanly (SIGTERM, then SIGKILL after a timeout)."""
    st = _runtime(load_site(ctx), runtime).stop()
    click.echo(f"node stopped ({st.runtime})")


@click.command()
@_runtime_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-connection", is_flag=True, help="Only whether the node process runs (skip the connection check).")
@click.option("--require-connection", is_flag=True, help="Exit 4 when the node runs but is not connected to the coordinator.")
@click.pass_context
def status(ctx: click.Context, runtime: str | None, as_json: bool, no_connection: bool, require_connection: bool) -> None:
    """Show whether the node runs and whether it is connected to the coordinator (with the
    last contact, the last connection error and a hint). Exit code 0 when running, 3 when
    not (4 with --require-connection when running but not connected)."""
    from site_agent.connectivity import assess
    from site_agent.trust import summary

    site = load_site(ctx)
    rt = _runtime(site, runtime)
    st = rt.status()
    trust = summary(site)
    conn = None
    if st.running and not no_connection:
        pid = st.pid if rt.name == "process" else None  # a container's process is not ours to inspect
        last = trust["last"] or {}
        refused = last.get("message") if last.get("state") == "refused" else None
        conn = assess(site.coordinator_host, site.coordinator_port, pid, rt.logs(5000), site.node_dir / "log" / "security_audit.log", str(site.path),
                      refused)  # fmt: skip
    if as_json:
        click.echo(json.dumps({**st.__dict__, "connected": conn.connected if conn else None, "connection": conn.to_dict() if conn else None, "trust": trust}))
    else:
        click.echo(f"{'running' if st.running else 'stopped'} ({st.runtime}): {st.detail}")
        click.echo(f"coordinator trust: {trust_line(trust)}")
        if conn is not None:
            states: dict[bool | None, str] = {True: "connected", False: "NOT CONNECTED"}
            click.echo(f"coordinator {conn.coordinator}: {states.get(conn.connected, 'connection unknown')} ({conn.evidence})")
            contact = conn.last_contact or ("none received yet" if conn.connected else "none since the node started")
            click.echo(f"node started {conn.node_started or '?'}; last message from the coordinator: {contact}")
            if conn.last_error:
                click.echo(f"last connection error: {conn.last_error}")
            if not conn.connected:
                click.echo(f"from here: {conn.reach_detail}")
            if conn.hint:
                click.echo(f"hint: {conn.hint}")
    if not st.running:
        sys.exit(3)
    sys.exit(4 if require_connection and not (conn and conn.connected) else 0)


def trust_line(trust: dict[str, Any]) -> str:
    """One line on the site's enrolment and what the node last saw of the coordinator's certificate.

    Args:
        trust: `site_agent.trust.summary`.

    Returns:
        The line.
    """
    if trust.get("unsafe"):
        return f"UNSAFE: {trust['unsafe']}"
    if not trust["enrolled"]:
        return f"NOT ENROLLED: {trust['problem']}"
    cert = trust.get("certificate") or {}
    if cert.get("validity") in ("expired", "not yet valid"):
        return f"SITE CERTIFICATE {str(cert['validity']).upper()}: {cert['validity_line']}; the coordinator refuses it (`site-agent doctor`)"
    last = trust["last"]
    pinned = f"pinned {', '.join(p[:19] + '..' for p in trust['pins'])}"
    if last and last.get("state") == "refused":
        return f"REFUSED at {last['time']}: {last['message']}"
    if trust.get("refused_by_coordinator"):
        refusal = trust["refused_by_coordinator"]
        return f"REFUSED BY THE COORDINATOR at {refusal['time']}: {refusal['reason']} (ask its operator: `coordinator sites list`)"
    expiring = f"; site certificate {cert['validity_line']}" if cert.get("validity") == "expiring" else ""
    if last:
        return f"{pinned}; {last['message']} ({last['time']}){expiring}"
    return f"{pinned}; the node has not connected yet{expiring}"


@click.command()
@_runtime_option
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines from the end.")
@click.pass_context
def logs(ctx: click.Context, runtime: str | None, lines: int) -> None:
    """Print the end of the node's log."""
    for line in _runtime(load_site(ctx), runtime).logs(lines):
        click.echo(line)


@click.command()
@click.option("--min-free-gb", default=5.0, show_default=True, help="Disk space the work dir needs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (each row with its hint).")
@click.pass_context
def doctor(ctx: click.Context, min_free_gb: float, as_json: bool) -> None:
    """Preflight checks with a pass/fail table and, for each failing row, what to check or
    do; exit 1 when any check fails."""
    from site_agent.doctor import run_checks

    checks = run_checks(ctx.obj["config_path"], min_free_gb=min_free_gb)
    failed = [c for c in checks if c.ok is False]
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
        sys.exit(1 if failed else 0)
    results: dict[bool | None, str] = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]"}
    table = Table("check", "result", "detail")
    for c in checks:
        table.add_row(c.name, "[yellow]WARN[/yellow]" if c.warning else results.get(c.ok, "SKIP"), c.detail)
    common.console.print(table)
    for c in checks:
        if (c.ok is not True or c.warning) and c.hint:
            click.echo(f"hint for {c.name}: {c.hint}")  # after the table: hints are sentences, too long for a cell
    click.echo(f"{sum(1 for c in checks if c.ok)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)
