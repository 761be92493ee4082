"""The per-job report of an adaptation job: PNGs and one index.html.

* ``losses.png``       -- the logged losses against the step;
* ``translations.png`` -- rows of (image, reconstruction, translated, cycled back) for
                          synthetic source samples and target images (target jobs), or
                          (image, reconstruction) for source jobs;
* ``overlays.png``     -- image, reference labels (where known) and prediction overlaid.

Slices are shown in the radiological view used by the factory's sample grids. The PNGs
hold slices of the site's own images and stay in the site's work folder with the job; they
are never part of what a site publishes. Drawn with the shared reporting layer
(`fedimg_core.reporting`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimg_core import atomic
from fedimg_core.reporting import Section, Table, figures, render_sections

_LABEL_COLOURS = (
    np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
        dtype=np.float32,
    )
    / 255.0
)
_DPI = 80


def _view(img: torch.Tensor) -> np.ndarray:
    """(H, W) slice with RAS rows = X, columns = Y -> radiological display orientation."""
    return img.detach().float().cpu().T.flip(0).numpy()


def loss_plot(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> Path | None:
    """One panel per loss key found in the metric rows (``step`` on the x axis).

    Args:
        path: the PNG file.
        rows: the job's metric rows (``metrics.jsonl``).
        keys: the losses to draw (default: every key starting with ``loss``).

    Returns:
        ``path``, or None when no row holds any of the keys (nothing written).
    """
    rows = [r for r in rows if "step" in r]
    keys = list(keys) if keys is not None else sorted({k for r in rows for k in r if k.startswith("loss")})
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    panels = [(key, {key: [(r["step"], r[key]) for r in rows if key in r]}) for key in keys]
    figures.write_png(path, figures.line_panels(panels, "step", panel_size=(3.2, 2.8)), dpi=_DPI, tight=False)
    return path


def image_grid(path: Path, rows: Sequence[Sequence[torch.Tensor]], row_names: Sequence[str], col_names: Sequence[str], title: str) -> Path:
    """A grid of grey slices in [-1, 1].

    Args:
        path: the PNG file.
        rows: ``rows[i][j]`` is a (H, W) tensor (RAS x, y); rows may be shorter than the longest.
        row_names: one label per row.
        col_names: one title per column.
        title: the figure title.

    Returns:
        ``path``.
    """
    cells = [[_view(t) for t in row] for row in rows]
    figures.write_png(path, figures.grey_grid(cells, row_names, col_names, title), dpi=_DPI, tight=False)
    return path


def _overlay(image: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    grey = (_view(image) + 1.0) / 2.0
    lab = _view(label.float()).round().astype(np.int64)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colours = _LABEL_COLOURS[np.clip(lab, 0, len(_LABEL_COLOURS) - 1)]
    mask = (lab > 0)[..., None]
    return np.where(mask, 0.45 * rgb + 0.55 * colours, rgb)


def overlay_grid(path: Path, images: torch.Tensor, predictions: torch.Tensor, references: torch.Tensor | None, class_names: Sequence[str], title: str) -> Path:
    """Columns: image, reference overlay (when given), prediction overlay; one row per slice.

    Args:
        path: the PNG file.
        images: (N, 1, H, W) in [-1, 1].
        predictions: (N, H, W) class ids.
        references: (N, H, W) reference class ids, or None.
        class_names: class names by id (the legend lists all but background).
        title: the figure title.

    Returns:
        ``path``.
    """
    names = ["image"] + (["reference"] if references is not None else []) + ["prediction"]
    cells = []
    for i in range(images.shape[0]):
        panels = [np.repeat(((_view(images[i, 0]) + 1) / 2)[..., None], 3, axis=-1)]
        if references is not None:
            panels.append(_overlay(images[i, 0], references[i]))
        panels.append(_overlay(images[i, 0], predictions[i]))
        cells.append(panels)
    legend = ", ".join(f"{c}" for c in class_names[1:])
    fig = figures.grey_grid(cells, [""] * len(cells), names, f"{title}\n{legend}", cell_inches=1.8)
    figures.write_png(path, fig, dpi=_DPI, tight=False)
    return path


def write_index(
    folder: Path, title: str, facts: dict[str, Any], images: Sequence[tuple[str, str]], tables: Sequence[tuple[str, list[str], list[list[Any]]]] = ()
) -> Path:
    """Write ``folder/index.html``: a facts table, result tables and the PNGs.

    Args:
        folder: the report folder (the PNGs are in it).
        title: the page title.
        facts: what the job was (shown as a table of key, value).
        images: (caption, file name) of each figure; a missing file is left out.
        tables: (caption, header, rows) of each result table.

    Returns:
        The index path.
    """
    sections = [Section("", tables=[Table([], [[str(k), str(v)] for k, v in facts.items()])])]
    sections += [Section(caption, tables=[Table([str(h) for h in header], [[str(c) for c in row] for row in rows])]) for caption, header, rows in tables]
    sections += [Section(caption, images=[(name, caption)]) for caption, name in images if (folder / name).is_file()]
    path = folder / "index.html"
    atomic.write_text(path, render_sections(title, sections))
    return path
