"""Case figures of a segmentation: per class, the image, the reference and the prediction on one axial slice.

The figure behind `coordinator evaluate`'s out-of-federation overlays (like Figures 5 and 6 of
the ConDistFL paper) and `site-agent evaluate`'s worst cases: one row per scored class present
in the reference or the prediction, columns image / reference / prediction on the axial slice
holding the most reference voxels of that class, in radiological display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import to_rgba

from fedimg_core import atomic
from fedimg_core.reporting import figures

__all__ = ["MASK_ALPHA", "PALETTE", "ROBUST_PERCENTILES", "OverlayRow", "class_colour", "overlay_rows", "pick_slice", "plot_case", "write_case"]

ROBUST_PERCENTILES = (1.0, 99.0)  # display range of the (already windowed and normalised) image
MASK_ALPHA = 0.55
# saturated colours that stand out on grey (the default cycle's grey and olive do not), by class id
PALETTE = ("tab:red", "tab:green", "tab:blue", "tab:orange", "magenta", "cyan", "gold", "lime", "tab:purple", "deepskyblue")


def class_colour(cls: int) -> str:
    """The colour of class ``cls``'s masks (the same in every figure).

    Args:
        cls: the class id (from 1).

    Returns:
        A matplotlib colour name.
    """
    return PALETTE[(cls - 1) % len(PALETTE)]


def pick_slice(reference: np.ndarray, prediction: np.ndarray, cls: int) -> int:
    """The axial slice (last axis) to show class ``cls`` on: the one with the most reference voxels of it,
    else (the class absent from the reference) the one with the most predicted voxels; the first on ties.

    Args:
        reference: the reference label map (X, Y, Z).
        prediction: the predicted label map, same shape.
        cls: the class id.

    Returns:
        The slice index along the last axis.

    Raises:
        ValueError: the class is in neither map.
    """
    for volume in (reference, prediction):
        counts = (np.asarray(volume) == cls).sum(axis=(0, 1))
        if counts.any():
            return int(np.argmax(counts))
    raise ValueError(f"class {cls} is neither in the reference nor in the prediction")


def _display(plane: np.ndarray, planar: bool = False) -> np.ndarray:
    """An axial (X, Y) plane of a RAS volume as shown in radiology: patient's right on the left, anterior up; a
    radiograph's plane (column, row), as a viewer shows it: first row at the top, first column on the left."""
    return np.asarray(plane).T if planar else np.asarray(plane).T[::-1, ::-1]


def _mask_rgba(mask: np.ndarray, colour: str) -> np.ndarray:
    """A transparent RGBA image, ``colour`` (half opaque) where ``mask`` is set."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = (*to_rgba(colour)[:3], MASK_ALPHA)
    return rgba


@dataclass
class OverlayRow:
    """One row of a case's figure.

    Attributes:
        name: the class's name.
        cls: its id (picks its colour).
        slice_index: the axial slice shown.
        dice: the class's Dice on the case (None: not scorable).
    """

    name: str
    cls: int
    slice_index: int
    dice: float | None


def overlay_rows(reference: np.ndarray, prediction: np.ndarray, classes: Mapping[int, str], dice: Mapping[int, float]) -> list[OverlayRow]:
    """The rows of a case's figure: each class of ``classes`` present in the reference or the prediction, in order.

    Args:
        reference: the reference label map (X, Y, Z), lesions merged as scored.
        prediction: the predicted label map, same shape and merging.
        classes: class id -> name of the classes scored, in display order.
        dice: class id -> Dice on this case (NaN or absent: not scorable).

    Returns:
        The rows.
    """
    rows = []
    for cls, name in classes.items():
        if (reference == cls).any() or (prediction == cls).any():
            d = dice.get(cls)
            rows.append(OverlayRow(name, cls, pick_slice(reference, prediction, cls), None if d is None or math.isnan(d) else float(d)))
    return rows


def plot_case(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, rows: Sequence[OverlayRow], title: str,
              planar: bool | None = None) -> bytes:  # fmt: skip
    """One case's figure: per row, image / reference / prediction on the row's axial slice (a radiograph: its plane).

    Args:
        image: the preprocessed image (X, Y, Z), already windowed and normalised (shown with robust limits).
        reference: the reference label map, same shape.
        prediction: the predicted label map, same shape.
        rows: the rows (`overlay_rows`); none: the middle slice with a note.
        title: the figure's title.
        planar: a radiograph (`preprocessing.radiograph`: (columns, rows, 1)), shown as a viewer shows it; None: an
            image with one plane on its last axis is one.

    Returns:
        The PNG bytes.
    """
    planar = image.shape[-1] == 1 if planar is None else planar
    lo, hi = (float(v) for v in np.percentile(image, ROBUST_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    shown = list(rows) or [OverlayRow("no scored class in the reference or the prediction", -1, image.shape[-1] // 2, None)]
    fig = figures.new_figure((9.0, 3.0 * len(shown) + 0.5))
    axes = fig.subplots(len(shown), 3, squeeze=False)
    for ax_row, row in zip(axes, shown):
        plane = _display(image[..., row.slice_index], planar)
        dice = "" if row.cls < 0 else (f", Dice {row.dice:.3f}" if row.dice is not None else ", Dice not scorable")
        where = "radiograph, as displayed" if planar else f"axial slice {row.slice_index}"
        titles = (f"{row.name}{dice} ({where})", "reference", "prediction")
        for ax, volume, text in zip(ax_row, (None, reference, prediction), titles):
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if volume is not None and row.cls >= 0:
                ax.imshow(_mask_rgba(_display(volume[..., row.slice_index] == row.cls, planar), class_colour(row.cls)), interpolation="nearest")
            ax.set_title(text, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figures.png_bytes(fig)


def write_case(path: Path, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, rows: Sequence[OverlayRow], title: str) -> None:
    """Draw one case's figure (`plot_case`) into ``path``, atomically.

    Args:
        path: the PNG file (its folder is created).
        image: the image (X, Y, Z).
        reference: the reference label map.
        prediction: the predicted label map.
        rows: the rows.
        title: the figure's title.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, plot_case(image, reference, prediction, rows, title))
