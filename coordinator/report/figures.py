"""The run report's figures: Dice per class and site, per-case Dice boxplots, learning curves
(drawn with the shared figure toolkit, `fedimg_core.reporting.figures`)."""

from __future__ import annotations

from coordinator.report.numbers import Curves
from coordinator.report.reading import MEAN_ACROSS_SITES, Scored, class_means
from coordinator.results import class_dice
from fedimg_core.reporting import figures
from fedimg_core.reporting.figures import BoxPanel


def plot_grouped_bars(categories: list[str], series: list[tuple[str, list[float | None]]], title: str, ylabel: str = "Dice") -> bytes:
    """Grouped bars (see `fedimg_core.reporting.figures.grouped_bars`), the mean across sites in grey."""
    return figures.grouped_bars(categories, series, title, ylabel, grey=(MEAN_ACROSS_SITES,))


def plot_dice_global(glob: Scored, classes: list[str]) -> bytes:
    """dice_global.png: per class, the global model's Dice on each site and the mean across sites."""
    series: list[tuple[str, list[float | None]]] = [(site, [class_dice(row).get(c) for c in classes]) for site, row in sorted(glob.rows.items())]
    means = class_means(glob)
    series.append((MEAN_ACROSS_SITES, [means.get(c) for c in classes]))
    return plot_grouped_bars(classes, series, f"{glob.label}: Dice per class")


def plot_boxplots(panels: list[BoxPanel], title: str) -> bytes:
    """One panel per class, one box of per-case Dice per model."""
    return figures.boxplots(panels, title)


def plot_learning_curves(c: Curves) -> bytes:
    """learning_curves.png: loss, global Dice and selection score (validation; test score where recorded), local Dice, lambda."""
    fig = figures.new_figure((11, 8))
    axes = [fig.add_subplot(2, 2, k) for k in range(1, 5)]
    figures.line_panel(axes[0], c.loss, "training loss (loss_mean) per site", "loss", "round")
    figures.line_panel(axes[1], c.global_dice, "global model Dice per site, validation cases (dice_mean)", "Dice", "global model after round")
    if c.selection:
        xs, ys = zip(*c.selection)
        axes[1].plot(xs, ys, "k-", lw=2.5, marker="s", label="selection score, validation (mean over classes across sites)")
    if c.test_score:
        xs, ys = zip(*c.test_score)
        axes[1].plot(xs, ys, "k--", lw=2.0, marker="^", label="same score, test cases (not used for selection)")
    if c.selection or c.test_score:
        axes[1].legend(fontsize="small")
    figures.line_panel(axes[2], c.local_dice, "local model Dice per site (after local training), validation cases", "Dice", "round")
    if c.lam:
        figures.line_panel(axes[3], {"lambda": c.lam}, "ConDistFL lambda per round", "lambda", "round")
    else:
        axes[3].set_axis_off()
        axes[3].text(0.5, 0.5, "no lambda recorded", ha="center", va="center")
    fig.tight_layout()
    return figures.png_bytes(fig)
