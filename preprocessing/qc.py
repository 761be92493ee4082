"""The QC report of a prepared dataset: one PNG per case and one HTML summary page.

* ``case_figure`` renders a case as three large orthogonal slices (axial, coronal,
  sagittal) through its label and, below them, a strip of ``STRIP_SLICES`` slices per view
  spread over the label's extent (the middle 80% of the volume without a label), so a
  label can be judged through its whole depth, not on one slice; all in **radiological
  convention** (patient's right on the left of the axial and coronal views, anterior on
  the left of the sagittal view), with the physical aspect ratio of the voxel spacing, a
  display window (CT: soft tissue W400 L40; other modalities: 1st-99th percentile) and the
  label overlaid in one fixed colour per schema class.
* ``write_report`` writes ``<root>/qc/<case_id>.png`` for every case of the manifest and
  ``<root>/qc/index.html``: counts, the case table (geometry, flags, label volumes per class
  in mL, thumbnail) and the refused inputs (source hash and reason code).

Nothing identifying a patient may appear in these outputs, so they are built only from
allowlisted fields, each checked against a strict pattern before use: case ids, numbers,
schema class names and short codes (QC flags, reason codes). Free text (a refused input's
``message``, DICOM header values, paths) is never read into the report, and the PNGs carry
no text metadata chunk.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from preprocessing.schema import LabelSchema

# One fixed colour per schema class id (Trubetskoy's "20 distinct colours"), cycling
# beyond 20, so a class has the same colour in every case and at every site.
_PALETTE = [
    (230, 25, 75), (255, 225, 25), (60, 180, 75), (245, 130, 48), (0, 130, 200),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]
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
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HASH = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODALITY = re.compile(r"^[A-Za-z0-9]{1,16}$")
_AXIS_LETTERS = set("RLAPSI")


def class_colour(class_id: int) -> tuple[float, float, float]:
    """The overlay colour (RGB in [0, 1]) of a schema class id; ``IGNORE_COLOUR`` is for the ignore label."""
    r, g, b = _PALETTE[(int(class_id) - 1) % len(_PALETTE)]
    return (r / 255.0, g / 255.0, b / 255.0)


def _safe_case_id(case_id: Any) -> str | None:
    return case_id if isinstance(case_id, str) and _CASE_ID.match(case_id) else None


def _safe_code(code: Any) -> str:
    return code if isinstance(code, str) and _CODE.match(code) else "invalid_code"


# ---------------------------------------------------------------------------- volumes


def _voxel_ml(spacing) -> float:
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


def label_volumes_ml(label_array: np.ndarray, spacing, schema: LabelSchema) -> dict[str, float]:
    """Volume in mL of each foreground schema class present in ``label_array`` (voxel count
    times the voxel volume from ``spacing``, three values in mm), ordered by class id.
    Background, the ignore label and values that are not schema ids are left out."""
    counts = _class_counts(label_array)
    voxel = _voxel_ml(spacing)
    out: dict[str, float] = {}
    for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1]):
        if cid != 0 and counts.get(cid, 0) > 0:
            out[name] = counts[cid] * voxel
    return out


# ---------------------------------------------------------------------------- rendering


def _load_canonical(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Array (3D, RAS+ voxel axes) and voxel spacing (mm) of a NIfTI file."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:  # a 4D file: its first volume
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got {data.ndim} dimensions")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, spacing  # type: ignore[return-value]


def _slice_centre(label: np.ndarray | None, schema: LabelSchema, spacing, shape) -> tuple[int, int, int]:
    """The labelled voxel nearest to the label's centre of mass (so that every view shows
    label even when the centre falls between two organs), or the volume centre."""
    if label is not None:
        fg = _foreground(label, schema)
        if fg.any():
            coords = np.nonzero(fg)
            com = [c.mean() for c in coords]
            d2 = sum(((c - m) * s) ** 2 for c, m, s in zip(coords, com, spacing))
            k = int(np.argmin(d2))
            return tuple(int(c[k]) for c in coords)  # type: ignore[return-value]
    return tuple(n // 2 for n in shape)  # type: ignore[return-value]


def _views(volume: np.ndarray, centre, spacing) -> list[tuple[np.ndarray, float]]:
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
        return lut[label]
    return np.isin(label, ids)


def strip_positions(label: np.ndarray | None, schema: LabelSchema, shape, n: int = STRIP_SLICES) -> list[list[int]]:
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
    image_path,
    label_path,
    out_png,
    schema: LabelSchema,
    modality: str = "CT",
    case_id: str = "",
) -> None:
    """Write ``out_png``: the axial, coronal and sagittal slices of the image (with the
    label overlaid when ``label_path`` is given) through the labelled voxel nearest to the
    label's centre of mass, or through the volume centre without (or with an empty) label.

    Radiological convention throughout (R on the left of axial/coronal, A on the left of
    sagittal; each panel is titled so and its edges lettered), pixels drawn with the
    physical aspect ratio of the voxel spacing; CT in a soft-tissue window (W400 L40), other
    modalities between their 1st and 99th percentiles; one fixed colour per schema class
    (``class_colour``) at alpha 0.4 with a legend of the classes present in the volume.
    The title holds only the case id (when it is a safe token), shape and spacing. The
    file is written atomically and has no text metadata chunk.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.patheffects import withStroke

    image, spacing = _load_canonical(image_path)
    label = None
    if label_path is not None:
        label, _ = _load_canonical(label_path)
        if label.shape != image.shape:
            raise ValueError(f"label grid {label.shape} differs from image grid {image.shape}")
        if not np.issubdtype(label.dtype, np.integer):
            label = np.rint(label).astype(np.int32)
    centre = _slice_centre(label, schema, spacing, image.shape)
    vmin, vmax = _display_window(image, str(modality))
    image_views = _views(image, centre, spacing)
    label_views = _views(label, centre, spacing) if label is not None else [None, None, None]

    fig = Figure(figsize=FIGURE_SIZE, dpi=100, facecolor="black", layout="constrained")
    FigureCanvasAgg(fig)
    main_views, strips = fig.subfigures(2, 1, height_ratios=[5, 6])
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
        for n, index in enumerate(indices):
            ax.text(n * width + 1, 1, f"{('k', 'j', 'i')[view]}={index}", color="white", fontsize=8, va="top", ha="left", path_effects=outline)
        ax.set_title(f"{VIEW_TITLES[view]}: {len(indices)} slices across the label", color="white", fontsize=10)

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

    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor(), metadata={"Software": None})
    atomic.write_bytes(out_png, buf.getvalue())


