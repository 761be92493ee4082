"""`site-agent dataset add|where|export-nnunet|list|remove`, `prepare`, `deidentify`: the site's data, from
DICOM/NIfTI files to datasets registered with the node."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import TracebackType

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedimg_core.logs import show_progress, stderr_console
from fedimg_core.progress import ProgressLines
from site_agent.commands import common
from site_agent.commands.common import load_site, log
from site_agent.errors import UserError

# deferred: start-up time (`--help` stays fast): site_agent.node and preprocessing import
# nibabel, numpy and pydicom (the node, Fed-BioMed); the commands import them when they run.


@click.group()
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
def dataset_add(ctx: click.Context, path: str, tags: tuple[str, ...], name: str | None, allow_unlabelled: bool, allow_suspect_images: bool) -> None:
    """Register the prepared dataset at PATH (checked: manifest, files, checksums).

    Refused unless told otherwise: cases without a label (--allow-unlabelled) and cases
    whose image QC says is probably not an image (--allow-suspect-images).
    """
    from site_agent import node

    entry = node.add_dataset(load_site(ctx), path, list(tags), name=name, allow_unlabelled=allow_unlabelled, allow_suspect_images=allow_suspect_images)
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
def dataset_where(path: Path, case_ids: tuple[str, ...], case_map: Path | None, as_json: bool) -> None:
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


@dataset.command("export-nnunet")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "raw_root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="nnU-Net's raw folder ($nnUNet_raw); the dataset goes in DatasetNNN_NAME/ inside it.",
)
@click.option("--id", "dataset_id", required=True, type=click.IntRange(1, 999), help="nnU-Net dataset id (1..999, not taken in --out).")
@click.option("--name", default=None, help="Name after the id (default: the dataset's own name).")
@click.option(
    "--classes",
    type=click.Choice(["labelled", "all"]),
    default="labelled",
    show_default=True,
    help="labelled: only the classes this site labels, renumbered 1..K (nnU-Net would learn the others as background); all: every schema class with its schema id.",
)
@click.option(
    "--link",
    is_flag=True,
    help="Hard-link the images instead of copying them (no space used; an image edited under --out then changes the prepared dataset too).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def dataset_export_nnunet(path: Path, raw_root: Path, dataset_id: int, name: str | None, classes: str, link: bool, as_json: bool) -> None:
    """Export the prepared dataset at PATH as an nnU-Net v2 raw dataset.

    Writes DatasetNNN_NAME/ (imagesTr/<case>_0000.nii.gz, labelsTr/, dataset.json) with the
    labelled cases; the schema's ignore label becomes nnU-Net's (highest label value), and
    dataset.json's "fedimg" block maps the exported ids back to the schema's classes. Then:
    nnUNetv2_plan_and_preprocess -d NNN --verify_dataset_integrity.
    """
    from preprocessing.nnunet_export import export_nnunet
    from site_agent.commands.adapt import CaseProgress

    with CaseProgress("exporting", unit="cases") as bar:
        done = export_nnunet(path, raw_root, dataset_id, name=name, classes="all" if classes == "all" else "labelled", link=link, progress=bar)
    if as_json:
        click.echo(
            json.dumps(
                {"folder": str(done.folder), "cases": done.cases, "labels": done.labels, "schema_ids": done.schema_ids, "ignore_voxels": done.ignore_voxels},
                indent=2,
            )
        )
        return
    click.echo(f"wrote {done.folder}: {done.cases} cases, labels {done.labels}")


@dataset.command("qc")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--schema", "schema_path", default=None, type=click.Path(path_type=Path), help="Federation label schema (default: the built-in one the dataset names)."
)
@click.option(
    "--jobs", "-j", type=click.IntRange(min=0), default=1, show_default=True, help="Figures drawn at once, each in its own process; 0: one per CPU core."
)
def dataset_qc(path: Path, schema_path: Path | None, jobs: int) -> None:
    """Write, or bring up to date, the QC report of the prepared dataset at PATH (PNG per case + index.html).

    For a dataset prepared with --no-qc, or to draw the figures of many cases later (e.g. at
    night): figures newer than their case's files are kept, the others drawn.
    """
    from preprocessing.prepare import PrepareError, write_qc_report
    from preprocessing.schema import SchemaError, load_schema

    try:
        schema = load_schema(schema_path) if schema_path is not None else None
        with StageProgress() as progress:
            report = write_qc_report(path, schema, jobs=jobs or _usable_cores(), progress=progress)
    except (PrepareError, SchemaError) as exc:
        raise UserError(str(exc)) from None
    click.echo(f"QC report: {report}")


@dataset.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def dataset_list(ctx: click.Context, as_json: bool) -> None:
    """List the datasets registered with the node."""
    from site_agent import node

    entries = node.list_datasets(load_site(ctx))
    if as_json:
        click.echo(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    table = Table("id", "name", "tags", "description", "path")
    for e in entries:
        table.add_row(e.dataset_id, e.name, ",".join(e.tags), e.description, e.path)
    common.console.print(table if entries else "no dataset registered")


@dataset.command("remove")
@click.argument("dataset_id")
@click.pass_context
def dataset_remove(ctx: click.Context, dataset_id: str) -> None:
    """Unregister DATASET_ID (files on disk are kept)."""
    from site_agent import node

    node.remove_dataset(load_site(ctx), dataset_id)
    click.echo(f"removed {dataset_id}")


def _usable_cores() -> int:
    """The CPU cores this process may run on (`--jobs 0`): its affinity, which a container's CPU set narrows."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


