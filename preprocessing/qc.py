"""The QC report of a prepared dataset: one PNG per case and one HTML summary page.

``write_report`` writes ``<root>/qc/<case_id>.png`` for every case of the manifest (drawn by
`preprocessing.qc_figure.case_figure`) and ``<root>/qc/index.html``: counts, the case table
(geometry, flags, label volumes per class in mL, thumbnail) and the refused inputs (source
hash and reason code).

Nothing identifying a patient may appear in these outputs, so they are built only from
allowlisted fields, each checked against a strict pattern before use: case ids, numbers,
schema class names and short codes (QC flags, reason codes). Free text (a refused input's
``message``, DICOM header values, paths) is never read into the report, and the PNGs carry
no text metadata chunk.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

from fedimg_core import atomic
from fedimg_core.reporting import render
from preprocessing.parallel import ordered_map
from preprocessing.qc_figure import (  # noqa: F401 - re-exported: the QC API has always been this module
    CT_WINDOW,
    FIGURE_SIZE,
    IGNORE_COLOUR,
    OVERLAY_ALPHA,
    PERCENTILES,
    STRIP_SLICES,
    VIEW_TITLES,
    _fmt,
    _load_canonical,
    _safe_case_id,
    _views,
    _voxel_ml,
    case_figure,
    class_colour,
    label_volumes_ml,
    strip_positions,
)
from preprocessing.schema import LabelSchema

_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HASH = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODALITY = re.compile(r"^[A-Za-z0-9]{1,16}$")
_AXIS_LETTERS = set("RLAPSI")


def _safe_code(code: Any) -> str:
    return code if isinstance(code, str) and _CODE.match(code) else "invalid_code"


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


def write_report(
    dataset_root: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    schema: LabelSchema,
    *,
    progress: Callable[[int, int], Any] | None = None,
    jobs: int = 1,
) -> Path:
    """Write the QC report of a prepared dataset: a PNG per case and an HTML index.

    Writes ``<dataset_root>/qc/<case_id>.png`` for every case of ``manifest`` and
    ``<dataset_root>/qc/index.html``. A PNG newer than both its image and its label is kept as
    is (fast re-runs). A case whose figure cannot be rendered (missing or unreadable file,
    label on another grid) is listed with ``render_failed`` and no thumbnail instead of
    stopping the report. Every value shown is checked against an allowlist pattern (case ids,
    codes, numbers, schema class names) and HTML-escaped; refused inputs are shown by source
    hash and reason code only, never by message.

    Args:
        dataset_root: the dataset folder.
        manifest: its parsed manifest.json.
        schema: the federation's label schema (class names, ids and colours).
        progress: called as ``progress(done, total)`` after each case.
        jobs: cases drawn at once, each in a worker process (`preprocessing.parallel.ordered_map`).

    Returns:
        The path of ``index.html``.
    """
    root = Path(dataset_root)
    qc_dir = root / "qc"
    qc_dir.mkdir(parents=True, exist_ok=True)
    modality = manifest.get("modality")
    modality = modality if isinstance(modality, str) and _MODALITY.match(modality) else "unknown"
    cases = [c for c in (manifest.get("cases") or []) if isinstance(c, Mapping)]
    refused = [r for r in (manifest.get("refused") or []) if isinstance(r, Mapping)]
    id_to_name = {cid: name for name, cid in schema.classes.items()}
    labeled_ids = sorted(
        {int(i) for i in (manifest.get("labeled_classes") or []) if isinstance(i, int) and not isinstance(i, bool) and i in id_to_name and i != 0}
    )

    rows: list[dict[str, Any]] = []
    total = len(cases)
    work = [_RowJob(root, qc_dir, dict(case), schema, modality, n) for n, case in enumerate(cases)]
    for done, row in enumerate(ordered_map(_row_of, work, jobs, on_crash=_row_crashed), start=1):
        rows.append(row)
        if progress is not None:
            progress(done, total)

    columns = sorted(set(labeled_ids) | {schema.classes[n] for r in rows for n in r["volumes"]})
    index = qc_dir / "index.html"
    atomic.write_text(index, _render_html(rows, refused, columns, labeled_ids, schema, modality, manifest))
    return index


@dataclass(frozen=True)
class _RowJob:
    """One case of the report (sent to a worker process with ``jobs``)."""

    root: Path
    qc_dir: Path
    case: dict[str, Any]
    schema: LabelSchema
    modality: str
    n: int


def _row_of(job: _RowJob) -> dict[str, Any]:
    return _case_row(job.root, job.qc_dir, job.case, job.schema, job.modality, job.n)


def _row_crashed(job: _RowJob) -> dict[str, Any]:
    """The row of a case whose drawing process died twice: listed, flagged, without a thumbnail."""
    row = _case_row(job.root, job.qc_dir, {**job.case, "image": None, "label": None}, job.schema, job.modality, job.n)
    row["render"], row["render_error"] = "render_failed", "WorkerCrashed"
    return row


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


def _render_html(
    rows: list[dict[str, Any]],
    refused: list[Mapping[str, Any]],
    columns: list[int],
    labeled_ids: list[int],
    schema: LabelSchema,
    modality: str,
    manifest: Mapping[str, Any],
) -> str:
    """The page (template ``qc.html.j2``) from allowlisted values only; the template escapes them."""
    id_to_name = {cid: name for name, cid in schema.classes.items()}
    flag_totals: dict[str, int] = {}
    for r in rows:
        for f in r["flags"]:
            flag_totals[f] = flag_totals.get(f, 0) + 1
    named = manifest.get("schema")
    schema_info: Mapping[str, Any] = named if isinstance(named, Mapping) else {}
    # The schema named in the manifest, shown only when it is the one we validated against.
    mismatch = bool(schema_info) and (schema_info.get("name"), str(schema_info.get("version"))) != (schema.name, schema.version)
    table_rows = []
    for r in rows:
        cells: list[str | None] = []
        for cid in columns:
            name = id_to_name[cid]
            if name in r["volumes"]:
                cells.append(_fmt_volume(r["volumes"][name]))
            elif cid in labeled_ids and r["has_label"]:
                cells.append("0")
            else:
                cells.append(None)  # not labelled at this site, or no label: no volume, not 0 mL
        table_rows.append({
            **r,
            "css": "failed" if r["render"] else r["status"],
            "volume_cells": cells,
            "png": quote(r["png"]) if r["png"] else None,
            "render_detail": f" ({r['render_error']})" if r.get("render_error") else "",
        })  # fmt: skip
    refused_rows = []
    for ref in refused:  # never the message: it may quote a header or a path
        src = ref.get("source")
        refused_rows.append((src if isinstance(src, str) and _HASH.match(src) else "invalid", _safe_code(ref.get("reason_code"))))
    return render(
        "qc.html.j2",
        title="QC report",
        schema_name=schema.name,
        schema_version=schema.version,
        modality=modality,
        labelled=[id_to_name[i] for i in labeled_ids],
        mismatch=mismatch,
        n_cases=len(rows),
        n_ok=sum(1 for r in rows if r["status"] == "ok"),
        n_flagged=sum(1 for r in rows if r["status"] == "flagged"),
        n_refused=len(refused),
        flag_totals=sorted(flag_totals.items()),
        strip_slices=STRIP_SLICES,
        swatches=[
            (name, "".join(f"{round(c * 255):02x}" for c in class_colour(cid)))
            for name, cid in sorted(schema.classes.items(), key=lambda kv: kv[1])
            if cid != 0
        ],
        volume_columns=[id_to_name[cid] for cid in columns],
        rows=table_rows,
        refused=refused_rows,
    )
