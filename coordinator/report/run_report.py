"""The run report: ``<run_dir>/report/`` with index.html, report.md and the PNG figures.

In-federation numbers are on each site's test cases (never used for training or selection), with
the validation cases that selected the models beside them; a run without test cases (older runs,
``split.test: 0``) reports its validation cases and says so."""

from __future__ import annotations

from pathlib import Path

from coordinator.report.figures import plot_boxplots, plot_dice_global, plot_learning_curves
from coordinator.report.forgetting import forgetting_section
from coordinator.report.numbers import cost_summary, federation_box_panels, learning_curves, oof_box_panels
from coordinator.report.overlays import copy_overlays, overlay_section, report_overlays
from coordinator.report.reading import EVALUATIONS_DIR, NO_TEST_SPLIT, InFederation, Log, Run, Scored, foreground_classes, in_federation, load_run
from coordinator.report.site_classes import site_classes_section
from coordinator.report.tables import (
    cost_table,
    dice_table,
    evaluation_metrics_table,
    evaluation_table,
    final_metrics_table,
    header_table,
    participation_table,
    privacy_table,
    split_sizes_table,
    split_table,
)
from fedimg_core import atomic
from fedimg_core.reporting import Section, Table, render_markdown, render_sections

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
    if run.metrics.plan == "fedsr":  # personalised models scored at the sites: a report of its own
        from coordinator.report.fedsr import build_fedsr_report

        build_fedsr_report(run, folder)
        return
    fed = in_federation(run.metrics)
    classes = foreground_classes(run.schema, fed.global_validation, fed.global_test, fed.local_validation, fed.local_test)
    figures = {
        "dice_global.png": plot_dice_global(fed.glob, classes),
        "boxplots.png": plot_boxplots(federation_box_panels(fed.glob, fed.local, run.schema), f"per-case Dice, in federation, {fed.split} cases"),
        "learning_curves.png": plot_learning_curves(learning_curves(run.metrics)),
    }
    if oof := oof_box_panels(run.evaluations):
        figures["boxplots_oof.png"] = plot_boxplots(oof, "per-case Dice, out of federation")
    sections = report_sections(run, fed, classes, set(figures))
    if shown := report_overlays(run.run_dir, REPORT_DIR):  # drawn by `coordinator evaluate`: carried into the new folder
        copy_overlays(shown, folder)
        sections.insert(next((i + 1 for i, s in enumerate(sections) if s.title == "Out of federation"), len(sections)), overlay_section(shown))
    for name, data in figures.items():
        atomic.write_bytes(folder / name, data)
    title = f"Run report: {run.run_id}"
    atomic.write_text(folder / "index.html", render_sections(title, sections))
    atomic.write_text(folder / "report.md", render_markdown(title, sections))


SPLITS_TEXT = (
    "Validation cases selected the model (best global model: best mean Dice over all classes across sites; best local model: "
    "best mean Dice on the site's own validation cases), so their numbers are optimistic; test cases were never used for "
    "training or selection. Each site's split is fixed by the split seed and its case numbers."
)
NO_TEST_TEXT = (
    f"{NO_TEST_SPLIT[0].upper()}{NO_TEST_SPLIT[1:]}: the numbers below are on the validation cases that also selected the model, which is optimistic."
)


