"""The per-job report of an adaptation job: PNGs and one index.html.

* ``losses.png``       -- the logged losses against the step;
* ``translations.png`` -- rows of (image, reconstruction, translated, cycled back) for
                          synthetic source samples and target images (target jobs), or
                          (image, reconstruction) for source jobs;
* ``overlays.png``     -- image, reference labels (where known) and prediction overlaid.

Slices are shown in the radiological view used by the factory's sample grids. The PNGs
hold slices of the site's own images and stay in the site's work folder with the job; they
are never part of what a site publishes.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedimg_core import atomic

_LABEL_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    dtype=np.float32,
) / 255.0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _view(img: torch.Tensor) -> np.ndarray:
    """(H, W) slice with RAS rows = X, columns = Y -> radiological display orientation."""
    return img.detach().float().cpu().T.flip(0).numpy()


def _save(fig, path: Path) -> None:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def loss_plot(path: Path, rows: Sequence[dict], keys: Sequence[str] | None = None) -> Path | None:
    """One panel per loss key found in the metric rows (``step`` on the x axis)."""
    rows = [r for r in rows if "step" in r]
    keys = list(keys) if keys is not None else sorted({k for r in rows for k in r if k.startswith("loss")})
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def image_grid(path: Path, rows: Sequence[Sequence[torch.Tensor]], row_names: Sequence[str], col_names: Sequence[str], title: str) -> Path:
    """A grid of grey slices in [-1, 1]: ``rows[i][j]`` is a (H, W) tensor."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 1.0, 1.6 * n_rows + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(_view(row[j]), cmap="gray", vmin=-1, vmax=1)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(row_names[i], fontsize=7)
            if i == 0 and j < len(col_names):
                ax.set_title(col_names[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def _overlay(image: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    grey = (_view(image) + 1.0) / 2.0
    lab = _view(label.float()).round().astype(np.int64)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colours = _LABEL_COLOURS[np.clip(lab, 0, len(_LABEL_COLOURS) - 1)]
    mask = (lab > 0)[..., None]
    return np.where(mask, 0.45 * rgb + 0.55 * colours, rgb)


def overlay_grid(path: Path, images: torch.Tensor, predictions: torch.Tensor, references: torch.Tensor | None, class_names: Sequence[str], title: str) -> Path:
    """Columns: image, reference overlay (when given), prediction overlay; one row per slice."""
    plt = _plt()
    cols = 3 if references is not None else 2
    n = images.shape[0]
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols + 0.4, 1.8 * n + 0.8), squeeze=False)
    names = ["image"] + (["reference"] if references is not None else []) + ["prediction"]
    for i in range(n):
        panels = [np.repeat(((_view(images[i, 0]) + 1) / 2)[..., None], 3, axis=-1)]
        if references is not None:
            panels.append(_overlay(images[i, 0], references[i]))
        panels.append(_overlay(images[i, 0], predictions[i]))
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=8)
    legend = ", ".join(f"{c}" for c in class_names[1:])
    fig.suptitle(f"{title}\n{legend}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def write_index(folder: Path, title: str, facts: dict, images: Sequence[tuple[str, str]], tables: Sequence[tuple[str, list[str], list[list]]] = ()) -> Path:
    """``folder/index.html``: a facts table, result tables and the PNGs (caption, file name)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}</style>",
             f"<h1>{html.escape(title)}</h1><table>"]  # fmt: skip
    for key, value in facts.items():
        parts.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    for caption, header, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2><table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    for caption, name in images:
        if (folder / name).is_file():
            parts.append(f"<h2>{html.escape(caption)}</h2><img src='{html.escape(name)}' style='max-width:100%'>")
    path = folder / "index.html"
    atomic.write_text(path, "\n".join(parts) + "\n")
    return path
