"""`site-agent artifacts`: the site's own approval of executable artifacts, by sha256.

A plan's approval covers its source. Files a plan or job is told to load whose loading runs
code (TorchScript key encoders and perceptual networks, pickles) need the site's approval
of their content too: until then they are refused and listed here as pending, with who
asked (plan, run, setting) and where the file came from (path, registry entry). The store
is ``<work_dir>/artifacts/artifacts.json`` (`pipelines.artifact_approval`).

Everything printed that others wrote (registry records, plan arguments, paths) goes
through `pipelines.terminal_text.escape_controls`: a control character in it shows as an
escape and cannot overwrite what staff read; provenance is labelled as the coordinator's
account, which the site cannot verify.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from pipelines.artifact_approval import KINDS, STATUSES, ApprovalStore, ArtifactStoreError, store_dir
from pipelines.terminal_text import escape_controls as _safe
from site_agent import config as site_config
from site_agent.commands import common
from site_agent.errors import UserError


def _store(ctx: click.Context) -> ApprovalStore:
    return ApprovalStore(store_dir(site_config.load(ctx.obj["config_path"]).work_dir))


def _came_from(origin: dict[str, Any]) -> str:
    """Where the file was and the registry entry it came from, escaped for the terminal."""
    reg = origin.get("registry")
    path = _safe(origin.get("path", "?"))
    if isinstance(reg, dict) and reg.get("name"):
        by = f", published by {_safe(reg['published_by'])}" if reg.get("published_by") else ""
        return (f"registry entry {_safe(reg.get('kind', '?'))}/{_safe(reg['name'])} {_safe(reg.get('version', '?'))}{by} "
                f"(according to the coordinator) ({path})")  # fmt: skip
    return path


def _asked_by(origin: dict[str, Any]) -> str:
    """Plan, run, round and setting that asked (the run as the coordinator named it), escaped."""
    parts = [_safe(origin.get("plan_class") or ""), f"run {_safe(origin['run_id'])}" if origin.get("run_id") else "",
             f"round {_safe(origin['round'])}" if origin.get("round") else "", _safe(origin.get("setting") or "")]  # fmt: skip
    return ", ".join(p for p in parts if p) or "?"


def _decision(record: dict[str, Any]) -> str:
    d = record.get("decision") or {}
    if not d:
        return ""
    note = f": {_safe(d['note'])}" if d.get("note") else ""
    return f"{_safe(d.get('status', '?'))} by {_safe(d.get('by', '?'))} at {_safe(d.get('at', '?'))}{note}"


@click.group()
def artifacts() -> None:
    """Approve or reject executable artifacts (TorchScript, pickles) plans and jobs ask to load."""


@artifacts.command("list")
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False), default=None, help="Only artifacts with this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def artifacts_list(ctx: click.Context, status: str | None, as_json: bool) -> None:
    """List the artifacts plans and jobs asked to load, pending ones included."""
    try:
        rows = _store(ctx).records(status)  # click's Choice gives the canonical lower-case value
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
        cells = [str(r.get("sha256", ""))[:16], r.get("status", "?"), ",".join(map(str, r.get("kinds", []))),
                 _asked_by(origin) if last else "", _came_from(origin) if last else "",
                 str(sum(int(q.get("count", 1)) for q in r.get("requests", []))), r.get("last_requested", "")]  # fmt: skip
        table.add_row(*(Text(_safe(c)) for c in cells))  # Text: no rich markup is interpreted in others' text
    common.console.print(table)
    pending = sum(1 for r in rows if r.get("status") == "pending")
    if pending:
        click.echo(f"{pending} pending: review with `site-agent artifacts show SHA`, then `site-agent artifacts approve SHA` or `reject SHA`")


@artifacts.command("show")
@click.argument("sha")
@click.pass_context
def artifacts_show(ctx: click.Context, sha: str) -> None:
    """Show one artifact (SHA: its sha256 or a unique prefix): status, decision, every request."""
    store = _store(ctx)
    try:
        full = store.resolve(sha)
        record = store.get(full)
    except ArtifactStoreError as exc:
        raise UserError(str(exc)) from None
    if record is None:  # a full sha256 resolves to itself, known or not
        raise UserError(f"{full[:12]}...: no artifact with this sha256 in {store.path} (see `site-agent artifacts list`)")
    click.echo(f"sha256: {_safe(record['sha256'])}")
    click.echo(f"status: {_safe(record.get('status', '?'))}")
    click.echo(f"kind: {_safe(', '.join(map(str, record.get('kinds', [])))) or '?'}")
    if record.get("decision"):
        click.echo(f"decision: {_decision(record)}")
    for q in record.get("requests", []):
        origin = q.get("origin", {})
        click.echo(f"- asked by {_asked_by(origin)}; file {_came_from(origin)}; "
                   f"{_safe(q.get('count', 1))}x, {_safe(q.get('first'))} .. {_safe(q.get('last'))}")  # fmt: skip
    click.echo("Loading TorchScript or a pickle runs code with the node's rights (it can read this site's files): "
               "approve only a file whose origin you trust.")  # fmt: skip


def _decide(ctx: click.Context, sha: str, approve: bool, note: str | None, kind: str | None) -> None:
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
def artifacts_approve(ctx: click.Context, sha: str, note: str | None, kind: str | None) -> None:
    """Approve the artifact SHA (sha256 or unique prefix): plans and jobs may load it."""
    _decide(ctx, sha, True, note, kind)


@artifacts.command("reject")
@click.argument("sha")
@click.option("--note", default=None, help="Why it was rejected.")
@click.pass_context
def artifacts_reject(ctx: click.Context, sha: str, note: str | None) -> None:
    """Reject the artifact SHA (sha256 or unique prefix): it is refused, and no longer pending."""
    _decide(ctx, sha, False, note, None)


def echo_plan_artifacts(site: site_config.SiteConfig, plan: dict[str, Any]) -> None:
    """Print, for ``plans show``, the artifacts a plan asked to load, where they came from and
    whether the site approved them (matched by the sha256 of the plan's source).

    Args:
        site: the site (its work folder holds the approval store).
        plan: the plan as the node stores it (``training_plan``: its source).
    """
    source = plan.get("training_plan") or ""
    try:
        rows = ApprovalStore(store_dir(site.work_dir)).for_plan(hashlib.sha256(source.encode("utf-8")).hexdigest())
    except ArtifactStoreError as exc:
        click.echo(f"--- artifacts --- (unavailable: {_safe(exc)})")
        return
    click.echo("--- artifacts this plan asked to load (executable content needs the site's own approval) ---")
    if not rows:
        click.echo("none so far")
        return
    for r in rows:
        for q in r["requests"]:
            origin = q.get("origin", {})
            click.echo(f"{_safe(r['sha256'])}  {_safe(r.get('status', '?'))}  {_safe(q.get('kind'))}  "
                       f"{_safe(origin.get('setting', ''))}  from {_came_from(origin)}")  # fmt: skip
    if any(r.get("status") == "pending" for r in rows):
        click.echo("approve one with `site-agent artifacts approve SHA` (or reject it) after checking where it came from")
