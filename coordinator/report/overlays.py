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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedimg_core.reporting import Section
from fedimg_core.reporting.overlays import (  # noqa: F401 - the case figure lives in the reporting layer; its names stay importable here
    MASK_ALPHA,
    PALETTE,
    ROBUST_PERCENTILES,
    OverlayRow,
    class_colour,
    overlay_rows,
    pick_slice,
    plot_case,
    write_case,
)

OVERLAYS_DIR = "overlays"  # inside the run's report folder
SECTION_TITLE = "Out-of-federation examples (best global model)"
SECTION_TEXT = (
    "The best global model on the first cases of the out-of-federation dataset (the coordinator's own data: the sites' "
    "images never leave them). One row per scored class present in the reference or the prediction, on the axial slice "
    "with the most reference voxels of that class (else the most predicted voxels): the image, the reference and the "
    "prediction in colour over it, and the class's Dice on that case. Lesions are merged into their organ when the "
    "evaluation scored them so."
)


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
