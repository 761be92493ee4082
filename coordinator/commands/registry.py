"""`coordinator registry`: list (and verify) the artifacts published to the coordinator's registry."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from coordinator.commands.common import console, home_option
from coordinator.registry import Registry


@click.command()
@home_option
@click.option("--kind", default=None, help="Only artifacts of this kind (factory, segmentation-branch, model).")
@click.option("--verify", is_flag=True, help="Recompute every file's checksum.")
@click.option("--json", "as_json", is_flag=True)
def registry(home, kind, verify, as_json) -> None:
    """Artifacts published to this coordinator's registry (weights and configs only)."""
    reg = Registry(Path(home))
    rows = reg.list(kind)
    if verify:
        rows = [reg.verify(r["kind"], r["name"], r["version"]) for r in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("kind", "name", "version", "created", "files", "MB")
    for r in rows:
        size = sum(f["bytes"] for f in r["files"].values()) / 1e6
        table.add_row(r["kind"], r["name"], r["version"], r["created"], ", ".join(sorted(r["files"])), f"{size:.1f}")
    console.print(table if rows else "the registry is empty")


@click.command()
@home_option
@click.argument("run")
@click.option(
    "--model", "which", default="best", show_default=True, help="Which global model: best (selected on the sites' validation cases), last, or 'round N'."
)
@click.option("--name", default=None, help="Package name in the registry (default: the spec's name); each publish adds a version.")
@click.option("--description", default="", help="One line for the model card and the MONAI bundle metadata.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also write the package folder here (a new folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the registry record as JSON.")
def publish(home, run, which, name, description, out, as_json) -> None:
    """Publish RUN's global model as a versioned model package (kind model) that sites pull and run.

    The package holds the weights (safetensors), the label schema, the preprocessing and
    inference settings, provenance and a model card, and is a MONAI bundle too."""
    from coordinator.publish import publish_model  # deferred: torch

    record = publish_model(Path(home), run, model=which, name=name, description=description, out=out)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    meta = record.get("meta") or {}
    click.echo(f"{record['kind']} {record['name']} {record['version']}: {meta.get('model')} of run {meta.get('run_id')}")
    click.echo(f"classes: {', '.join(meta.get('classes') or [])}")
    click.echo(record["path"])


@click.command("site-evaluations")
@home_option
@click.argument("name")
@click.option("--version", default=None, help="One version (vNNNN); default: every version.")
@click.option("--json", "as_json", is_flag=True)
def site_evaluations(home, name, version, as_json) -> None:
    """What sites sent about model package NAME (`site-agent evaluate --send`): per-class means and counts on their own cases."""
    from coordinator.model_evaluations import read_evaluations

    rows = read_evaluations(Path(home), name, version)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "site", "modality", "cases", "class", "Dice", "HD95 mm", "NSD", "n")
    for r in rows:
        for cls, m in r["classes"].items():

            def val(metric: str, digits: int = 3, m: dict = m) -> str:
                v = (m.get(metric) or {}).get("mean")
                return "-" if v is None else f"{v:.{digits}f}"

            table.add_row(
                r["model"], r["site"], r["modality"], str(r["cases"]), cls, val("dice"), val("hd95", 1), val("nsd"), str((m.get("dice") or {}).get("n", 0))
            )
    console.print(table if rows else f"no site has sent an evaluation of model {name}")


@click.group()
def atlas() -> None:
    """FedSR atlases: the one labelled image every site of a FedSR run registers to its scans."""


@atlas.command("publish")
@home_option
@click.option("--name", required=True, help="The atlas's registry name (each publish adds a version).")
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The atlas image (NIfTI).")
@click.option("--labels", "label_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Its labels (NIfTI, same grid), in the schema's class ids.")  # fmt: skip
@click.option("--schema", required=True, help="The federation's label schema: a built-in name (brain-mri) or a schema file.")
@click.option("--modality", default="MR", show_default=True, help="The image's modality (a rule of the schema).")
@click.option("--source", required=True, help="Where the atlas comes from (e.g. 'VoxelMorph public atlas').")
@click.option("--sharing", required=True, help="Why it may go to every site (e.g. 'public, CC-BY 4.0' or 'consented for research sharing').")
@click.option("--json", "as_json", is_flag=True, help="Print the registry record as JSON.")
def atlas_publish(home, name, image_path, label_path, schema, modality, source, sharing, as_json) -> None:
    """Publish an atlas (image + labels) as kind atlas; prints the plan_args.atlas entry for a FedSR spec."""
    from coordinator.atlas import publish_atlas  # deferred: nibabel, numpy

    record = publish_atlas(Path(home), name, image_path, label_path, schema, modality, source, sharing)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    entry = record["spec"]
    click.echo(f"atlas {entry['name']} {entry['version']} published: {record['path']}")
    click.echo(f"spec: plan_args: {{atlas: {{name: {entry['name']}, version: {entry['version']}, sha256: {entry['sha256']}}}}}")
    click.echo(f"sites: site-agent atlas pull {entry['name']}@{entry['version']}")


@atlas.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
def atlas_list(home, as_json) -> None:
    """Published atlas versions, with the sha256 a spec names."""
    from coordinator.atlas import atlas_spec_entry

    rows = [{**atlas_spec_entry(r), "created": r["created"], "meta": r.get("meta") or {}} for r in Registry(Path(home)).list("atlas")]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("name", "version", "created", "sha256", "source")
    for r in rows:
        table.add_row(r["name"], r["version"], r["created"], r["sha256"], str(r["meta"].get("source", "")))
    console.print(table if rows else "no atlas published")
