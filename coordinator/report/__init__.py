"""Run reports: one self-contained page per run, and comparisons of runs (no FL imports).

``write_report(run_dir)`` writes ``<run_dir>/report/``: ``index.html``, the same content as
``report.md``, and the figures beside them (``dice_global.png``, ``boxplots.png``,
``boxplots_oof.png``, ``learning_curves.png``). ``compare_runs(run_dirs, out_dir)`` puts
several runs side by side (``index.html``, ``comparison.md``, ``comparison.json``,
``methods_global.png``). What each section shows and why: docs/design/reports.md.

Modules: `reading` (a run's metrics, state and evaluations), `numbers` (curves, per-case
panels, cost), `tables`, `figures`, `forgetting` (classes a site does not train on, scored on its
test-only reference labels), `site_classes` (per site, trained and test-only classes: the
ConDistFL paper's Table 5 shape), `run_report` (the run report), `compare` (comparisons).
In-federation numbers are on the sites' test cases, beside the validation cases that selected the
models; runs without test cases (older runs) report their validation cases and say so.
Pages and figures are drawn with the shared reporting layer, `fedimg_core.reporting`.
"""

from coordinator.report.compare import compare_runs, comparison_sections, comparison_table, method_record, oof_summary, seed_summary
from coordinator.report.figures import plot_boxplots, plot_dice_global, plot_grouped_bars, plot_learning_curves
from coordinator.report.numbers import MB, Curves, cost_summary, federation_box_panels, learning_curves, oof_box_panels
from coordinator.report.reading import (
    EVALUATIONS_DIR,
    MEAN_ACROSS_SITES,
    NO_TEST_SPLIT,
    Evaluation,
    InFederation,
    Run,
    Scored,
    class_means,
    foreground_classes,
    global_rows,
    in_federation,
    load_run,
    local_rows,
    read_evaluations,
    row_mean,
    scored_mean,
)
from coordinator.report.run_report import REPORT_DIR, build_report, report_sections, write_report
from coordinator.report.tables import (
    cost_table,
    dice_table,
    evaluation_mean,
    evaluation_metrics_table,
    evaluation_table,
    header_table,
    split_sizes_table,
    split_table,
)
from fedimg_core.reporting import Section, Table, cell, render_markdown
from fedimg_core.reporting import render_sections as render_html
from fedimg_core.reporting.figures import BoxPanel, Points

__all__ = [
    "EVALUATIONS_DIR", "MB", "MEAN_ACROSS_SITES", "NO_TEST_SPLIT", "REPORT_DIR", "BoxPanel", "Curves", "Evaluation",
    "InFederation", "Points", "Run", "Scored", "Section", "Table", "build_report", "cell", "class_means", "compare_runs",
    "comparison_sections", "comparison_table", "cost_summary", "cost_table", "dice_table", "evaluation_mean",
    "evaluation_metrics_table", "evaluation_table", "federation_box_panels", "foreground_classes", "global_rows", "header_table", "in_federation",
    "learning_curves", "load_run", "local_rows", "method_record", "oof_box_panels", "oof_summary", "plot_boxplots",
    "plot_dice_global", "plot_grouped_bars", "plot_learning_curves", "read_evaluations", "render_html", "render_markdown",
    "report_sections", "row_mean", "scored_mean", "seed_summary", "split_sizes_table", "split_table", "write_report",
]  # fmt: skip
