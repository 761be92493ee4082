"""The run report: ``<run_dir>/report/`` with index.html, report.md and the PNG figures."""

from __future__ import annotations

from pathlib import Path

from coordinator.report.figures import plot_boxplots, plot_dice_global, plot_learning_curves
from coordinator.report.numbers import cost_summary, federation_box_panels, learning_curves, oof_box_panels
from coordinator.report.reading import EVALUATIONS_DIR, Log, Run, Scored, foreground_classes, global_rows, load_run, local_rows
from coordinator.report.tables import best_local_table, cost_table, dice_table, evaluation_table, header_table
from fedimg_core import atomic
from fedimg_core.reporting import Section, render_markdown, render_sections

REPORT_DIR = "report"


def write_report(run_dir: Path, log: Log = print) -> Path:
    """Write ``<run_dir>/report/`` (index.html, report.md, PNG figures).

    Built in a temporary sibling folder and swapped in on success only: a failed build
    leaves the previous report as it was.

    Args:
        run_dir: the run directory.
        log: where the report's path and skipped evaluation files are reported.

    Returns:
        The report folder.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
        ConfigError: its metrics.json is not JSON or does not fit `RunMetrics`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    run = load_run(run_dir, log)
    target = run_dir / REPORT_DIR
    atomic.publish_dir(target, lambda folder: build_report(run, folder))
    log(f"report: {target / 'index.html'}")
    return target


def build_report(run: Run, folder: Path) -> None:
    """Write the report's files into ``folder``.

    Args:
        run: the run.
        folder: an empty folder.
    """
    glob, local = global_rows(run.metrics), local_rows(run.metrics)
    classes = foreground_classes(run.schema, glob, local)
    figures = {
        "dice_global.png": plot_dice_global(glob, classes),
        "boxplots.png": plot_boxplots(federation_box_panels(glob, local, run.schema), "per-case Dice, in federation"),
        "learning_curves.png": plot_learning_curves(learning_curves(run.metrics)),
    }
    if oof := oof_box_panels(run.evaluations):
        figures["boxplots_oof.png"] = plot_boxplots(oof, "per-case Dice, out of federation")
    sections = report_sections(run, glob, local, classes, set(figures))
    for name, data in figures.items():
        atomic.write_bytes(folder / name, data)
    title = f"Run report: {run.run_id}"
    atomic.write_text(folder / "index.html", render_sections(title, sections))
    atomic.write_text(folder / "report.md", render_markdown(title, sections))


def report_sections(run: Run, glob: Scored, local: Scored, classes: list[str], figures: set[str]) -> list[Section]:
    """The report's sections: run, global model, local models, out of federation, per-case Dice, learning curves, cost.

    Args:
        run: the run.
        glob: the rows scoring the global model.
        local: the rows scoring the local models.
        classes: the Dice columns.
        figures: the figure files written.

    Returns:
        The sections.
    """
    standalone = ["Standalone mode: the sites never share weights, so each site's 'global' model is its own model."] if run.metrics.mode == "standalone" else []
    return [
        Section("Run", tables=[header_table(run)]),
        Section(
            "Global model, in federation",
            [
                f"Model: {glob.label}. Dice per class on each site's validation cases; each site scores the classes it labels. "
                "The last row is, per class, the mean across the sites that score it; its mean over classes is the "
                "model-selection score.",
                *standalone,
            ],
            [dice_table(glob, classes, f"{glob.label}: Dice per site and class")],
            [("dice_global.png", "global model: Dice per class and site")],
        ),
        Section(
            "Local models, in federation",
            [
                f"Models: {local.label}. Each site's own model is scored on that site's validation cases only, "
                "so only on the classes that site labels: the other cells are empty."
            ],
            [dice_table(local, classes, f"{local.label}: Dice per site and class"), best_local_table(run.metrics)],
        ),
        Section(
            "Out of federation",
            [] if run.evaluations else [f"No out-of-federation evaluation ({EVALUATIONS_DIR}/<dataset>.json) for this run."],
            [evaluation_table(ev) for ev in run.evaluations],
        ),
        Section(
            "Per-case Dice",
            [
                "Boxes of per-case Dice per class: the global model pooled over all sites' validation cases, and each "
                "local model on its own site's cases (a site without labels for a class has no box)."
            ],
            images=[
                (name, alt)
                for name, alt in (
                    ("boxplots.png", "per-case Dice in federation"),
                    ("boxplots_oof.png", "per-case Dice out of federation"),
                )
                if name in figures
            ],
        ),
        Section(
            "Learning curves",
            [
                "Global Dice is plotted at the round of the model scored: a site scores the global model after round r-1 "
                "at the start of round r, and the final model after the last round."
            ],
            images=[("learning_curves.png", "learning curves")],
        ),
        Section("Cost", tables=[cost_table(cost_summary(run.metrics, run.state))]),
    ]