def report_sections(run: Run, fed: InFederation, classes: list[str], figures: set[str]) -> list[Section]:
    """The report's sections: run, global model, local models, forgetting (runs with reference labels), out of federation, per-case Dice,
    learning curves, cost.

    Args:
        run: the run.
        fed: the selected global and local models' rows on the validation and the test cases.
        classes: the Dice columns.
        figures: the figure files written.

    Returns:
        The sections.
    """
    standalone = ["Standalone mode: the sites never share weights, so each site's 'global' model is its own model."] if run.metrics.mode == "standalone" else []
    split_note = [SPLITS_TEXT] if fed.has_test else [NO_TEST_TEXT]
    run_tables = [header_table(run)] + ([split_sizes_table(run.metrics)] if run.metrics.splits else [])
    if (left_out := participation_table(run.metrics)) is not None:
        run_tables.append(left_out)
    if (privacy := privacy_table(run.metrics)) is not None:
        run_tables.append(privacy)
    oof_tables = [t for ev in run.evaluations for t in (evaluation_table(ev), evaluation_metrics_table(ev)) if t is not None]
    oof_text = [] if run.evaluations else [f"No out-of-federation evaluation ({EVALUATIONS_DIR}/<dataset>.json) for this run."]
    if len(oof_tables) > len(run.evaluations):  # evaluations with clinical metrics
        oof_text.append("Under each evaluation's Dice table, where it recorded them, its boundary and volume metrics per model and class "
                        '(pipelines.metrics; their empty-mask rules: README, "Metrics and empty masks").')  # fmt: skip
    return [
        Section("Run", tables=run_tables),
        Section(
            "Global model, in federation",
            [
                f"Model: {fed.global_validation.model}. Dice per class on each site's {fed.split} cases; each site "
                "scores the classes it labels. The last row is, per class, the mean across the sites that score it; its mean over "
                "classes on the validation cases is the model-selection score.",
                *split_note,
                *standalone,
            ],
            _split_tables(fed.global_validation, fed.global_test, classes, "global model")
            + ([final] if (final := final_metrics_table(run.metrics, classes)) is not None else []),
            [("dice_global.png", f"global model: Dice per class and site, {fed.split} cases")],
        ),
        Section(
            "Local models, in federation",
            [
                f"Models: {fed.local_validation.model}. Each site's own model is scored on that site's cases "
                "only, so only on the classes that site labels: the other cells are empty.",
                *split_note,
            ],
            _split_tables(fed.local_validation, fed.local_test, classes, "local models"),
        ),
        *([per_site] if (per_site := site_classes_section(run.metrics, run.schema)) else []),  # runs with test-only reference labels
        *([forgetting] if (forgetting := forgetting_section(run.metrics, run.schema)) else []),
        Section(
            "Out of federation",
            oof_text,
            oof_tables,
        ),
        Section(
            "Per-case Dice",
            [
                f"Boxes of per-case Dice per class on the {fed.split} cases: the global model pooled over all sites' cases, and "
                "each local model on its own site's cases (a site without labels for a class has no box)." + ("" if fed.has_test else f" ({NO_TEST_SPLIT}.)")
            ],
            images=[
                (name, alt)
                for name, alt in (
                    ("boxplots.png", f"per-case Dice in federation, {fed.split} cases"),
                    ("boxplots_oof.png", "per-case Dice out of federation"),
                )
                if name in figures
            ],
        ),
        Section(
            "Learning curves",
            [
                "Global Dice is plotted at the round of the model scored: a site scores the global model after round r-1 "
                "at the start of round r, and the final model after the last round. The per-site lines and the selection "
                "score are on the validation cases (what selection sees)"
                + ("; the dashed line is the same score on the test cases, never used for selection." if fed.has_test else ".")
            ],
            images=[("learning_curves.png", "learning curves")],
        ),
        Section("Cost", tables=[cost_table(cost_summary(run.metrics, run.state))]),
    ]


def _split_tables(val: Scored, test: Scored, classes: list[str], what: str) -> list[Table]:
    """The Dice tables of one model kind: on the test cases, on the validation cases, and both side by side
    (only the validation table for a run without test cases)."""
    plural = "s" if val.rounds else ""  # local models: one per site
    if not test.rows:  # local models: the side-by-side table still gives each site's round (its test cells empty)
        sides = [split_table(val, test, f"{what}: round and validation cases ({NO_TEST_SPLIT})")] if val.rounds else []
        return [dice_table(val, classes, f"{val.label}: Dice per site and class"), *sides]
    return [
        dice_table(test, classes, f"{test.label} (never used for training or selection): Dice per site and class"),
        dice_table(val, classes, f"{val.label} (selected the model{plural}): Dice per site and class"),
        split_table(
            val, test, f"{what}: validation (selected the model{plural}) and test (never used for training or selection), mean Dice over each site's classes"
        ),
    ]
