"""`site-agent adapt source|target` and `site-agent infer`: local domain adaptation on the
federation's data factory, and segmentation with a published model package or an adapted model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

import click
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedimg_core.logs import show_progress, stderr_console
from fedimg_core.progress import ProgressLines
from site_agent.commands.common import device_option, load_site, load_site_if_present, log
from site_agent.errors import UserError

# deferred: start-up time (`--help` stays fast): site_agent.adapt imports torch, MONAI and
# the adaptation library; the commands import it when they run.

_F = TypeVar("_F", bound=Callable[..., Any])


class StepProgress:
    """A rich progress bar for a training job (stderr; silent when not a TTY) that logs a
    loss line every ``every`` logged rows when it is silent, so logs still show progress
    (neither under --quiet). Called as ``progress(done, total, row)``.

    Args:
        title: the bar's label.
        every: log a loss line every this many rows when the bar is silent.
    """

    def __init__(self, title: str, every: int = 10) -> None:
        self.tty = sys.stderr.isatty()
        self.progress = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[loss]}"), console=stderr_console(), disable=not self.tty or not show_progress())  # fmt: skip
        self.task: TaskID | None = None
        self.every, self.count = every, 0

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, done: int, total: int, row: dict[str, float]) -> None:
        text = f"loss {row.get('loss', float('nan')):.3f}"
        if self.task is None:
            self.task = self.progress.add_task("", total=total, loss=text)
        self.progress.update(self.task, completed=done, total=total, loss=text)
        self.count += 1
        if not self.tty and (self.count % self.every == 0 or done == total):
            log.info("step %d/%d: %s", done, total, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("loss")))


def _adapt_settings(settings_file: str | None, **flags: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {}
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


def _training_options(f: _F) -> _F:
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
        click.option("--device", default=None, callback=device_option,
                     help="Where the job trains (auto, cpu, cuda, cuda:N; default: the site's device). A resumed job may change it."),
        click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
    ]):  # fmt: skip
        f = opt(f)
    return f


def _print_outcome(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        click.echo(f"{key}: {value}")


@click.group()
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
    ctx: click.Context, dataset: str, factory_ref: str, branch_name: str, no_publish: bool, steps: int | None, batch: int | None,
    lr_encoder: float | None, lr_branch: float | None, seed: int | None, preset: str | None, settings_file: str | None, job: str | None,
    restart: bool, device: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Train a source encoder + segmentation branch on this site's labels and publish the branch."""
    from site_agent.adapt import run_source

    site = load_site(ctx)
    raw = _adapt_settings(settings_file, steps=steps, batch=batch, lr_encoder=lr_encoder, lr_branch=lr_branch, seed=seed, preset=preset)
    with StepProgress("source branch") as progress:
        result = run_source(site, dataset, factory_ref, branch_name, raw, job=job, publish=not no_publish, restart=restart,
                            progress=progress, device=device)  # fmt: skip
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
def adapt_target(
    ctx: click.Context, dataset: str, factory_ref: str, branch_ref: str, few_shot_volumes: int | None, few_shot_slice: str | None,
    few_shot_seed: int | None, synthetic: int | None, steps: int | None, batch: int | None, lr_encoder: float | None, lr_branch: float | None,
    seed: int | None, preset: str | None, settings_file: str | None, job: str | None, restart: bool, device: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Adapt a published source branch to this site's images with a few of its labels."""
    from site_agent.adapt import run_target

    few_shot: str | int | None = few_shot_slice
    if few_shot_slice is not None and few_shot_slice not in ("middle", "random"):
        try:
            few_shot = int(few_shot_slice)
        except ValueError:
            raise UserError(f"--few-shot-slice: middle, random or a positive number (got {few_shot_slice!r})") from None
    site = load_site(ctx)
    raw = _adapt_settings(settings_file, steps=steps, batch=batch, lr_encoder=lr_encoder, lr_branch=lr_branch, seed=seed, preset=preset,
                          few_shot_volumes=few_shot_volumes, few_shot_slice=few_shot, few_shot_seed=few_shot_seed, n_synthetic=synthetic)  # fmt: skip
    with StepProgress("target adaptation") as progress:
        result = run_target(site, dataset, factory_ref, branch_ref, raw, job=job, restart=restart, progress=progress, device=device)
    _print_outcome(result, as_json)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_ref", required=True,
              help="A published model (NAME or NAME@vNNNN: pulled from the registry, or this site's copy), a model package folder, "
                   "personal:RUN (this site's personalised FedSR model), or an adaptation job's model.pt / job folder.")  # fmt: skip
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the label volumes.")
@click.option(
    "--mode",
    type=click.Choice(["average", "target", "source"]),
    default="average",
    show_default=True,
    help="Adaptation target models: average of both branches, the target branch, or the source branch on the translation.",
)
@click.option("--modality", default=None, help="CT or MR, for NIfTI inputs (DICOM and prepared datasets know theirs).")
@click.option("--dicom-seg", is_flag=True, help="For DICOM series input, also write a DICOM SEG (referencing the series).")
@click.option("--statistics", is_flag=True, help="Model packages: also write <name>.statistics.json (volume in mL and intensity statistics per class).")
@click.option("--preview", is_flag=True, help="Model packages: also write preview/<name>.png (three views with the label overlaid).")
@click.option("--resume", is_flag=True, help="Model packages: skip the inputs --out already holds from the same model (an interrupted batch).")
@click.option("--overwrite", is_flag=True, help="Replace output files already in --out (refused otherwise, before anything is written).")
@click.option("--device", default=None, callback=device_option,
              help="Where the network runs (auto, cpu, cuda, cuda:N; default: the site's device, auto without a site config).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_context
def infer(ctx: click.Context, inputs: tuple[str, ...], model_ref: str, out: Path, mode: str, modality: str | None, dicom_seg: bool, statistics: bool,
          preview: bool, resume: bool, overwrite: bool, device: str | None, as_json: bool) -> None:  # fmt: skip
    """Segment scans: NIfTI files, DICOM series folders, CR/DX radiographs, prepared datasets, or folders of them.

    With a published model (--model NAME[@vNNNN] or a package folder) the label is written on
    each input's own grid, with optional DICOM SEG, statistics and preview; a failing input
    is reported and the others go on. Each output is named after its input
    (<out>/<name>.nii.gz). Existing output files are never replaced unless --overwrite is given.
    """
    p = Path(model_ref)
    if p.is_file() or (p.is_dir() and (p / "model.pt").is_file()):  # an adaptation job's model
        if statistics or preview or resume:
            raise UserError("--statistics, --preview and --resume work with model packages, not adaptation models")
        from site_agent.adapt import run_infer

        rows = run_infer(p / "model.pt" if p.is_dir() else p, list(inputs), out, mode=mode, dicom_seg=dicom_seg, modality=modality, overwrite=overwrite,
                         device=device, site=load_site_if_present(ctx))  # fmt: skip
        failures: list[dict[str, str]] = []
    else:
        from site_agent.infer_package import run_package_infer
        from site_agent.models import open_model, place_model

        site = load_site_if_present(ctx) if p.is_dir() else load_site(ctx)  # a folder needs no site; its device setting still applies
        package = open_model(site, model_ref)
        place_model(package, site, device)
        log.info("model %s: %s", package.ref, ", ".join(k for k in package.class_ids if k != "background"))
        with CaseProgress("segmenting", lines=False) as progress:  # each input is logged as it is done
            rows, failures = run_package_infer(package, list(inputs), out, modality=modality, dicom_seg=dicom_seg, statistics=statistics,
                                               preview=preview, overwrite=overwrite, resume=resume, progress=progress)  # fmt: skip
    if as_json:  # one row per input: its outputs, or its error
        click.echo(json.dumps([*rows, *failures], indent=2))
    else:
        for r in rows:
            click.echo(f"{r['label']}" + (f" + {r['dicom_seg']}" if "dicom_seg" in r else ""))
    if failures:
        raise UserError(f"{len(failures)} of {len(failures) + len(rows)} input(s) failed (each named above); the others were segmented")


class CaseProgress:
    """Progress over inputs on stderr: a rich bar on a terminal; elsewhere plain log lines (the
    first and last input and at most one every 10 s between); nothing under --quiet. Called as
    ``progress(done, total, name)``.

    Args:
        title: the bar's label.
        name_is_stage: ``name`` names a stage whose count starts again (``preprocessing``,
            ``scoring``), not the input just done.
        lines: plain lines when not on a terminal; False where the command logs each input itself.
        unit: what is counted, as the plain lines name it.
    """

    def __init__(self, title: str, name_is_stage: bool = False, lines: bool = True, unit: str = "inputs") -> None:
        self.title, self.tty, self.name_is_stage, self.with_lines = title, sys.stderr.isatty(), name_is_stage, lines
        self.progress = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[name]}"), console=stderr_console(),
                                 disable=not self.tty or not show_progress())  # fmt: skip
        self.task: TaskID | None = None
        self.lines = ProgressLines(log.info, unit=unit)

    def __enter__(self) -> CaseProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.tty:
            if show_progress() and self.with_lines:
                if self.name_is_stage:
                    self.lines(f"{self.title} ({name})", done, total)
                else:
                    self.lines(self.title, done, total, name)
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=total, name=name)
        self.progress.update(self.task, completed=done, total=total, name=name)