class StageProgress:
    """Progress of a dataset command's stages (scan, convert, qc, deidentify) on stderr: rich
    bars on a terminal; nothing elsewhere yet, nor under --quiet. Called as ``progress(stage, done, total)``.

    `lines` (default off) logs plain lines off a terminal instead (`fedimg_core.progress`): off
    until the commands' tests, which hold a refused input to exactly one stderr line, tell
    progress lines from error lines.
    """

    LABELS = {"scan": "reading headers", "convert": "converting cases", "qc": "QC report", "deidentify": "de-identifying"}
    UNITS = {"scan": "files"}

    def __init__(self, lines: bool = False) -> None:
        self.tty, self.with_lines = sys.stderr.isatty(), lines
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            transient=False,
            disable=not self.tty or not show_progress(),
        )
        self.tasks: dict[str, TaskID] = {}
        self.lines = {unit: ProgressLines(log.info, unit=unit) for unit in ("cases", "files")}

    def __enter__(self) -> StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, stage: str, done: int, total: int) -> None:
        label = self.LABELS.get(stage, stage)
        if not self.tty:
            if show_progress() and self.with_lines:
                self.lines[self.UNITS.get(stage, "cases")](label, done, total)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _pixel_spacing(text: str) -> tuple[float, float]:
    """``--pixel-spacing ROW_MM,COL_MM`` (one value: square pixels) as two positive numbers.

    Raises:
        UserError: not one or two positive numbers.
    """
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(0 < v < 100 for v in values):
        raise UserError(f"--pixel-spacing {text!r}: give the pixel size in mm as ROW_MM,COL_MM (e.g. 0.15,0.15), each above 0 and below 100")
    return values[0], values[1]


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Prepared dataset folder (created or updated).")
@click.option(
    "--labels",
    "labels",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder or file of label maps (NIfTI or DICOM SEG; PNG masks for radiographs); repeatable.",
)
@click.option(
    "--label-map",
    default=None,
    type=click.Path(path_type=Path),
    help="Site label map: local value/segment name -> schema class (needed when there are labels).",
)
@click.option(
    "--reference-labels",
    "reference_labels",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder or file of test-only reference labels (NIfTI or DICOM SEG; classes the site does not train on, used only to score models "
    "on its test cases; never sent); paired like --labels; repeatable.",
)
@click.option(
    "--reference-label-map",
    default=None,
    type=click.Path(path_type=Path),
    help="Label map of the reference labels (same format as --label-map); its classes must differ from --label-map's.",
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
@click.option(
    "--pixel-spacing",
    "pixel_spacing",
    default=None,
    metavar="ROW_MM,COL_MM",
    help="Radiographs (CR, DX) whose header gives no PixelSpacing or ImagerPixelSpacing: the detector's pixel size in mm "
    "(e.g. 0.15,0.15); a header's own spacing is always used first, and the manifest records which was used.",
)
@click.option("--require-labels", is_flag=True, help="Refuse images that have no label.")
@click.option("--prune", is_flag=True, help="Drop cases of earlier runs whose sources are not given this time.")
@click.option("--no-qc", is_flag=True, help="Skip the QC report (PNG per case + index.html); `site-agent dataset qc OUT` writes it later.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Cases converted (and QC figures drawn) at once, each in its own process; 0: one per CPU core. The dataset is byte for byte the same as with 1.",
)
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
    images: tuple[Path, ...],
    out: Path,
    labels: tuple[Path, ...],
    label_map: Path | None,
    reference_labels: tuple[Path, ...],
    reference_label_map: Path | None,
    schema_path: Path | None,
    modality: str | None,
    name: str,
    tolerance_mm: float,
    allow_irregular: bool,
    unknown_labels: str,
    pixel_spacing: str | None,
    require_labels: bool,
    prune: bool,
    no_qc: bool,
    jobs: int,
    salt_file: Path | None,
    case_map: Path | None,
    as_json: bool,
) -> None:
    """Convert DICOM series, radiographs (CR, DX) / NIfTI IMAGES (+ labels) into a prepared dataset at --out.

    Exit code 0: every case prepared; 3: some cases refused (the rest are prepared; the
    reasons are printed); 2: nothing prepared (one error line). A refused reference label
    counts as a refusal; its case is prepared without it.
    """
    from preprocessing.prepare import PrepareError, PrepareOptions
    from preprocessing.prepare import prepare as run_prepare
    from preprocessing.schema import SchemaError, load_label_map, load_schema

    try:
        schema = load_schema(schema_path)
        lmap = load_label_map(label_map, schema) if label_map is not None else None
        ref_map = load_label_map(reference_label_map, schema) if reference_label_map is not None else None
    except SchemaError as exc:
        raise UserError(str(exc)) from None
    spacing = _pixel_spacing(pixel_spacing) if pixel_spacing is not None else None
    opts = PrepareOptions(
        name=name,
        modality=modality.upper() if modality else None,
        tolerance_mm=tolerance_mm,
        allow_irregular=allow_irregular,
        unknown_labels=unknown_labels,
        require_labels=require_labels,
        prune=prune,
        qc_report=not no_qc,
        pixel_spacing=spacing,
        jobs=jobs or _usable_cores(),
    )
    try:
        with StageProgress() as progress:  # refusals are listed in the table below, with their reasons
            result = run_prepare(list(images), out, schema, lmap, labels=list(labels), options=opts, salt_file=salt_file, progress=progress,
                                 case_map=case_map, reference_labels=list(reference_labels), reference_label_map=ref_map)  # fmt: skip
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
                    "cases": [
                        {
                            "case_id": o.case_id,
                            "status": o.status,
                            "flags": o.flags,
                            "reason_code": o.code,
                            **({"reference_label": True} if o.reference else {}),
                        }
                        for o in result.outcomes
                    ],
                },
                indent=2,
            )
        )
    else:
        table = Table("case", "status", "flags / reason")
        for o in sorted(result.outcomes, key=lambda o: (o.case_id or "~", o.display)):
            table.add_row(
                o.case_id or ("reference label" if o.reference else "-"), o.status, ", ".join(o.flags) if o.status != "refused" else f"{o.code}: {o.message}"
            )
        common.console.print(table)
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
        n_ref = sum(o.reference for o in refused)
        click.echo(
            f"{ok} ok, {flagged} flagged, {unchanged} unchanged, {len(refused)} refused"
            + (f" ({n_ref} reference labels)" if n_ref else "")
            + f" -> {result.root}"
        )
        if result.report:
            click.echo(f"QC report: {result.report}")
        click.echo(f"case map (site-local, never sent): {result.case_map}; `site-agent dataset where {result.root} CASE_ID`")
    if refused:
        n_ref = sum(o.reference for o in refused)
        what = (
            f"{len(refused) - n_ref} case(s)" + (f" and {n_ref} reference label(s)" if n_ref else "") if len(refused) > n_ref else f"{n_ref} reference label(s)"
        )
        click.echo(f"site-agent: {what} refused; see the reasons above", err=True)
        sys.exit(3)


@click.command()
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
def deidentify(src: Path, dst: Path, secret_file: Path, non_dicom: str, allow_burned_in: bool) -> None:
    """Write de-identified copies of the DICOM files under SRC to DST (PS3.15 Annex E basic profile).

    UIDs are replaced consistently (same input + same secret -> same UID), patients get a
    keyed pseudonym, folder and file names are pseudonymised; geometry and pixels are kept
    byte for byte. DST must not exist (or be empty); it appears only when every file is done.
    """
    from preprocessing.deidentify import DeidentifyError, deidentify_tree, load_secret

    try:
        secret = load_secret(secret_file)
        with StageProgress() as progress:
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