# ---------------------------------------------------------------------------- report


def _numbers(value: Any, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(float(v))
    return out


def _fmt_volume(ml: float) -> str:
    if ml <= 0:
        return "0"
    return "<0.01" if ml < 0.01 else f"{ml:.2f}"


def _up_to_date(png: Path, *inputs: Path | None) -> bool:
    try:
        t = png.stat().st_mtime_ns
        return all(p is None or t > p.stat().st_mtime_ns for p in inputs)
    except OSError:
        return False


def _inside(root: Path, rel: Any) -> Path | None:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        return None
    path = (root / rel).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: middle; font-size: 0.9em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fff4e0; }
tr.failed td { background: #fde0e0; }
code { background: #f4f4f4; padding: 0 0.2em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: middle; border: 1px solid #999; }
img { display: block; }
"""


def write_report(
    dataset_root,
    manifest: Mapping[str, Any],
    schema: LabelSchema,
    *,
    progress: Callable[[int, int], Any] | None = None,
) -> Path:
    """Write ``<dataset_root>/qc/<case_id>.png`` for every case of ``manifest`` and
    ``<dataset_root>/qc/index.html``; return the index path.

    A PNG newer than both its image and its label is kept as is (fast re-runs). A case
    whose figure cannot be rendered (missing or unreadable file, label on another grid) is
    listed with ``render_failed`` and no thumbnail instead of stopping the report. Every
    value shown is checked against an allowlist pattern (case ids, codes, numbers, schema
    class names) and HTML-escaped; refused inputs are shown by source hash and reason code
    only, never by message. ``progress(done, total)`` is called after each case.
    """
    root = Path(dataset_root)
    qc_dir = root / "qc"
    qc_dir.mkdir(parents=True, exist_ok=True)
    modality = manifest.get("modality")
    modality = modality if isinstance(modality, str) and _MODALITY.match(modality) else "unknown"
    cases = [c for c in (manifest.get("cases") or []) if isinstance(c, Mapping)]
    refused = [r for r in (manifest.get("refused") or []) if isinstance(r, Mapping)]
    id_to_name = {cid: name for name, cid in schema.classes.items()}
    labeled_ids = sorted({int(i) for i in (manifest.get("labeled_classes") or []) if isinstance(i, int) and not isinstance(i, bool) and i in id_to_name and i != 0})

    rows: list[dict[str, Any]] = []
    total = len(cases)
    for done, case in enumerate(cases, start=1):
        row = _case_row(root, qc_dir, case, schema, modality, done - 1)
        rows.append(row)
        if progress is not None:
            progress(done, total)

    columns = sorted(set(labeled_ids) | {schema.classes[n] for r in rows for n in r["volumes"]})
    index = qc_dir / "index.html"
    atomic.write_text(index, _render_html(rows, refused, columns, labeled_ids, schema, modality, manifest))
    return index


def _case_row(root: Path, qc_dir: Path, case: Mapping[str, Any], schema: LabelSchema, modality: str, n: int) -> dict[str, Any]:
    case_id = _safe_case_id(case.get("case_id"))
    flags = [_safe_code(f) for f in (case.get("qc_flags") or []) if f is not None] if isinstance(case.get("qc_flags"), list) else []
    status = case.get("status")
    if status not in ("ok", "flagged"):
        status = "flagged" if flags else "ok"
    shape = _numbers(case.get("shape"), 3)
    spacing = _numbers(case.get("spacing"), 3)
    orientation = case.get("orientation")
    if isinstance(orientation, (list, tuple)) and len(orientation) == 3 and all(isinstance(a, str) and a in _AXIS_LETTERS for a in orientation):
        orientation = "".join(orientation)
    else:
        orientation = "?"
    row: dict[str, Any] = {
        "case_id": case_id or f"invalid_case_id_{n}",
        "status": status,
        "flags": flags,
        "shape": "×".join(str(int(s)) for s in shape) if shape else "?",
        "spacing": "×".join(_fmt(s) for s in spacing) if spacing else "?",
        "orientation": orientation,
        "intensity": "[{}, {}]".format(*(_fmt(v, 7) for v in rng)) if (rng := _numbers(case.get("intensity_range"), 2)) else "?",
        "volumes": {},
        "png": None,
        "render": None,
        "has_label": case.get("label") is not None,
    }
    image = _inside(root, case.get("image"))
    label = _inside(root, case.get("label")) if case.get("label") is not None else None
    if case.get("label") is not None and label is None:
        row["render"] = "label_path_invalid"

    counts = case.get("label_voxels")
    if isinstance(counts, Mapping) and spacing:
        voxel = _voxel_ml(spacing)
        for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1]):
            c = counts.get(name)
            if cid != 0 and isinstance(c, int) and not isinstance(c, bool) and c > 0:
                row["volumes"][name] = c * voxel
    elif label is not None and label.is_file():
        try:
            arr, sp = _load_canonical(label)
            row["volumes"] = label_volumes_ml(arr, sp, schema)
        except Exception as exc:  # noqa: BLE001 - shown as a code, the report goes on
            row["render"] = "label_unreadable"
            row["render_error"] = type(exc).__name__

    if case_id is None:
        row["render"] = "invalid_case_id"
    elif image is None:
        row["render"] = "image_path_invalid"
    elif not image.is_file():
        row["render"] = "image_missing"
    elif label is not None and not label.is_file():
        row["render"] = "label_missing"
    elif row["render"] is None:
        png = qc_dir / f"{case_id}.png"
        if not _up_to_date(png, image, label):
            try:
                case_figure(image, label, png, schema, modality=modality, case_id=case_id)
            except Exception as exc:  # noqa: BLE001 - a code only: messages may carry paths
                row["render"] = "render_failed"
                row["render_error"] = type(exc).__name__
        if row["render"] is None:
            row["png"] = png.name
    return row


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _render_html(rows, refused, columns, labeled_ids, schema: LabelSchema, modality: str, manifest) -> str:
    id_to_name = {cid: name for name, cid in schema.classes.items()}
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    n_flagged = sum(1 for r in rows if r["status"] == "flagged")
    flag_totals: dict[str, int] = {}
    for r in rows:
        for f in r["flags"]:
            flag_totals[f] = flag_totals.get(f, 0) + 1
    schema_info = manifest.get("schema") if isinstance(manifest.get("schema"), Mapping) else {}
    # The schema named in the manifest, shown only when it is the one we validated against.
    sname, sversion = schema.name, schema.version
    mismatch = schema_info and (schema_info.get("name"), str(schema_info.get("version"))) != (schema.name, schema.version)

    out: list[str] = []
    w = out.append
    w("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
    w("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'\">\n")
    w("<title>QC report</title>\n<style>" + _CSS + "</style>\n</head>\n<body>\n<h1>QC report</h1>\n")
    w(f"<p>Schema <code>{_e(sname)}</code> version <code>{_e(sversion)}</code>; modality <code>{_e(modality)}</code>; ")
    w("labelled classes: " + (", ".join(f"<code>{_e(id_to_name[i])}</code>" for i in labeled_ids) or "none") + ".</p>\n")
    if mismatch:
        w("<p><strong>The manifest names another schema than the one this report was built with.</strong></p>\n")

    w("<h2>Summary</h2>\n<table>\n<tr><th>cases</th><th>ok</th><th>flagged</th><th>refused</th></tr>\n")
    w(f"<tr><td class=\"num\">{len(rows)}</td><td class=\"num\">{n_ok}</td><td class=\"num\">{n_flagged}</td><td class=\"num\">{len(refused)}</td></tr>\n</table>\n")
    if flag_totals:
        w("<table>\n<tr><th>flag</th><th>cases</th></tr>\n")
        for f, c in sorted(flag_totals.items()):
            w(f"<tr><td><code>{_e(f)}</code></td><td class=\"num\">{c}</td></tr>\n")
        w("</table>\n")

    w("<h2>Cases</h2>\n<p>Views in radiological convention: patient's right on the left of the axial and coronal views, "
      "anterior on the left of the sagittal view. Click a picture for its full size: the three views through the label, "
      f"and under them {STRIP_SLICES} slices per view from the first to the last labelled slice. Label volumes in mL. Overlay colours: ")
    w(", ".join(
        f"<span class=\"swatch\" style=\"background:#{''.join(f'{round(c * 255):02x}' for c in class_colour(cid))}\"></span>{_e(name)}"
        for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1]) if cid != 0
    ) + ".</p>\n")
    w("<table>\n<tr><th>case</th><th>status</th><th>shape</th><th>spacing (mm)</th><th>orientation</th>"
      "<th>intensity range</th><th>flags</th>")
    for cid in columns:
        w(f"<th>{_e(id_to_name[cid])} (mL)</th>")
    w("<th>slices</th></tr>\n")
    for r in rows:
        cls = "failed" if r["render"] else r["status"]
        w(f"<tr class=\"{_e(cls)}\"><td><code>{_e(r['case_id'])}</code></td><td>{_e(r['status'])}</td>")
        w(f"<td class=\"num\">{_e(r['shape'])}</td><td class=\"num\">{_e(r['spacing'])}</td><td>{_e(r['orientation'])}</td>")
        w(f"<td class=\"num\">{_e(r['intensity'])}</td><td>{' '.join(f'<code>{_e(f)}</code>' for f in r['flags'])}</td>")
        for cid in columns:
            name = id_to_name[cid]
            if name in r["volumes"]:
                w(f"<td class=\"num\">{_e(_fmt_volume(r['volumes'][name]))}</td>")
            elif cid in labeled_ids and r["has_label"]:
                w("<td class=\"num\">0</td>")
            else:
                w("<td class=\"num\">&mdash;</td>")
        if r["png"]:
            href = _e(quote(r["png"]))
            w(f"<td><a href=\"{href}\"><img src=\"{href}\" width=\"480\" loading=\"lazy\" alt=\"{_e(r['case_id'])}\"></a></td>")
        else:
            detail = f" ({r['render_error']})" if r.get("render_error") else ""
            w(f"<td><code>{_e(r['render'])}</code>{_e(detail)}</td>")
        w("</tr>\n")
    w("</table>\n")

    w("<h2>Refused inputs</h2>\n")
    if refused:
        w("<table>\n<tr><th>source (hash)</th><th>reason</th></tr>\n")
        for ref in refused:  # never the message: it may quote a header or a path
            src = ref.get("source")
            src = src if isinstance(src, str) and _HASH.match(src) else "invalid"
            w(f"<tr><td><code>{_e(src)}</code></td><td><code>{_e(_safe_code(ref.get('reason_code')))}</code></td></tr>\n")
        w("</table>\n")
    else:
        w("<p>None.</p>\n")
    w("</body>\n</html>\n")
    return "".join(out)
