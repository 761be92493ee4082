"""Report figures: matplotlib figures on the Agg canvas (no pyplot state, no display) saved as PNG.

Besides the canvas and PNG encoding (`new_figure`, `png_bytes`, `write_png`) this holds the
plots several reports draw: grouped bars, boxplots, line panels and grids of grey slices.
Every PNG is written without text metadata chunks (the QC report's PNGs must carry none).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedimg_core import atomic

DPI = 100
Points = list[tuple[int, float]]
BoxPanel = tuple[str, list[tuple[str, list[float]]]]  # title, [(model, values)]


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    """A figure drawn by the Agg canvas (works headless, touches no pyplot state).

    Args:
        figsize: width and height in inches.
        kwargs: more `matplotlib.figure.Figure` arguments (dpi, facecolor, layout).

    Returns:
        The figure.
    """
    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: float = DPI, tight: bool = True) -> bytes:
    """Encode ``fig`` as PNG, in its own background colour and without text metadata.

    Args:
        fig: the figure.
        dpi: resolution.
        tight: crop to the drawn content (``bbox_inches="tight"``).

    Returns:
        The PNG bytes.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None, facecolor=fig.get_facecolor(), metadata={"Software": None})
    return buf.getvalue()


def write_png(path: str | os.PathLike[str], fig: Figure, dpi: float = DPI, tight: bool = True) -> None:
    """Write ``fig`` as a PNG file, atomically (see `png_bytes`).

    Args:
        path: the file.
        fig: the figure.
        dpi: resolution.
        tight: crop to the drawn content.
    """
    atomic.write_bytes(path, png_bytes(fig, dpi=dpi, tight=tight))


def color(i: int) -> str:
    """The i-th colour of the default cycle (the same series keeps its colour across panels).

    Args:
        i: series index.

    Returns:
        A matplotlib colour name.
    """
    return f"C{i % 10}"


def empty_figure(message: str) -> bytes:
    """A small PNG that says ``message`` (a figure with nothing to plot).

    Args:
        message: the text.

    Returns:
        The PNG bytes.
    """
    fig = new_figure((6, 2))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return png_bytes(fig)


def grouped_bars(
    categories: list[str],
    series: list[tuple[str, list[float | None]]],
    title: str,
    ylabel: str = "Dice",
    grey: Sequence[str] = (),
) -> bytes:
    """One group of bars per category, one bar per series, on a 0..1 axis.

    Args:
        categories: x groups.
        series: (name, one value or None per category); None draws no bar, and a category
            without any value is left out.
        title: figure title.
        ylabel: y axis label.
        grey: series drawn in dark grey (a summary such as a mean), not in a colour.

    Returns:
        The PNG bytes (a message figure when nothing is recorded).
    """
    keep = [j for j in range(len(categories)) if any(values[j] is not None for _, values in series)]
    if not keep:
        return empty_figure(f"{title}: nothing recorded")
    categories = [categories[j] for j in keep]
    series = [(name, [values[j] for j in keep]) for name, values in series]
    fig = new_figure((max(6.0, 1.0 + 0.35 * len(categories) * len(series)), 4))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (name, values) in enumerate(series):
        pos = [x[j] + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ax.bar(pos, [v for v in values if v is not None], width, label=name, color="0.25" if name in grey else color(i))
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png_bytes(fig)


def boxplots(panels: list[BoxPanel], title: str, ylabel: str = "Dice per case") -> bytes:
    """One panel per title, one box per model (same position and colour for a model in every panel).

    Args:
        panels: (panel title, [(model, values)]); a model without values draws no box.
        title: figure title.
        ylabel: y axis label (0..1 axis).

    Returns:
        The PNG bytes (a message figure without panels).
    """
    if not panels:
        return empty_figure(f"{title}: no per-case Dice recorded")
    models = list(dict.fromkeys(m for _, boxes in panels for m, _ in boxes))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure((max(3.0, 0.6 * len(models) + 1.2) * ncols, 3.6 * nrows))
    for k, (panel_title, boxes) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        data = {m: v for m, v in boxes if v}
        pos = [models.index(m) + 1 for m in data]
        if data:
            art = ax.boxplot(list(data.values()), positions=pos, widths=0.6, patch_artist=True, medianprops={"color": "black"})
            for patch, m in zip(art["boxes"], data):
                patch.set_facecolor(color(models.index(m)))
                patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=45, ha="right", fontsize="small")
        ax.set_xlim(0.3, len(models) + 0.7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel_title, fontsize="medium")
        if k % ncols == 0:
            ax.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return png_bytes(fig)


def line_panel(ax: Axes, series: Mapping[str, Sequence[tuple[float, float]]], title: str, ylabel: str, xlabel: str, legend: bool = True) -> None:
    """Draw one line per named series on ``ax`` (integer x ticks), or say nothing was recorded.

    Args:
        ax: the axes.
        series: name -> (x, y) points, drawn in name order.
        title: panel title.
        ylabel: y axis label.
        xlabel: x axis label.
        legend: show a legend of the names.
    """
    for i, (name, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) < 50 else None, color=color(i), label=name, lw=1.5 if len(points) < 50 else 1)
    if series and legend:
        ax.legend(fontsize="small")
    elif not series:
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def line_panels(panels: Sequence[tuple[str, Mapping[str, Sequence[tuple[float, float]]]]], xlabel: str, panel_size: tuple[float, float] = (4.0, 3.0)) -> Figure:
    """A row of line panels (one per title), e.g. one per loss with one line per site.

    Args:
        panels: (title, name -> points) per panel; a legend is drawn where a panel has more than one line.
        xlabel: x axis label of every panel.
        panel_size: inches per panel.

    Returns:
        The figure.
    """
    fig = new_figure((panel_size[0] * len(panels), panel_size[1]))
    for k, (title, series) in enumerate(panels):
        line_panel(fig.add_subplot(1, len(panels), k + 1), series, title, "", xlabel, legend=len(series) > 1)
    fig.tight_layout()
    return fig


def grey_grid(
    cells: Sequence[Sequence[np.ndarray[Any, Any] | None]],
    row_names: Sequence[str],
    col_names: Sequence[str],
    title: str,
    cell_inches: float = 1.6,
    vrange: tuple[float, float] | None = (-1.0, 1.0),
) -> Figure:
    """A grid of 2D images (grey, or RGB when an array has a last axis of 3), rows and columns named.

    Args:
        cells: ``cells[i][j]`` is a display-oriented (H, W) or (H, W, 3) array, or None for an empty cell.
        row_names: one label per row (on the left).
        col_names: one title per column (on top; may be shorter than the rows).
        title: figure title.
        cell_inches: size of one cell.
        vrange: display range of grey images (None: each image's own range).

    Returns:
        The figure.
    """
    n_rows, n_cols = len(cells), max((len(r) for r in cells), default=0)
    fig = new_figure((cell_inches * n_cols + 1.0, cell_inches * n_rows + 0.6))
    axes = fig.subplots(max(n_rows, 1), max(n_cols, 1), squeeze=False)
    vmin, vmax = vrange if vrange is not None else (None, None)
    for i, row in enumerate(cells):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = row[j] if j < len(row) else None
            if image is None:
                ax.axis("off")
            elif image.ndim == 3:
                ax.imshow(np.clip(image, 0, 1))
            else:
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
            if j == 0 and i < len(row_names):
                ax.set_ylabel(row_names[i], fontsize=7)
            if i == 0 and j < len(col_names):
                ax.set_title(col_names[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
