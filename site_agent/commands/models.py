"""`site-agent models list|pull|show|export` and `site-agent evaluate`: the federation's published model packages at this site."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from site_agent.commands.common import console, device_option, load_site
from site_agent.errors import UserError


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


@models.command("personal")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models_personal(ctx: click.Context, as_json: bool) -> None:
    """This site's personalised FedSR models (global encoder + this site's decoders): --model personal:RUN runs one."""
    from site_agent.models import list_personal_models

    rows = list_personal_models(load_site(ctx))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "round", "method", "atlas", "problem")
    for r in rows:
        table.add_row(r["ref"], str(r.get("round", "")), str(r.get("method", "")), str(r.get("atlas", "")), str(r.get("problem", "")))
    console.print(table if rows else "no personalised model at this site (a FedSR run leaves one per run)")


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
    from pipelines.model_package import CARD_FILE
    from site_agent.models import open_model

    package = open_model(None if Path(ref).is_dir() else load_site(ctx), ref)
    click.echo((package.folder / CARD_FILE).read_text(encoding="utf-8"))


@click.command()
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="A published model (NAME or NAME@vNNNN), a model package folder, or personal:RUN (this site's personalised FedSR model).",
)
@click.option("--dataset", required=True, help="A labelled prepared dataset (its path, absolute or relative to data_dir).")
@click.option("--merge-lesions", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Score organs with their lesions merged in (auto: when the dataset labels an organ but none of its lesions).")  # fmt: skip
@click.option("--worst", type=int, default=3, show_default=True, help="Overlays of this many worst cases in the report (0: none).")
@click.option("--send", is_flag=True, help="Also send the aggregate numbers (per-class means, medians and counts; nothing per case) to the coordinator.")
@click.option("--device", default=None, callback=device_option, help="Where the network runs (auto, cpu, cuda, cuda:N; default: the site's device).")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation record as JSON.")
@click.pass_context
def evaluate(ctx: click.Context, model_ref: str, dataset: str, merge_lesions: str, worst: int, send: bool, device: str | None, as_json: bool) -> None:
    """Score a published model on this site's own labelled cases (no federation round): Dice, HD95, ASSD, NSD, RVD per
    class, and an HTML report with boxplots and the worst cases. Nothing leaves the site unless --send."""
    from site_agent.adapt_common import site_registry
    from site_agent.commands.adapt import CaseProgress
    from site_agent.evaluate_model import evaluate_model, send_aggregate
    from site_agent.models import open_model, place_model

    site = load_site(ctx)
    package = open_model(site, model_ref)
    place_model(package, site, device)
    if send:  # refused before the evaluation runs, not after
        if not package.version:
            raise UserError(f"{package.folder}: --send needs a published model (NAME@vNNNN pulled from the registry), not a package folder")
        site_registry(site)  # the registry section and token are there
    with CaseProgress("evaluating", name_is_stage=True, unit="cases") as bar:
        record = evaluate_model(site, package, dataset, merge_lesions=merge_lesions, worst=worst,
                                progress=lambda step, done, total: bar(done, total, step))  # fmt: skip
    sent = send_aggregate(site, package, record) if send else None
    if as_json:
        click.echo(json.dumps({**record, "sent": sent}, indent=2, allow_nan=False))
        return
    table = Table("class", "Dice", "HD95 mm", "NSD", "RVD", "n", title=f"{record['model']} on {record['dataset']} ({record['cases']} cases)")
    for c in record["classes"]:
        m = record["metrics_mean"].get(c) or {}

        def val(metric: str, digits: int = 3, m: dict = m) -> str:
            v = (m.get(metric) or {}).get("mean")
            return "-" if v is None else f"{v:.{digits}f}"

        table.add_row(c, val("dice"), val("hd95", 1), val("nsd"), val("rvd", 2), str((m.get("dice") or {}).get("n", 0)))
    console.print(table)
    click.echo(f"report: {record['path']}/report/index.html")
    if sent:
        click.echo(f"sent the aggregate numbers to the coordinator ({sent})")


@models.command("export")
@click.argument("ref")
@click.option("--bundle", "target", required=True, type=click.Path(file_okay=False, path_type=Path), help="The MONAI bundle folder to create.")
@click.pass_context
def models_export(ctx: click.Context, ref: str, target: Path) -> None:
    """Write REF (NAME[@vNNNN] or a package folder) as a MONAI bundle in MONAI's standard layout (configs/, models/, docs/),
    after checking every file; `python -m monai.bundle run --bundle_root DIR --config_file DIR/configs/inference.json` runs it."""
    from pipelines.model_bundle import export_bundle
    from site_agent.models import open_model

    package = open_model(None if Path(ref).is_dir() else load_site(ctx), ref)
    try:
        click.echo(str(export_bundle(package.folder, target)))
    except ValueError as exc:
        raise UserError(str(exc)) from None
