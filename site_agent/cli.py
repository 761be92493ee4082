"""`site-agent`: the hospital-side command line. Thin over site_agent's functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from fedimg_core.logs import show_progress, stderr_console, verbosity_options
from pipelines.terminal_text import escape_controls
from site_agent import config as site_config
from site_agent import plan_review
from site_agent.artifacts_cli import artifacts as _artifacts
from site_agent.artifacts_cli import echo_plan_artifacts
from site_agent.connectivity import assess
from site_agent.errors import UserError, run_cli

# deferred: start-up time (`--help` stays fast): the node, runtime, doctor, preprocessing and
# adaptation modules import Fed-BioMed, torch, MONAI or nibabel, so the commands import them.
console = Console(width=None if sys.stdout.isatty() else 160)
log = logging.getLogger(__name__)


def _site(ctx: click.Context) -> site_config.SiteConfig:
    site = site_config.load(ctx.obj["config_path"])
    log.debug("site config %s: site %s, work dir %s, runtime %s", ctx.obj["config_path"], site.site_name, site.work_dir, site.runtime)
    return site


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar=site_config.CONFIG_ENV,
    default=site_config.DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help=f"Site config file (env {site_config.CONFIG_ENV}).",
)
@verbosity_options
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """Run a hospital site of a fedimg federation: config, datasets, plan approvals, node.

    Progress and log lines go to stderr (-v adds debug lines, -q keeps warnings and errors
    only); results (tables, JSON, paths) go to stdout."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@cli.command()
