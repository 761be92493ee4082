"""Qualitative overlays of out-of-federation cases (like Figures 5 and 6 of the ConDistFL paper).

`coordinator evaluate` draws, for the first cases of its out-of-federation dataset, one figure per
case with the best global model: one row per scored class present in the reference or the
prediction, columns image / reference / prediction on the axial slice holding the most
reference voxels of that class. Only the coordinator's own out-of-federation data is drawn:
images of the sites never leave them. The figures live in ``<run_dir>/report/overlays/`` and
their paths in the evaluation record (``overlays``); the run report shows them and carries
them over when it rebuilds its folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.colors import to_rgba

from fedimg_core import atomic
from fedimg_core.reporting import Section, figures

OVERLAYS_DIR = "overlays"  # inside the run's report folder
SECTION_TITLE = "Out-of-federation examples (best global model)"
SECTION_TEXT = (
    "The best global model on the first cases of the out-of-federation dataset (the coordinator's own data: the sites' "
    "images never leave them). One row per scored class present in the reference or the prediction, on the axial slice "
    "with the most reference voxels of that class (else the most predicted voxels): the image, the reference and the "
    "prediction in colour over it, and the class's Dice on that case. Lesions are merged into their organ when the "
    "evaluation scored them so."
)
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


def overlay_name(case: int, dataset: str | None = None) -> str:
    """The file name of case ``case``'s overlay (1-based order in the dataset).

    Args:
        case: the case's order number, from 1.
        dataset: the evaluated dataset's file-safe name (`coordinator.runs.safe_name`), so that evaluating another
            out-of-federation set does not overwrite these figures; None: the name of evaluations before it was added.

    Returns:
        ``oof_<dataset>_case<case>.png`` (``oof_case<case>.png`` without a dataset).
    """
    return f"oof_{dataset}_case{case}.png" if dataset else f"oof_case{case}.png"


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


def _display(plane: np.ndarray) -> np.ndarray:
    """An axial (X, Y) plane of a RAS volume as shown in radiology: patient's right on the left, anterior up."""
    return np.asarray(plane).T[::-1, ::-1]


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


def plot_case(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, rows: Sequence[OverlayRow], title: str) -> bytes:
    """One case's figure: per row, image / reference / prediction on the row's axial slice.

    Args:
        image: the preprocessed image (X, Y, Z), already windowed and normalised (shown with robust limits).
        reference: the reference label map, same shape.
        prediction: the predicted label map, same shape.
        rows: the rows (`overlay_rows`); none: the middle slice with a note.
        title: the figure's title.

    Returns:
        The PNG bytes.
    """
    lo, hi = (float(v) for v in np.percentile(image, ROBUST_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    shown = list(rows) or [OverlayRow("no scored class in the reference or the prediction", -1, image.shape[-1] // 2, None)]
    fig = figures.new_figure((9.0, 3.0 * len(shown) + 0.5))
    axes = fig.subplots(len(shown), 3, squeeze=False)
    for ax_row, row in zip(axes, shown):
        plane = _display(image[..., row.slice_index])
        dice = "" if row.cls < 0 else (f", Dice {row.dice:.3f}" if row.dice is not None else ", Dice not scorable")
        titles = (f"{row.name}{dice} (axial slice {row.slice_index})", "reference", "prediction")
        for ax, volume, text in zip(ax_row, (None, reference, prediction), titles):
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if volume is not None and row.cls >= 0:
                ax.imshow(_mask_rgba(_display(volume[..., row.slice_index] == row.cls), class_colour(row.cls)), interpolation="nearest")
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


def caption(entry: Mapping[str, Any], dataset: str) -> str:
    """The one-line caption of an overlay in the report: case order number, Dice per class.

    Args:
        entry: the overlay's entry in the evaluation record (``case``, ``dice``).
        dataset: the dataset's name.

    Returns:
        The caption.
    """
    raw = entry.get("dice")
    dice: dict[str, Any] = raw if isinstance(raw, dict) else {}
    scores = ", ".join(f"{c} {v:.3f}" if isinstance(v, (int, float)) else f"{c} (not scorable)" for c, v in dice.items())
    return f"{dataset}, case {entry.get('case', '?')}: " + (f"Dice {scores}" if scores else "no scored class in the reference or the prediction")


@dataclass
class Overlay:
    """An overlay the report shows.

    Attributes:
        source: the PNG file (in the run's current report folder).
        name: its path relative to the report folder.
        caption: its caption.
    """

    source: Path
    name: str
    caption: str


def report_overlays(run_dir: Path, report_dir: str = "report") -> list[Overlay]:
    """The overlays recorded by the run's evaluation files whose PNG exists, in file order.

    A path recorded by several evaluations (each evaluation writes ``oof_case<j>.png``) is shown
    once, with the newest evaluation's caption: the file holds that one's figure.

    Args:
        run_dir: the run directory.
        report_dir: the report folder's name in the run directory.

    Returns:
        The overlays (none for runs evaluated before overlays existed).
    """
    folder = Path(run_dir) / "evaluations"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the report's reader says so
        if isinstance(data, dict) and isinstance(data.get("overlays"), list):
            records.append((path.stat().st_mtime, path, data))
    newest: dict[str, tuple[float, str]] = {}  # path -> the newest record listing it (mtime, then file name)
    for mtime, path, data in records:
        for e in data["overlays"]:
            if isinstance(e, dict) and isinstance(e.get("path"), str):
                newest[e["path"]] = max((mtime, path.name), newest.get(e["path"], (mtime, path.name)))
    out = []
    for mtime, path, data in records:
        for e in data["overlays"]:
            rel = e.get("path") if isinstance(e, dict) else None
            if not isinstance(rel, str) or newest.get(rel) != (mtime, path.name):
                continue
            del newest[rel]  # shown once
            name = Path(rel)
            if name.is_absolute() or ".." in name.parts or name.parts[:1] != (report_dir,):
                continue  # not under the report folder: not ours to show
            source = Path(run_dir) / name
            if source.is_file():
                out.append(Overlay(source, Path(*name.parts[1:]).as_posix(), caption(e, str(data.get("dataset") or path.stem))))
    return out


def copy_overlays(overlays: Sequence[Overlay], folder: Path) -> None:
    """Copy the overlays into a report folder being built (the old one is replaced when it is done).

    Args:
        overlays: the overlays (`report_overlays`).
        folder: the new report folder.
    """
    for o in overlays:
        target = folder / o.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(o.source, target)


def overlay_section(overlays: Sequence[Overlay]) -> Section:
    """The report's section showing the overlays, one figure and one caption line each.

    Args:
        overlays: the overlays (`report_overlays`), not empty.

    Returns:
        The section.
    """
    return Section(SECTION_TITLE, [SECTION_TEXT], images=[(o.name, o.caption) for o in overlays])
