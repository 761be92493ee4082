"""Reviewing training plans at a site: short ids, readable names, changes since the last approval.

Everything shown comes from the researcher and is printed through `pipelines.terminal_text.escape_controls`.
How names, ids and diffs are derived: docs/design/site-boundary.md.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pipelines.terminal_text import escape_controls, has_controls
from site_agent.config import SiteConfig
from site_agent.errors import UserError

ID_PREFIX = "training_plan_"
SHORT_ID_LEN = 8
MIN_PREFIX_LEN = 4
STATUSES = ("Pending", "Approved", "Rejected")
_DESCRIPTION = re.compile(r"^fedimg plan (?P<key>\S+) for experiment (?P<experiment>.+)$")
_CLASS = re.compile(r"^class\s+([A-Za-z_]\w*)\s*[(:]", re.MULTILINE)
_FBM_DATE = "%d-%m-%Y %H:%M:%S.%f"


@dataclass
class PlanRecord:
    """One training plan as the node stores it, plus the names derived for review."""

    id: str
    short_id: str
    name: str  # <experiment>/<PlanClass>
    experiment: str
    plan_key: str
    plan_class: str
    researcher_id: str
    status: str
    hash: str
    algorithm: str
    date_registered: str
    date_last_action: str
    notes: str
    description: str
    source: str

    def summary(self) -> dict[str, Any]:
        """The record without its source (for listings and JSON).

        Returns:
            Its fields by name, ``source`` left out.
        """
        out = asdict(self)
        out.pop("source")
        return out


def _uuid_part(plan_id: str) -> str:
    return plan_id[len(ID_PREFIX) :] if plan_id.startswith(ID_PREFIX) else plan_id


def _parse_date(text: str) -> datetime:
    try:
        return datetime.strptime(text, _FBM_DATE)
    except (TypeError, ValueError):
        return datetime.min


def iso_date(text: str) -> str:
    """Fed-BioMed's '05-12-2026 01:17:06.396650' as '2026-12-05 01:17'.

    Args:
        text: a date as the node stores it.

    Returns:
        The ISO form, or the text as is (escaped, cut) when it does not parse.
    """
    when = _parse_date(text)
    return when.strftime("%Y-%m-%d %H:%M") if when != datetime.min else escape_controls(text or "", limit=40)


def short_researcher(researcher_id: str) -> str:
    """``RESEARCHER_e2e83205-...`` -> ``e2e83205`` (enough to tell coordinators apart).

    Args:
        researcher_id: the researcher id a plan came with.

    Returns:
        Its short form, control characters escaped (``?`` when empty).
    """
    rid = escape_controls(researcher_id or "")
    return rid.split("_", 1)[1][:SHORT_ID_LEN] if rid.upper().startswith("RESEARCHER_") else rid[:SHORT_ID_LEN] or "?"


def readable_name(description: str, source: str) -> tuple[str, str, str, str]:
    """The names a plan is shown by, derived from its description and source.

    Args:
        description: the plan's description (``fedimg plan <key> for experiment <name>``).
        source: the plan's source (its last class is the plan class).

    Returns:
        (name, experiment, plan key, plan class), control characters escaped (they are printed).
    """
    match = _DESCRIPTION.match(" ".join(str(description or "").split()))
    experiment = escape_controls(match["experiment"] if match else (" ".join(str(description or "").split()) or "-"), limit=200)
    key = escape_controls(match["key"], limit=100) if match else ""
    classes = _CLASS.findall(source or "")
    plan_class = classes[-1] if classes else (key or "?")  # the plan class comes after its helpers
    return f"{experiment}/{plan_class}", experiment, key, plan_class


def _short_ids(ids: list[str]) -> dict[str, str]:
    """Shortest prefix of each uuid part, at least SHORT_ID_LEN long, unique among ``ids``."""
    parts = {i: _uuid_part(i) for i in ids}
    out = {}
    for i, part in parts.items():
        n = min(SHORT_ID_LEN, len(part))
        while n < len(part) and any(o != i and other.startswith(part[:n]) for o, other in parts.items()):
            n += 1
        out[i] = part[:n]
    return out


def _manager(site: SiteConfig) -> Any:
    # deferred: start-up time (`site-agent --help` imports this module for STATUSES; the node
    # module imports nibabel and Fed-BioMed)
    from site_agent import node

    return node._plan_manager(site)


def load_plans(site: SiteConfig) -> list[PlanRecord]:
    """Every plan of the node's database, oldest first.

    Args:
        site: the site.

    Returns:
        The plans, with their short ids and readable names.

    Raises:
        UserError: no node was created here.
    """
    mgr = _manager(site)
    fulls = []
    for row in mgr.list_training_plans(verbose=False):
        full = mgr.get_training_plan_by_id(row["training_plan_id"], secure=False) or {}
        fulls.append({**row, **full})
    shorts = _short_ids([f["training_plan_id"] for f in fulls])
    out = []
    for f in fulls:
        source = str(f.get("training_plan") or "")
        name, experiment, key, plan_class = readable_name(f.get("description", ""), source)
        out.append(PlanRecord(
            id=f["training_plan_id"], short_id=shorts[f["training_plan_id"]], name=name, experiment=experiment,
            plan_key=key, plan_class=plan_class, researcher_id=str(f.get("researcher_id") or ""),
            status=str(f.get("training_plan_status") or ""), hash=str(f.get("hash") or ""),
            algorithm=str(f.get("algorithm") or ""), date_registered=str(f.get("date_registered") or ""),
            date_last_action=str(f.get("date_last_action") or ""), notes=str(f.get("notes") or ""),
            description=str(f.get("description") or ""), source=source,
        ))  # fmt: skip
    out.sort(key=lambda p: _parse_date(p.date_registered))
    return out


def resolve(plans: list[PlanRecord], ref: str) -> PlanRecord:
    """The plan ``ref`` names: a full id, a short id, or a unique prefix of either.

    Args:
        plans: the node's plans (``load_plans``).
        ref: what the user typed; a trailing ellipsis copied from a truncated table is ignored.

    Returns:
        The one matching plan.

    Raises:
        UserError: no plan matches, the prefix is shorter than MIN_PREFIX_LEN characters,
            or several plans match (they are listed with their short id, name and status).
    """
    text = str(ref).strip().rstrip("….").lower()
    for p in plans:
        if p.id.lower() == text:
            return p
    bare = _uuid_part(text)
    if len(bare) < MIN_PREFIX_LEN:
        raise UserError(f"plan id {ref!r}: give at least {MIN_PREFIX_LEN} characters of the id (see `site-agent plans list`)")
    matches = [p for p in plans if p.id.lower().startswith(text) or _uuid_part(p.id).lower().startswith(bare)]
    if not matches:
        raise UserError(f"no training plan with id {ref!r} on this node (see `site-agent plans list`)")
    if len(matches) > 1:
        listed = "; ".join(f"{p.short_id} {p.name} ({p.status})" for p in matches)
        raise UserError(f"plan id {ref!r} is ambiguous: it matches {len(matches)} plans: {listed}; give more characters")
    return matches[0]


def approved_baseline(plans: list[PlanRecord], plan: PlanRecord) -> tuple[PlanRecord | None, str]:
    """The approved plan to compare ``plan`` with, and how it was chosen.

    The most recently registered approved plan of the same name (other than ``plan``);
    failing that, of the same plan class (another experiment), said so in the second value.

    Args:
        plans: every plan of the node.
        plan: the plan under review.

    Returns:
        (the baseline or None, ``"same name"`` / ``"same plan class"`` / ``""``).
    """
    approved = [p for p in plans if p.status == "Approved" and p.id != plan.id]
    for how, same in (("same name", lambda p: p.name == plan.name), ("same plan class", lambda p: p.plan_class == plan.plan_class)):
        candidates = [p for p in approved if same(p)]
        if candidates:
            return max(candidates, key=lambda p: _parse_date(p.date_registered)), how
    return None, ""


def source_lines(source: str) -> list[str]:
    """The lines of a source, split at ``\n`` only (not at ``\r``, ``\f``, ``\u2028``... as
    ``str.splitlines`` does), so every other control character stays inside its line.

    Args:
        source: a plan's source.

    Returns:
        Its lines, without a last empty one.
    """
    lines = str(source or "").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def source_diff(old: PlanRecord, new: PlanRecord, context: int = 3) -> list[str]:
    """Unified diff lines (no trailing newlines) from ``old``'s source to ``new``'s, raw (escape
    them before printing).

    Args:
        old: the approved baseline.
        new: the plan under review.
        context: lines of context around each change.

    Returns:
        The diff's lines.
    """
    return list(difflib.unified_diff(
        source_lines(old.source), source_lines(new.source),
        fromfile=f"approved {old.short_id} ({old.name})", tofile=f"{new.status.lower() or 'plan'} {new.short_id} ({new.name})",
        n=context, lineterm="",
    ))  # fmt: skip


def change_summary(plans: list[PlanRecord], plan: PlanRecord) -> str:
    """One phrase for listings: 'new', 'identical to X', 'changed from X (+a -b lines)'.

    Args:
        plans: every plan of the node.
        plan: the plan listed.

    Returns:
        The phrase (``-`` for an approved plan with no baseline).
    """
    base, _ = approved_baseline(plans, plan)
    if base is None:
        return "new" if plan.status != "Approved" else "-"
    if base.source == plan.source:
        return f"identical to {base.short_id}"
    diff = source_diff(base, plan, context=0)
    added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
    removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
    return f"changed from {base.short_id} (+{added} -{removed} lines)"


def show_lines(plans: list[PlanRecord], plan: PlanRecord, with_source: bool = True) -> list[str]:
    """What `site-agent plans show` prints: metadata, the changes since the last approved
    plan of the same name, and the full source, every line escaped (`escape_controls`);
    a WARNING first when the source holds control or bidi characters.

    Args:
        plans: every plan of the node.
        plan: the plan shown.
        with_source: include the full source.

    Returns:
        The lines to print.
    """
    e = escape_controls
    lines = []
    if any(has_controls(line) for line in source_lines(plan.source)):
        warning = ("WARNING: this plan's source contains control or bidirectional characters (shown escaped as \\x.. / \\u....): "
                   "they can hide or reorder code on a terminal or in an editor; review those lines with care")  # fmt: skip
        lines.append(warning)
    lines += [
        f"id: {e(plan.id)}",
        f"short id: {e(plan.short_id)}",
        f"name: {e(plan.name)}",
        f"experiment: {e(plan.experiment)}",
        f"plan class: {e(plan.plan_class)}" + (f" (plan {e(plan.plan_key)})" if plan.plan_key else ""),
        f"researcher: {e(plan.researcher_id or '?')}",
        f"status: {e(plan.status)}",
        f"registered: {e(plan.date_registered)}",
        f"last action: {e(plan.date_last_action or '-')}",
        f"notes: {e(plan.notes or '-')}",
        f"hash ({e(plan.algorithm or '?')} of the minified source): {e(plan.hash)}",
    ]
    base, how = approved_baseline(plans, plan)
    if base is None:
        lines.append("--- changes: no approved plan of the same name or class on this node; review the whole source ---")
    elif base.source == plan.source:
        lines.append(f"--- changes: source identical to approved plan {e(base.short_id)} ({e(base.name)}, {how}) ---")
    else:
        lines.append(f"--- changes since approved plan {e(base.short_id)} ({e(base.name)}, {how}, registered {e(base.date_registered)}) ---")
        lines.extend(e(d, keep_tabs=True) for d in source_diff(base, plan))
    if with_source:
        lines.append("--- source ---")
        lines.extend(e(line, keep_tabs=True) for line in source_lines(plan.source))
    if lines[0].startswith("WARNING"):
        lines.append(lines[0])  # again after a long source: the top may have scrolled away
    return lines