@click.option("--site-name", required=True, help="Short name of this site (a-z 0-9 _ -).")
@click.option("--coordinator-host", required=True, help="Host name or address of the coordinator.")
@click.option("--coordinator-port", default=50051, show_default=True, type=int, help="Coordinator's Fed-BioMed port.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Folder holding prepared datasets.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False), help="Folder for the node, logs, pid file.")
@click.option("--runtime", type=click.Choice(site_config.RUNTIMES), default="auto", show_default=True)
@click.option("--image", default=site_config.DEFAULT_IMAGE, show_default=True, help="Site image for the docker runtime.")
@click.option("--registry-url", default=None, help="The coordinator's artifact registry, e.g. http://coordinator:8750 (for `adapt`).")
@click.option("--registry-token-file", default=None, type=click.Path(dir_okay=False), help="File holding this site's registry token.")
@click.option("--force", is_flag=True, help="Overwrite an existing site config (the node and its data are kept).")
@click.pass_context
def init(ctx, site_name, coordinator_host, coordinator_port, data_dir, work_dir, runtime, image, registry_url, registry_token_file, force) -> None:
    """Write the site config and create the Fed-BioMed node (plan approval ON, default plans OFF)."""
    from site_agent import node

    path = Path(ctx.obj["config_path"])
    if path.exists() and not force:
        raise UserError(f"{path}: already exists (use --force to overwrite the config; the node is kept)")
    raw = {
        "site_name": site_name,
        "coordinator": {"host": coordinator_host, "port": coordinator_port},
        "data_dir": str(Path(data_dir).resolve()),
        "work_dir": str(Path(work_dir).resolve()),
        "runtime": runtime,
        "docker": {"image": image},
    }
    if registry_url:
        raw["registry"] = {"url": registry_url}
        if registry_token_file:
            raw["registry"]["token_file"] = str(Path(registry_token_file).resolve())
    elif registry_token_file:
        raise UserError("--registry-token-file needs --registry-url")
    site = site_config.validate(raw, "command line")
    site.data_dir.mkdir(parents=True, exist_ok=True)
    site.work_dir.mkdir(parents=True, exist_ok=True)
    node_id = node.create_node(site)
    site.save(path)
    click.echo(f"site {site.site_name}: config {path}, node {node_id} in {site.node_dir}")


# -- datasets ---------------------------------------------------------------------------


@cli.group()
def dataset() -> None:
    """Register, list and remove prepared datasets with the node."""


@dataset.command("add")
@click.argument("path", type=click.Path())
@click.option("--tag", "tags", multiple=True, required=True, help="Tag researchers select the dataset by (repeatable).")
@click.option("--name", default=None, help="Name shown to researchers (default: the dataset's own name).")
@click.option(
    "--allow-unlabelled",
    "--allow-unlabeled",
    "allow_unlabelled",
    is_flag=True,
    help="Register even when some or all cases have no label (e.g. for the data factory, which trains on images only).",
)
@click.option(
    "--allow-suspect-images",
    is_flag=True,
    help="Register even when cases are flagged as probably not images (looks_like_label, ct_values_not_hu; see the QC report).",
)
@click.pass_context
def dataset_add(ctx, path, tags, name, allow_unlabelled, allow_suspect_images) -> None:
    """Register the prepared dataset at PATH (checked: manifest, files, checksums).

    Refused unless told otherwise: cases without a label (--allow-unlabelled) and cases
    whose image QC says is probably not an image (--allow-suspect-images).
    """
    from site_agent import node

    entry = node.add_dataset(_site(ctx), path, list(tags), name=name, allow_unlabelled=allow_unlabelled, allow_suspect_images=allow_suspect_images)
    click.echo(f"registered {entry.dataset_id}: {entry.description} [tags: {', '.join(entry.tags)}]")


@dataset.command("where")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("case_ids", nargs=-1)
@click.option(
    "--case-map",
    "case_map",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The case map, if prepare was given --case-map (default: <PATH>.case-map.json next to the dataset folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dataset_where(path, case_ids, case_map, as_json) -> None:
    """Show the source folder or file of CASE_IDS (all cases when none) of the dataset at PATH.

    Reads the site-local case map `site-agent prepare` keeps next to the dataset folder
    (never inside it, never sent anywhere).
    """
    from preprocessing.prepare import PrepareError, default_case_map, read_case_map

    try:
        cases = read_case_map(case_map or default_case_map(path))
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    unknown = [c for c in case_ids if c not in cases]
    if unknown:
        raise UserError(f"{case_map or default_case_map(path)}: no case {', '.join(unknown)} (cases: {', '.join(sorted(cases)) or 'none'})")
    chosen = {c: cases[c] for c in (case_ids or sorted(cases))}
    if as_json:
        click.echo(json.dumps(chosen, indent=2))
        return
    for case_id, e in chosen.items():
        what = f"DICOM series, {e.get('files')} files, SeriesInstanceUID {e.get('series_uid')}" if e.get("kind") == "dicom" else "NIfTI"
        click.echo(f"{case_id}: {e.get('source')} ({what})" + (f"; label {e['label']}" if e.get("label") else "; no label"))


@dataset.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def dataset_list(ctx, as_json) -> None:
    """List the datasets registered with the node."""
    from site_agent import node

    entries = node.list_datasets(_site(ctx))
    if as_json:
        click.echo(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    table = Table("id", "name", "tags", "description", "path")
    for e in entries:
        table.add_row(e.dataset_id, e.name, ",".join(e.tags), e.description, e.path)
    console.print(table if entries else "no dataset registered")


@dataset.command("remove")
@click.argument("dataset_id")
@click.pass_context
def dataset_remove(ctx, dataset_id) -> None:
    """Unregister DATASET_ID (files on disk are kept)."""
    from site_agent import node

    node.remove_dataset(_site(ctx), dataset_id)
    click.echo(f"removed {dataset_id}")


# -- preprocessing -----------------------------------------------------------------------


class _StageProgress:
    """Rich progress bars on stderr, one per stage (scan, convert, qc); silent when not a TTY
    and under --quiet."""

    LABELS = {"scan": "reading headers", "convert": "converting cases", "qc": "QC report", "deidentify": "de-identifying"}

    def __init__(self):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=False,
            disable=not sys.stderr.isatty() or not show_progress(),
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Prepared dataset folder (created or updated).")
@click.option("--labels", "labels", multiple=True, type=click.Path(path_type=Path), help="Folder or file of label maps (NIfTI or DICOM SEG); repeatable.")
@click.option(
    "--label-map",
    default=None,
    type=click.Path(path_type=Path),
    help="Site label map: local value/segment name -> schema class (needed when there are labels).",
)
@click.option("--schema", "schema_path", default=None, type=click.Path(path_type=Path), help="Federation label schema (default: the built-in abdominal-ct).")
@click.option("--modality", default=None, help="CT, MR, ... (required for NIfTI inputs; filters DICOM series).")
@click.option("--name", default="dataset", show_default=True, help="Dataset name shown to researchers (no patient data!).")
@click.option("--tolerance-mm", default=0.01, show_default=True, type=float, help="Largest distance of a slice from its voxel plane.")
@click.option("--allow-irregular", is_flag=True, help="Convert series with missing slices/irregular spacing with a QC flag instead of refusing.")
@click.option(
    "--unknown-labels",
    type=click.Choice(["error", "ignore"]),
    default="error",
    show_default=True,
    help="Local label values not in the label map: refuse the case, or map to the ignore label.",
)
@click.option("--require-labels", is_flag=True, help="Refuse images that have no label.")
@click.option("--prune", is_flag=True, help="Drop cases of earlier runs whose sources are not given this time.")
@click.option("--no-qc", is_flag=True, help="Skip the QC report (PNG per case + index.html).")
@click.option("--salt-file", default=None, type=click.Path(path_type=Path), help="Secret salt for source hashes (default: <out>/.state/salt, created).")
@click.option(
    "--case-map",
    "case_map",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Site-local file mapping case ids to source folders (default: <out>.case-map.json, next to --out; never inside it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def prepare(
    images,
    out,
    labels,
    label_map,
    schema_path,
    modality,
    name,
    tolerance_mm,
    allow_irregular,
    unknown_labels,
    require_labels,
    prune,
    no_qc,
    salt_file,
    case_map,
    as_json,
) -> None:
    """Convert DICOM series / NIfTI IMAGES (+ labels) into a prepared dataset at --out.

    Exit code 0: every case prepared; 3: some cases refused (the rest are prepared; the
    reasons are printed); 2: nothing prepared (one error line).
    """
    from preprocessing.prepare import PrepareError, PrepareOptions
    from preprocessing.prepare import prepare as run_prepare
    from preprocessing.schema import SchemaError, load_label_map, load_schema

    try:
        schema = load_schema(schema_path)
        lmap = load_label_map(label_map, schema) if label_map is not None else None
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    opts = PrepareOptions(
        name=name,
        modality=modality.upper() if modality else None,
        tolerance_mm=tolerance_mm,
        allow_irregular=allow_irregular,
        unknown_labels=unknown_labels,
        require_labels=require_labels,
        prune=prune,
        qc_report=not no_qc,
    )
    try:
        with _StageProgress() as progress:  # refusals are listed in the table below, with their reasons
            result = run_prepare(list(images), out, schema, lmap, labels=list(labels), options=opts, salt_file=salt_file, progress=progress,
                                 case_map=case_map)  # fmt: skip
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    refused = [o for o in result.outcomes if o.status == "refused"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dataset": str(result.root),
                    "report": str(result.report) if result.report else None,
                    "case_map": str(result.case_map),
                    "notes": result.notes,
                    "cases": [{"case_id": o.case_id, "status": o.status, "flags": o.flags, "reason_code": o.code} for o in result.outcomes],
                },
                indent=2,
            )
        )
    else:
        table = Table("case", "status", "flags / reason")
        for o in sorted(result.outcomes, key=lambda o: (o.case_id or "~", o.display)):
            table.add_row(o.case_id or "-", o.status, ", ".join(o.flags) if o.status != "refused" else f"{o.code}: {o.message}")
        console.print(table)
        for note in result.grouping_notes:
            click.echo(f"grouping: {note}")
        for note in result.notes:
            click.echo(f"note: {note}")
        if result.skipped_files:
            codes: dict[str, int] = {}
            for _, code, _ in result.skipped_files:
                codes[code] = codes.get(code, 0) + 1
            click.echo("skipped files: " + ", ".join(f"{n} {c}" for c, n in sorted(codes.items())))
        ok, flagged, unchanged = result.count("ok"), result.count("flagged"), result.count("unchanged")
        click.echo(f"{ok} ok, {flagged} flagged, {unchanged} unchanged, {len(refused)} refused -> {result.root}")
        if result.report:
            click.echo(f"QC report: {result.report}")
        click.echo(f"case map (site-local, never sent): {result.case_map}; `site-agent dataset where {result.root} CASE_ID`")
    if refused:
        click.echo(f"site-agent: {len(refused)} case(s) refused; see the reasons above", err=True)
        sys.exit(3)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--secret-file",
    required=True,
    type=click.Path(path_type=Path),
    help="Site secret (>= 16 bytes, not world-readable): UIDs and pseudonyms are derived from it.",
)
@click.option("--non-dicom", type=click.Choice(["error", "skip"]), default="error", show_default=True, help="What to do with files that are not DICOM.")
@click.option("--allow-burned-in", is_flag=True, help="Copy images marked BurnedInAnnotation=YES (their pixels may show names).")
def deidentify(src, dst, secret_file, non_dicom, allow_burned_in) -> None:
    """Write de-identified copies of the DICOM files under SRC to DST (PS3.15 Annex E basic profile).

    UIDs are replaced consistently (same input + same secret -> same UID), patients get a
    keyed pseudonym, folder and file names are pseudonymised; geometry and pixels are kept
    byte for byte. DST must not exist (or be empty); it appears only when every file is done.
    """
    from preprocessing.deidentify import DeidentifyError, deidentify_tree, load_secret

    try:
        secret = load_secret(secret_file)
        with _StageProgress() as progress:
            report = deidentify_tree(
                src,
                dst,
                secret,
                progress=lambda d, t: progress("deidentify", d, t),
                non_dicom=non_dicom,
                allow_burned_in_annotation=allow_burned_in,
            )
    except DeidentifyError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"{report.files_out} of {report.files_in} files de-identified -> {dst}")
    for rel, reason in report.skipped:
        click.echo(f"skipped {rel}: {reason}")


# -- training plans ----------------------------------------------------------------------


@cli.group()
def plans() -> None:
    """Review training plans researchers sent, and approve or reject them."""


@plans.command("list")
@click.option("--status", type=click.Choice(plan_review.STATUSES, case_sensitive=False), default=None, help="Filter by status (any case).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (full ids, hashes, dates).")
@click.pass_context
def plans_list(ctx, status, as_json) -> None:
    """List plans: short id (any unique prefix works in show/approve/reject), name
    (experiment/plan class), researcher, status, what changed since the last approved plan
    of the same name, and when it arrived."""
    plans_all = plan_review.load_plans(_site(ctx))
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
        console.print(table)
    else:
        click.echo(f"no {wanted.lower()} training plan" if wanted else "no training plan received yet")


@plans.command("show")
@click.argument("plan_id")
@click.option("--no-source", is_flag=True, help="Leave out the full source (the changes are still shown).")
@click.pass_context
def plans_show(ctx, plan_id, no_source) -> None:
    """Show PLAN_ID (a full id or a unique prefix): metadata, the changes since the last
    approved plan of the same name (unified diff), and the full source code."""
    from site_agent import node

    site = _site(ctx)
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
def plans_approve(ctx, plan_id, note) -> None:
    """Approve PLAN_ID (a full id or a unique prefix): the node will run it."""
    _set_plan_status(ctx, plan_id, approve=True, note=note)


@plans.command("reject")
@click.argument("plan_id")
@click.option("--note", default=None, help="Why it was rejected.")
@click.pass_context
def plans_reject(ctx, plan_id, note) -> None:
    """Reject PLAN_ID (a full id or a unique prefix): the node will refuse it."""
    _set_plan_status(ctx, plan_id, approve=False, note=note)


def _set_plan_status(ctx, plan_id: str, approve: bool, note: str | None) -> None:
    from site_agent import node

    site = _site(ctx)
    plan = plan_review.resolve(plan_review.load_plans(site), plan_id)
    node.set_plan_status(site, plan.id, approve=approve, note=note)
    click.echo(f"{'approved' if approve else 'rejected'} {plan.short_id} {plan.name} ({plan.id})")


# -- lifecycle ---------------------------------------------------------------------------

_runtime_option = click.option("--runtime", type=click.Choice(site_config.RUNTIMES), default=None, help="Override the config's runtime.")


@cli.command()
@_runtime_option
@click.option("--foreground", is_flag=True, help="Run the node in this process (container entrypoint).")
@click.pass_context
def start(ctx, runtime, foreground) -> None:
    """Start the node (it connects out to the coordinator; no inbound port)."""
    from site_agent.runtime import ProcessRuntime, get_runtime

    site = _site(ctx)
    if foreground:
        ProcessRuntime(site).run_foreground()
        return
    st = get_runtime(site, runtime).start()
    click.echo(f"node {'running' if st.running else 'not running'} ({st.runtime}{f', pid {st.pid}' if st.pid else ''}): {st.detail}")
    if st.running:
        click.echo(f"it connects out to {site.coordinator_host}:{site.coordinator_port} within ~15 s; `site-agent status` shows whether it did")


@cli.command()
@_runtime_option
@click.pass_context
def stop(ctx, runtime) -> None:
    """Stop the node cleanly (SIGTERM, then SIGKILL after a timeout)."""
    from site_agent.runtime import get_runtime

    st = get_runtime(_site(ctx), runtime).stop()
    click.echo(f"node stopped ({st.runtime})")


@cli.command()
@_runtime_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-connection", is_flag=True, help="Only whether the node process runs (skip the connection check).")
@click.option("--require-connection", is_flag=True, help="Exit 4 when the node runs but is not connected to the coordinator.")
@click.pass_context
def status(ctx, runtime, as_json, no_connection, require_connection) -> None:
    """Show whether the node runs and whether it is connected to the coordinator (with the
    last contact, the last connection error and a hint). Exit code 0 when running, 3 when
    not (4 with --require-connection when running but not connected)."""
    from site_agent.runtime import get_runtime

    site = _site(ctx)
    rt = get_runtime(site, runtime)
    st = rt.status()
    conn = None
    if st.running and not no_connection:
        pid = st.pid if rt.name == "process" else None  # a container's process is not ours to inspect
        conn = assess(site.coordinator_host, site.coordinator_port, pid, rt.logs(5000), site.node_dir / "log" / "security_audit.log", str(site.path))
    if as_json:
        click.echo(json.dumps({**st.__dict__, "connected": conn.connected if conn else None, "connection": conn.to_dict() if conn else None}))
    else:
        click.echo(f"{'running' if st.running else 'stopped'} ({st.runtime}): {st.detail}")
        if conn is not None:
            state = {True: "connected", False: "NOT CONNECTED"}.get(conn.connected, "connection unknown")
            click.echo(f"coordinator {conn.coordinator}: {state} ({conn.evidence})")
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


@cli.command()
@_runtime_option
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines from the end.")
@click.pass_context
def logs(ctx, runtime, lines) -> None:
    """Print the end of the node's log."""
    from site_agent.runtime import get_runtime

    for line in get_runtime(_site(ctx), runtime).logs(lines):
        click.echo(line)


@cli.command()
@click.option("--min-free-gb", default=5.0, show_default=True, help="Disk space the work dir needs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (each row with its hint).")
@click.pass_context
def doctor(ctx, min_free_gb, as_json) -> None:
    """Preflight checks with a pass/fail table and, for each failing row, what to check or
    do; exit 1 when any check fails."""
    from site_agent.doctor import run_checks

    checks = run_checks(ctx.obj["config_path"], min_free_gb=min_free_gb)
    failed = [c for c in checks if c.ok is False]
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
        sys.exit(1 if failed else 0)
    table = Table("check", "result", "detail")
    for c in checks:
        table.add_row(c.name, {True: "[green]PASS[/green]", False: "[red]FAIL[/red]"}.get(c.ok, "SKIP"), c.detail)
    console.print(table)
    for c in checks:
        if c.ok is not True and c.hint:
            click.echo(f"hint for {c.name}: {c.hint}")  # after the table: hints are sentences, too long for a cell
    click.echo(f"{sum(1 for c in checks if c.ok)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


# -- local domain adaptation -------------------------------------------------------------


class _StepProgress:
    """A rich progress bar for a training job (stderr; silent when not a TTY) that logs a
    loss line every ``every`` logged rows when it is silent, so logs still show progress
    (neither under --quiet)."""

    def __init__(self, title: str, every: int = 10):
        self.tty = sys.stderr.isatty()
        self.progress = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[loss]}"), console=stderr_console(), disable=not self.tty or not show_progress())  # fmt: skip
        self.task = None
        self.every, self.count = every, 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int, row: dict) -> None:
        text = f"loss {row.get('loss', float('nan')):.3f}"
        if self.task is None:
            self.task = self.progress.add_task("", total=total, loss=text)
        self.progress.update(self.task, completed=done, total=total, loss=text)
        self.count += 1
        if not self.tty and (self.count % self.every == 0 or done == total):
            log.info("step %d/%d: %s", done, total, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("loss")))


