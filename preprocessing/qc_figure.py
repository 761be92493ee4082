"""The QC figure of one case, and label volumes: what `preprocessing.qc` puts in its report.

``case_figure`` renders a case as three large orthogonal slices (axial, coronal, sagittal)
through its label and, below them, a strip of ``STRIP_SLICES`` slices per view spread over the
label's extent (the middle 80% of the volume without a label), so a label can be judged
through its whole depth, not on one slice; all in **radiological convention** (patient's right
on the left of the axial and coronal views, anterior on the left of the sagittal view), with
the physical aspect ratio of the voxel spacing, a display window (CT: soft tissue W400 L40;
other modalities: 1st-99th percentile) and the label overlaid in one fixed colour per schema
class. The PNG carries no text metadata chunk; its title holds only a safe case id, shape and spacing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, cast

import nibabel as nib
import numpy as np
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from fedimg_core.reporting import figures
from preprocessing.radiograph import RADIOGRAPH_MODALITIES
from preprocessing.schema import LabelSchema

# One fixed colour per schema class id (Trubetskoy's "20 distinct colours"), cycling
# beyond 20, so a class has the same colour in every case and at every site.
# fmt: off
_PALETTE = [
    (230, 25, 75), (255, 225, 25), (60, 180, 75), (245, 130, 48), (0, 130, 200),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]
# fmt: on
IGNORE_COLOUR = (1.0, 1.0, 1.0)
OVERLAY_ALPHA = 0.4
CT_WINDOW = (40.0, 400.0)  # level, width (HU): soft tissue
PERCENTILES = (1.0, 99.0)  # display window of non-CT modalities
VIEW_TITLES = ("axial (R on left)", "coronal (R on left)", "sagittal (A on left)")
STRIP_SLICES = 7  # slices per view in the strips under the main views
FIGURE_SIZE = (16.0, 13.0)  # inches at 100 dpi: 1600 px wide, the main views ~500 px each
# Screen edges (left, right, top, bottom) of each view, drawn on the panels.
_EDGES = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def class_colour(class_id: int) -> tuple[float, float, float]:
    """The overlay colour of a schema class id (``IGNORE_COLOUR`` is for the ignore label).

    Args:
        class_id: a foreground class id.

    Returns:
        (r, g, b) in [0, 1]: one fixed colour per id, cycling after 20.
    """
    r, g, b = _PALETTE[(int(class_id) - 1) % len(_PALETTE)]
    return (r / 255.0, g / 255.0, b / 255.0)


def _safe_case_id(case_id: Any) -> str | None:
    return case_id if isinstance(case_id, str) and _CASE_ID.match(case_id) else None


# ---------------------------------------------------------------------------- volumes


def _voxel_ml(spacing: Sequence[float]) -> float:
    sx, sy, sz = (float(s) for s in spacing)
    return sx * sy * sz / 1000.0


def _class_counts(label_array: np.ndarray) -> dict[int, int]:
    arr = np.asarray(label_array)
    if arr.dtype == np.uint8:
        counts = np.bincount(arr.ravel(), minlength=256)
        return {int(v): int(c) for v, c in enumerate(counts) if c}
    if not np.issubdtype(arr.dtype, np.integer):
        arr = np.rint(arr)
    values, counts = np.unique(arr, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def label_volumes_ml(label_array: np.ndarray, spacing: Sequence[float], schema: LabelSchema) -> dict[str, float]:
    """Volume in mL of each foreground schema class present in a label volume.

    Background, the ignore label and values that are not schema ids are left out.

    Args:
        label_array: the label volume in schema ids.
        spacing: voxel spacing, three values in mm.
        schema: the federation's label schema.

    Returns:
        Class name -> voxel count times the voxel volume, ordered by class id.
    """
    counts = _class_counts(label_array)
    voxel = _voxel_ml(spacing)
    out: dict[str, float] = {}
    for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1]):
        if cid != 0 and counts.get(cid, 0) > 0:
            out[name] = counts[cid] * voxel
    return out


# ---------------------------------------------------------------------------- rendering


def _load_canonical(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Array (3D, RAS+ voxel axes) and voxel spacing (mm) of a NIfTI file."""
    img = nib.as_closest_canonical(nib.load(str(path)))  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:  # a 4D file: its first volume
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got {data.ndim} dimensions")
    zooms = img.header.get_zooms()
    return data, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _slice_centre(label: np.ndarray | None, schema: LabelSchema, spacing: Sequence[float], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The labelled voxel nearest to the label's centre of mass (so that every view shows
    label even when the centre falls between two organs), or the volume centre."""
    if label is not None:
        fg = _foreground(label, schema)
        if fg.any():
            coords = np.nonzero(fg)
            com = [c.mean() for c in coords]
            d2 = sum(((c - m) * s) ** 2 for c, m, s in zip(coords, com, spacing))
            k = int(np.argmin(d2))
            return int(coords[0][k]), int(coords[1][k]), int(coords[2][k])
    i, j, k = shape
    return i // 2, j // 2, k // 2


def _views(volume: np.ndarray, centre: tuple[int, int, int], spacing: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """(2D display array, aspect) of the axial, coronal and sagittal slices through
    ``centre`` of a RAS+ volume, oriented for display with row 0 at the top and column 0
    on the left: R on the left and A/S at the top; A on the left of the sagittal view.
    ``aspect`` is the height/width of one pixel (row spacing / column spacing)."""
    i, j, k = centre
    sx, sy, sz = spacing
    # In RAS+ every slice is (+x or +y, +y or +z); transposing puts the second axis on
    # rows, and flipping both puts its high end (A or S) at the top and the first axis'
    # high end (R, or A for sagittal) on the left.
    axial = volume[:, :, k].T[::-1, ::-1]
    coronal = volume[:, j, :].T[::-1, ::-1]
    sagittal = volume[i, :, :].T[::-1, ::-1]
    return [(axial, sy / sx), (coronal, sz / sx), (sagittal, sz / sy)]


def _foreground(label: np.ndarray, schema: LabelSchema) -> np.ndarray:
    ids = [cid for cid in schema.classes.values() if cid != 0]
    if label.dtype == np.uint8:  # a lookup table is ~10x faster than isin on a CT volume
        lut = np.zeros(256, dtype=bool)
        lut[ids] = True
        mask: np.ndarray = lut[label]
        return mask
    return np.isin(label, ids)


def strip_positions(label: np.ndarray | None, schema: LabelSchema, shape: Sequence[int], n: int = STRIP_SLICES) -> list[list[int]]:
    """Slice indices of the axial (k), coronal (j) and sagittal (i) strips: ``n`` evenly
    spread from the first to the last labelled slice along each view's axis, or over the
    middle 80% of the volume when there is no (or an empty) label.

    Args:
        label: the label volume (RAS+ voxel axes) or None.
        schema: gives the foreground class ids.
        shape: the volume's shape (i, j, k).
        n: slices per view (fewer when the extent is thinner).

    Returns:
        Three sorted lists of distinct indices: axial (along k), coronal (j), sagittal (i).
    """
    fg = _foreground(label, schema) if label is not None else None
    out = []
    for axis in (2, 1, 0):
        size = int(shape[axis])
        if fg is not None and fg.any():
            other = tuple(a for a in range(3) if a != axis)
            hits = np.nonzero(fg.any(axis=other))[0]
            lo, hi = int(hits[0]), int(hits[-1])
        else:
            lo, hi = int(round(0.1 * (size - 1))), int(round(0.9 * (size - 1)))
        out.append(sorted({int(v) for v in np.round(np.linspace(lo, hi, max(1, n)))}))
    return out


def _slice2d(volume: np.ndarray, view: int, index: int) -> np.ndarray:
    """One display slice of a RAS+ volume, oriented as in ``_views`` (view 0 axial, 1 coronal, 2 sagittal)."""
    if view == 0:
        return volume[:, :, index].T[::-1, ::-1]
    if view == 1:
        return volume[:, index, :].T[::-1, ::-1]
    return volume[index, :, :].T[::-1, ::-1]


def _display_window(image: np.ndarray, modality: str) -> tuple[float, float]:
    if modality.upper() == "CT":
        level, width = CT_WINDOW
        return level - width / 2, level + width / 2
    step = max(1, round((image.size / 2_000_000) ** (1 / 3)))  # percentiles of a ~2M-voxel subsample
    sample = np.asarray(image[::step, ::step, ::step], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _overlay_rgba(label2d: np.ndarray, schema: LabelSchema) -> np.ndarray:
    rgba = np.zeros(label2d.shape + (4,), dtype=np.float32)
    for cid in np.unique(label2d):
        cid = int(cid)
        if cid == schema.ignore_label:
            colour = IGNORE_COLOUR
        elif cid != 0 and cid in schema.classes.values():
            colour = class_colour(cid)
        else:
            continue
        mask = label2d == cid
        rgba[mask, :3] = colour
        rgba[mask, 3] = OVERLAY_ALPHA
    return rgba


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def case_figure(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str] | None,
    out_png: str | os.PathLike[str],
    schema: LabelSchema,
    modality: str = "CT",
    case_id: str = "",
) -> None:
    """Write a case's QC figure: three orthogonal views through its label, and strips.

    The axial, coronal and sagittal slices of the image (with the label overlaid when
    ``label_path`` is given) go through the labelled voxel nearest to the label's centre of
    mass, or through the volume centre without (or with an empty) label; below them, strips
    of `STRIP_SLICES` slices per view across the label's extent.

    Radiological convention throughout (R on the left of axial/coronal, A on the left of
    sagittal; each panel is titled so and its edges lettered), pixels drawn with the
    physical aspect ratio of the voxel spacing; CT in a soft-tissue window (W400 L40), other
    modalities between their 1st and 99th percentiles; one fixed colour per schema class
    (`class_colour`) at alpha 0.4 with a legend of the classes present in the volume.
    The title holds only the case id (when it is a safe token), shape and spacing. The
    file is written atomically and has no text metadata chunk.

    Args:
        image_path: the image (NIfTI).
        label_path: its label in schema ids (NIfTI), or None.
        out_png: the PNG to write.
        schema: the federation's label schema.
        modality: the image's modality (CT gets the soft-tissue window).
        case_id: shown in the title when it is a safe token.

    Raises:
        ValueError: a volume is not 3D, or the label's grid differs from the image's.
    """
    image, spacing = _load_canonical(image_path)
    label = None
    if label_path is not None:
        label, _ = _load_canonical(label_path)
        if label.shape != image.shape:
            raise ValueError(f"label grid {label.shape} differs from image grid {image.shape}")
        if not np.issubdtype(label.dtype, np.integer):
            label = np.rint(label).astype(np.int32)
    vmin, vmax = _display_window(image, str(modality))
    if str(modality) in RADIOGRAPH_MODALITIES and image.shape[2] == 1:
        _planar_figure(image, label, spacing, vmin, vmax, out_png, schema, case_id)
        return
    centre = _slice_centre(label, schema, spacing, image.shape)
    image_views = _views(image, centre, spacing)
    label_views = _views(label, centre, spacing) if label is not None else [None, None, None]

    fig = figures.new_figure(FIGURE_SIZE, dpi=100, facecolor="black", layout="constrained")
    # two rows of subfigures come back as an array (matplotlib types the result SubFigure | ndarray)
    main_views, strips = cast(np.ndarray, fig.subfigures(2, 1, height_ratios=[5, 6]))
    main_views.set_facecolor("black")
    strips.set_facecolor("black")
    axes = main_views.subplots(1, 3)
    outline = [withStroke(linewidth=2, foreground="black")]  # edge letters readable on any grey, and colourless
    for n, (ax, (img2d, aspect), lab) in enumerate(zip(axes, image_views, label_views)):
        ax.set_facecolor("black")
        ax.imshow(img2d.astype(np.float32, copy=False), cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="antialiased")
        if lab is not None:
            ax.imshow(_overlay_rgba(lab[0], schema), aspect=aspect, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        index = ("k", "j", "i")[n]
        ax.set_title(f"{VIEW_TITLES[n]}  {index}={centre[2 - n]}", color="white", fontsize=10)
        left, right, top, bottom = _EDGES[n]
        style = dict(color="white", fontsize=9, transform=ax.transAxes, fontweight="bold", path_effects=outline)
        ax.text(0.01, 0.5, left, ha="left", va="center", **style)
        ax.text(0.99, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.99, top, ha="center", va="top", **style)
        ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)

    # One image per strip (slices side by side): three axes instead of 21 keep the layout fast.
    strip_axes = strips.subplots(3, 1)
    for view, (ax, indices) in enumerate(zip(strip_axes, strip_positions(label, schema, image.shape))):
        tiles = [_slice2d(image, view, i).astype(np.float32) for i in indices]
        gap = max(1, tiles[0].shape[1] // 20)
        row = np.concatenate([np.pad(t, ((0, 0), (0, gap)), constant_values=vmin) for t in tiles], axis=1)
        aspect = image_views[view][1]
        ax.imshow(row, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="antialiased")
        if label is not None:
            overlay = np.concatenate([np.pad(_overlay_rgba(_slice2d(label, view, i), schema), ((0, 0), (0, gap), (0, 0))) for i in indices], axis=1)
            ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
        width = tiles[0].shape[1] + gap
        for n, slice_index in enumerate(indices):
            ax.text(n * width + 1, 1, f"{('k', 'j', 'i')[view]}={slice_index}", color="white", fontsize=8, va="top", ha="left", path_effects=outline)
        ax.set_title(f"{VIEW_TITLES[view]}: {len(indices)} slices across the label", color="white", fontsize=10)

    _title_and_legend(fig, image, label, spacing, schema, case_id)
    figures.write_png(out_png, fig, dpi=100, tight=False)  # no text metadata chunk


def _planar_figure(
    image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], vmin: float, vmax: float, out_png: str | os.PathLike[str],
    schema: LabelSchema, case_id: str,
) -> None:  # fmt: skip
    """A radiograph's QC figure: the image as a viewer displays it (first row at the top, first column on the
    left; `preprocessing.radiograph` stores column x row), the label overlaid."""
    fig = figures.new_figure(FIGURE_SIZE, dpi=100, facecolor="black", layout="constrained")
    ax = fig.subplots(1, 1)
    aspect = spacing[1] / spacing[0]
    ax.set_facecolor("black")
    ax.imshow(image[:, :, 0].T.astype(np.float32, copy=False), cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="antialiased")
    if label is not None:
        ax.imshow(_overlay_rgba(label[:, :, 0].T, schema), aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("radiograph, as displayed (first row at the top)", color="white", fontsize=10)
    _title_and_legend(fig, image, label, spacing, schema, case_id)
    figures.write_png(out_png, fig, dpi=100, tight=False)  # no text metadata chunk


def _title_and_legend(fig: Any, image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], schema: LabelSchema, case_id: str) -> None:
    """The figure's title (safe case id, shape, spacing) and the legend of the classes present."""
    shape = "×".join(str(n) for n in image.shape)
    space = "×".join(_fmt(s) for s in spacing)
    safe_id = _safe_case_id(case_id)
    fig.suptitle(f"{safe_id + '   ' if safe_id else ''}shape {shape}   spacing {space} mm", color="white", fontsize=12)
    if label is not None:
        present = _class_counts(label)
        handles = [
            Patch(facecolor=class_colour(cid), edgecolor="none", label=f"{cid} {name}")
            for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1])
            if cid != 0 and present.get(cid, 0) > 0
        ]
        if present.get(schema.ignore_label, 0) > 0:
            handles.append(Patch(facecolor=IGNORE_COLOUR, edgecolor="none", label=f"{schema.ignore_label} ignore"))
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), frameon=False, labelcolor="white", fontsize=9)
        else:
            fig.text(0.5, 0.01, "label empty", color="white", ha="center", va="bottom", fontsize=9)
