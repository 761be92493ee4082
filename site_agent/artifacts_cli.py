"""`site-agent artifacts`: the site's own approval of executable artifacts, by sha256.

A plan's approval covers its source. Files a plan or job is told to load whose loading runs
code (TorchScript key encoders and perceptual networks, pickles) need the site's approval
of their content too: until then they are refused and listed here as pending, with who
asked (plan, run, setting) and where the file came from (path, registry entry). The store
is ``<work_dir>/artifacts/artifacts.json`` (`pipelines.artifact_approval`).
"""

from __future__ import annotations

import hashlib
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from pipelines.artifact_approval import KINDS, STATUSES, ApprovalStore, ArtifactStoreError, store_dir
from site_agent.errors import UserError

console = Console(width=None if sys.stdout.isatty() else 160)


def _store(ctx: click.Context) -> ApprovalStore:
    from site_agent import config as site_config

    return ApprovalStore(store_dir(site_config.load(ctx.obj["config_path"]).work_dir))


def _came_from(origin: dict) -> str:
    reg = origin.get("registry")
    if isinstance(reg, dict) and reg.get("name"):
        by = f", published by {reg['published_by']}" if reg.get("published_by") else ""
        return f"registry {reg.get('kind', '?')}/{reg['name']} {reg.get('version', '?')}{by} ({origin.get('path', '?')})"
    return str(origin.get("path", "?"))


def _asked_by(origin: dict) -> str:
    parts = [origin.get("plan_class") or "", f"run {origin['run_id']}" if origin.get("run_id") else "",
             f"round {origin['round']}" if origin.get("round") else "", origin.get("setting") or ""]  # fmt: skip
    return ", ".join(p for p in parts if p) or "?"


def _decision(record: dict) -> str:
    d = record.get("decision") or {}
    if not d:
        return ""
    note = f": {d['note']}" if d.get("note") else ""
    return f"{d.get('status', '?')} by {d.get('by', '?')} at {d.get('at', '?')}{note}"


@click.group()
def artifacts() -> None:
    """Approve or reject executable artifacts (TorchScript, pickles) plans and jobs ask to load."""


@artifacts.command("list")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False), default=None, help="Only artifacts with this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def artifacts_list(ctx, status, as_json) -> None:
    """List the artifacts plans and jobs asked to load, pending ones included."""
    try:
        rows = _store(ctx).records(status.lower() if status else None)
    except ArtifactStoreError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no artifact requested or approved yet")
        return
    table = Table("sha256", "status", "kind", "asked by (latest)", "came from (latest)", "requests", "last requested")
    for r in rows:
        last = (r.get("requests") or [{}])[-1]
        origin = last.get("origin", {})
        table.add_row(r["sha256"][:16], r.get("status", "?"), ",".join(r.get("kinds", [])), _asked_by(origin) if last else "",
                      _came_from(origin) if last else "", str(sum(int(q.get("count", 1)) for q in r.get("requests", []))),
                      str(r.get("last_requested", "")))  # fmt: skip
    console.print(table)
    pending = sum(1 for r in rows if r.get("status") == "pending")
    if pending:
        click.echo(f"{pending} pending: review with `site-agent artifacts show SHA`, then `site-agent artifacts approve SHA` or `reject SHA`")


@artifacts.command("show")
@click.argument("sha")
@click.pass_context
def artifacts_show(ctx, sha) -> None:
    """Show one artifact (SHA: its sha256 or a unique prefix): status, decision, every request."""
    store = _store(ctx)
    try:
        record = store.get(store.resolve(sha))
    except ArtifactStoreError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"sha256: {record['sha256']}")
    click.echo(f"status: {record.get('status', '?')}")
    click.echo(f"kind: {', '.join(record.get('kinds', [])) or '?'}")
    if record.get("decision"):
        click.echo(f"decision: {_decision(record)}")
    for q in record.get("requests", []):
        origin = q.get("origin", {})
        click.echo(f"- asked by {_asked_by(origin)}; file {_came_from(origin)}; {q.get('count', 1)}x, {q.get('first')} .. {q.get('last')}")
    click.echo("Loading TorchScript or a pickle runs code with the node's rights (it can read this site's files): "
               "approve only a file whose origin you trust.")  # fmt: skip


def _decide(ctx, sha: str, approve: bool, note: str | None, kind: str | None) -> None:
    store = _store(ctx)
    try:
        full = store.resolve(sha)
        if store.get(full) is None and approve and kind is None:
            raise UserError(f"{full[:12]}...: nothing asked for this artifact yet; to approve it ahead, say what it is with --kind ({'|'.join(KINDS)})")
        record = store.decide(full, approve, note=note, kind=kind)
    except ArtifactStoreError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"{record['status']} {full}")


@artifacts.command("approve")
@click.argument("sha")
@click.option("--note", default=None, help="Why it was approved (kept in the store).")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="What it is, to approve an artifact nothing has asked for yet.")
@click.pass_context
def artifacts_approve(ctx, sha, note, kind) -> None:
    """Approve the artifact SHA (sha256 or unique prefix): plans and jobs may load it."""
    _decide(ctx, sha, True, note, kind)


@artifacts.command("reject")
@click.argument("sha")
@click.option("--note", default=None, help="Why it was rejected.")
@click.pass_context
def artifacts_reject(ctx, sha, note) -> None:
    """Reject the artifact SHA (sha256 or unique prefix): it is refused, and no longer pending."""
    _decide(ctx, sha, False, note, None)


def echo_plan_artifacts(site, plan: dict) -> None:
    """For ``plans show``: the artifacts this plan asked to load, where they came from and
    whether the site approved them (matched by the sha256 of the plan's source)."""
    source = plan.get("training_plan") or ""
    try:
        rows = ApprovalStore(store_dir(site.work_dir)).for_plan(hashlib.sha256(source.encode("utf-8")).hexdigest())
    except ArtifactStoreError as exc:
        click.echo(f"--- artifacts --- (unavailable: {exc})")
        return
    click.echo("--- artifacts this plan asked to load (executable content needs the site's own approval) ---")
    if not rows:
        click.echo("none so far")
        return
    for r in rows:
        for q in r["requests"]:
            origin = q.get("origin", {})
            click.echo(f"{r['sha256']}  {r.get('status', '?')}  {q.get('kind')}  {origin.get('setting', '')}  from {_came_from(origin)}")
    if any(r.get("status") == "pending" for r in rows):
        click.echo("approve one with `site-agent artifacts approve SHA` (or reject it) after checking where it came from")