def _adapt_settings(settings_file, **flags) -> dict:
    raw: dict = {}
    if settings_file:
        try:
            raw = yaml.safe_load(Path(settings_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{settings_file}: cannot read adaptation settings ({' '.join(str(exc).split())})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{settings_file}: expected a mapping of adaptation settings")
    preset = flags.pop("preset", None)
    if preset:
        raw["network"] = {**(raw.get("network") or {}), "preset": preset}
    raw.update({k: v for k, v in flags.items() if v is not None})
    return raw


def _training_options(f):
    for opt in reversed([
        click.option("--steps", type=int, default=None, help="Training steps (default 1000)."),
        click.option("--batch", type=int, default=None, help="Slices per batch (default 8)."),
        click.option("--lr-encoder", type=float, default=None, help="Encoder learning rate (default 5e-4)."),
        click.option("--lr-branch", type=float, default=None, help="Branch learning rate (default 1e-3)."),
        click.option("--seed", type=int, default=None, help="Random seed (default 0)."),
        click.option("--preset", type=click.Choice(["tiny", "paper"]), default=None, help="Encoder/branch sizes (default tiny)."),
        click.option("--settings", "settings_file", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="YAML file of adaptation settings (keys of AdaptSettings); flags override it."),
        click.option("--job", default=None, help="Job name under <work_dir>/adapt/ (default derived from the branch)."),
        click.option("--restart", is_flag=True, help="Start the job again; its old folder is kept aside, not deleted."),
        click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
    ]):  # fmt: skip
        f = opt(f)
    return f


def _print_outcome(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        click.echo(f"{key}: {value}")


@cli.group()
def adapt() -> None:
    """Local domain adaptation on the federation's data factory (no federation round)."""


@adapt.command("source")
@click.option("--dataset", required=True, help="Labelled prepared dataset (path, or relative to data_dir).")
@click.option("--factory", "factory_ref", required=True, help="Factory in the registry: NAME or NAME@vNNNN.")
@click.option("--branch", "branch_name", required=True, help="Name to publish the segmentation branch under.")
@click.option("--no-publish", is_flag=True, help="Train and keep the branch locally without pushing it.")
@_training_options
@click.pass_context
def adapt_source(
    ctx, dataset, factory_ref, branch_name, no_publish, steps, batch, lr_encoder, lr_branch, seed, preset, settings_file, job, restart, as_json
) -> None:
    """Train a source encoder + segmentation branch on this site's labels and publish the branch."""
    from site_agent.adapt import run_source

    site = _site(ctx)
    raw = _adapt_settings(settings_file, steps=steps, batch=batch, lr_encoder=lr_encoder, lr_branch=lr_branch, seed=seed, preset=preset)
    with _StepProgress("source branch") as progress:
        result = run_source(site, dataset, factory_ref, branch_name, raw, job=job, publish=not no_publish, restart=restart,
                            progress=progress)  # fmt: skip
    _print_outcome(result, as_json)


@adapt.command("target")
@click.option("--dataset", required=True, help="This site's prepared dataset (a few labelled cases, the rest may be unlabelled).")
@click.option("--factory", "factory_ref", required=True, help="Factory in the registry: NAME or NAME@vNNNN.")
@click.option("--branch", "branch_ref", required=True, help="Source branch in the registry: NAME or NAME@vNNNN.")
@click.option("--few-shot-volumes", type=int, default=None, help="Labelled volumes to take few-shot slices from (default 3).")
@click.option("--few-shot-slice", default=None, help="Per volume: middle (default), random, or a number of slices.")
@click.option("--few-shot-seed", type=int, default=None, help="Choose the volumes at random with this seed (default: the first ones).")
@click.option("--synthetic", type=int, default=None, help="Synthetic source slices labelled by the source branch (default 512).")
@_training_options
@click.pass_context
def adapt_target(ctx, dataset, factory_ref, branch_ref, few_shot_volumes, few_shot_slice, few_shot_seed, synthetic, steps, batch,
                 lr_encoder, lr_branch, seed, preset, settings_file, job, restart, as_json) -> None:  # fmt: skip
    """Adapt a published source branch to this site's images with a few of its labels."""
    from site_agent.adapt import run_target

    if few_shot_slice is not None and few_shot_slice not in ("middle", "random"):
        try:
            few_shot_slice = int(few_shot_slice)
        except ValueError:
            raise UserError(f"--few-shot-slice: middle, random or a positive number (got {few_shot_slice!r})") from None
    site = _site(ctx)
    raw = _adapt_settings(settings_file, steps=steps, batch=batch, lr_encoder=lr_encoder, lr_branch=lr_branch, seed=seed, preset=preset,
                          few_shot_volumes=few_shot_volumes, few_shot_slice=few_shot_slice, few_shot_seed=few_shot_seed, n_synthetic=synthetic)  # fmt: skip
    with _StepProgress("target adaptation") as progress:
        result = run_target(site, dataset, factory_ref, branch_ref, raw, job=job, restart=restart, progress=progress)
    _print_outcome(result, as_json)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, help="model.pt of an adaptation job, or the job folder.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the label volumes.")
@click.option(
    "--mode",
    type=click.Choice(["average", "target", "source"]),
    default="average",
    show_default=True,
    help="Target models: average of both branches, the target branch, or the source branch on the translation.",
)
@click.option("--modality", default=None, help="CT or MR, for NIfTI inputs (DICOM and prepared datasets know theirs).")
@click.option("--dicom-seg", is_flag=True, help="For DICOM series input, also write a DICOM SEG next to the NIfTI.")
@click.option("--overwrite", is_flag=True, help="Replace output files already in --out (refused otherwise, before anything is written).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def infer(inputs, model_path, out, mode, modality, dicom_seg, overwrite, as_json) -> None:
    """Segment volumes (NIfTI files, DICOM series folders, prepared datasets) with an adapted model.

    Each output is named after its input (<out>/<name>.nii.gz; '.' names the current folder).
    Existing output files are never replaced unless --overwrite is given.
    """
    from site_agent.adapt import run_infer

    p = Path(model_path)
    if p.is_dir():
        p = p / "model.pt"
    rows = run_infer(p, list(inputs), out, mode=mode, dicom_seg=dicom_seg, modality=modality, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['label']}" + (f" + {r['dicom_seg']}" if "dicom_seg" in r else ""))


cli.add_command(_artifacts)  # the group lives in its own module


def main() -> None:
    run_cli(cli, "site-agent")


if __name__ == "__main__":
    main()
