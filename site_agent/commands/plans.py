"""`site-agent plans list|show|approve|reject`: review the training plans researchers sent."""

from __future__ import annotations

import json

import click
from rich.table import Table
from rich.text import Text

from pipelines.terminal_text import escape_controls
from site_agent import plan_review
from site_agent.commands import common
from site_agent.commands.artifacts import echo_plan_artifacts
from site_agent.commands.common import load_site

# deferred: start-up time (`--help` stays fast): site_agent.node imports nibabel and talks to
# Fed-BioMed; the commands import it when they run.


@click.group()
def plans() -> None:
    """Review training plans researchers sent, and approve or reject them."""


@plans.command("list")
@click.option("--status", type=click.Choice(plan_review.STATUSES, case_sensitive=False), default=None, help="Filter by status (any case).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (full ids, hashes, dates).")
@click.pass_context
def plans_list(ctx: click.Context, status: str | None, as_json: bool) -> None:
    """List plans: short id (any unique prefix works in show/approve/reject), name
    (experiment/plan class), researcher, status, what changed since the last approved plan
    of the same name, and when it arrived."""
    plans_all = plan_review.load_plans(load_site(ctx))
    wanted = status  # click's Choice gives the canonical spelling ("Pending") whatever the case typed
    rows = [p for p in plans_all if wanted is None or p.status == wanted]
    if as_json:
        click.echo(json.dumps([{**p.summary(), "changes": plan_review.change_summary(plans_all, p)} for p in rows], indent=2))
        return
    table = Table("id", "name", "researcher", "status", "changes since approved", "registered", "hash")
    table.columns[0].no_wrap = True  # an id must never be cut: it is what staff type next
    table.columns[0].min_width = plan_review.SHORT_ID_LEN
    for column in (table.columns[1], table.columns[6]):
        column.overflow = "fold"  # wrap a long name or hash in a narrow terminal rather than cut it
    for p in rows:
        # Text cells: a researcher's plan name is shown as written, never read as rich markup.
        cells = (p.short_id, p.name, plan_review.short_researcher(p.researcher_id), p.status,
                 plan_review.change_summary(plans_all, p), plan_review.iso_date(p.date_registered), p.hash[:16])  # fmt: skip
        table.add_row(*(Text(escape_controls(str(cell))) for cell in cells))
    if rows:
        common.console.print(table)
    else:
        click.echo(f"no {wanted.lower()} training plan" if wanted else "no training plan received yet")


@plans.command("show")
@click.argument("plan_id")
@click.option("--no-source", is_flag=True, help="Leave out the full source (the changes are still shown).")
@click.pass_context
def plans_show(ctx: click.Context, plan_id: str, no_source: bool) -> None:
    """Show PLAN_ID (a full id or a unique prefix): metadata, the changes since the last
    approved plan of the same name (unified diff), and the full source code."""
    from site_agent import node

    site = load_site(ctx)
    plans_all = plan_review.load_plans(site)
    plan = plan_review.resolve(plans_all, plan_id)
    for line in plan_review.show_lines(plans_all, plan, with_source=not no_source):
        click.echo(line)
    full = node.show_plan(site, plan.id)
    echo_plan_artifacts(site, full)


@plans.command("approve")
@click.argument("plan_id")
@click.option("--note", default=None, help="Why it was approved (kept in the node's records).")
@click.pass_context
def plans_approve(ctx: click.Context, plan_id: str, note: str | None) -> None:
    """Approve PLAN_ID (a full id or a unique prefix): the node will run it."""
    _set_plan_status(ctx, plan_id, approve=True, note=note)


@plans.command("reject")
@click.argument("plan_id")
@click.option("--note", default=None, help="Why it was rejected.")
@click.pass_context
def plans_reject(ctx: click.Context, plan_id: str, note: str | None) -> None:
    """Reject PLAN_ID (a full id or a unique prefix): the node will refuse it."""
    _set_plan_status(ctx, plan_id, approve=False, note=note)


def _set_plan_status(ctx: click.Context, plan_id: str, approve: bool, note: str | None) -> None:
    from site_agent import node

    site = load_site(ctx)
    plan = plan_review.resolve(plan_review.load_plans(site), plan_id)
    node.set_plan_status(site, plan.id, approve=approve, note=note)
    click.echo(f"{'approved' if approve else 'rejected'} {plan.short_id} {plan.name} ({plan.id})")
