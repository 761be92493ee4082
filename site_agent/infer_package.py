"""`site-agent infer --model NAME|FOLDER`: segment scans with a published model package.

Inputs: NIfTI files, DICOM series folders, CR/DX radiograph files (or a folder of them: each
file is an image), prepared datasets, or folders holding any of these (one level: each NIfTI
file and each sub-folder is an input). A radiograph is read as `site-agent prepare` reads it
(`preprocessing.radiograph`: its image plane, display grey levels, pixel spacing) and named
without its ``.dcm``. Per input ``<name>``:

    <out>/<name>.nii.gz              the label on the input's own grid (`pipelines.inference`)
    <out>/<name>.seg.dcm             --dicom-seg: a DICOM SEG referencing the series or the radiograph (DICOM inputs)
    <out>/<name>.statistics.json     --statistics: per class voxels, volume in mL (radiographs: area in cm^2), intensity statistics
    <out>/preview/<name>.png         --preview: three orthogonal views with the label overlaid
    <out>/fedimg-infer.json          what was segmented with which model (``--resume`` reads it)

Every output name is checked before anything is written. An input's outputs are written in a
staging folder inside ``<out>`` and moved into place only when all of them succeeded, so an
input that fails (unreadable, not one series, ...) leaves nothing behind; it is reported on
one line and the others go on; the command exits non-zero when any failed. The record keeps
every input a model segmented into ``<out>``; a record of another model refuses the run
(unless ``--overwrite``). ``--resume`` skips the inputs the record lists as done whose outputs
are all there, and may redo the others. ``--modality`` applies to NIfTI inputs; a DICOM series
uses its own Modality.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from pipelines.adaptation import volumes as V
from pipelines.inference import segment_image
from pipelines.model_package import WEIGHTS_FILE, ModelPackage
from preprocessing.dataset import DatasetError, load_dataset
from preprocessing.dicom import SeriesError, read_header
from preprocessing.radiograph import is_radiograph, load_radiograph
from site_agent.errors import UserError

log = logging.getLogger(__name__)

RECORD = "fedimg-infer.json"
PREVIEW_DIR = "preview"
_NIFTI = (".nii", ".nii.gz")

__all__ = ["InferJob", "expand_inputs", "image_statistics", "run_package_infer"]

Progress = Callable[[int, int, str], None]


@dataclass
class InferJob:
    """One input to segment: its output name, kind (``nifti``, ``dicom``: a series folder, ``radiograph``: one CR/DX file),
    source and modality (None: the series' own)."""

    name: str
    kind: str
    source: Path
    modality: str | None


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI)


def _classify(p: Path, modality: str | None, batch_ok: bool) -> list[InferJob]:
    if (p / "manifest.json").is_file():
        try:
            ds = load_dataset(p)
        except DatasetError as exc:
            raise UserError(f"{p}: {exc}") from None
        return [InferJob(c.case_id, "nifti", Path(c.image), ds.modality) for c in ds.cases]
    if p.is_dir():
        children = [c for c in sorted(p.iterdir()) if not c.name.startswith(".")]
        files = [c for c in children if c.is_file()]
        dicom = [f for f in files if not _is_nifti(f)]
        if dicom and _radiograph_modality(dicom[0]):  # one header decides; a CT series is not read twice
            # a folder of radiographs: each file is an image (PA and lateral too); a file of another kind fails alone
            return [InferJob(_radiograph_stem(f), "radiograph", f, _radiograph_modality(f) or "") for f in dicom]
        if batch_ok and (any(_is_nifti(c) for c in files) or (children and not files)):
            # a folder of inputs: each NIfTI file and each sub-folder (a series or a dataset)
            jobs: list[InferJob] = []
            for c in children:
                if _is_nifti(c) or c.is_dir():
                    jobs += _classify(c, modality, batch_ok=False)
            return jobs
        return [InferJob(_stem(p), "dicom", p, None)]  # a series knows its modality (--modality is for NIfTI files)
    if p.is_file():
        if (radiograph := _radiograph_modality(p)) is not None:
            return [InferJob(_radiograph_stem(p), "radiograph", p, radiograph)]
        if not p.name.endswith(_NIFTI):
            raise UserError(f"{p}: not a NIfTI file (.nii or .nii.gz), a CR/DX radiograph, DICOM series folder or prepared dataset")
        if modality is None:
            raise UserError(f"{p}: a NIfTI input needs --modality (CT or MR)")
        return [InferJob(_stem(p), "nifti", p, modality)]
    raise UserError(f"{p}: no such file or folder")


def _radiograph_modality(p: Path) -> str | None:
    """A DICOM file's modality when it is a projection radiograph (CR, DX), else None (not DICOM, or another modality)."""
    if p.name.endswith(_NIFTI) or not p.is_file():
        return None
    try:
        modality = str(read_header(p).get("Modality", "") or "").upper()
    except Exception:  # noqa: BLE001  # not a DICOM file (or not readable as one): the other input kinds decide
        return None
    return modality if is_radiograph(modality) else None


def _radiograph_stem(p: Path) -> str:
    """A radiograph file's output name: its name without a DICOM suffix (``cxr_001.dcm`` -> ``cxr_001``)."""
    return _stem(p.with_suffix("") if p.suffix.lower() in (".dcm", ".dicom") else p)


def _stem(p: Path) -> str:
    try:
        return V.output_stem(p)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def expand_inputs(inputs: list[str], modality: str | None) -> list[InferJob]:
    """The inputs to segment, one `InferJob` each, with unique output names.

    Args:
        inputs: NIfTI files, DICOM series folders, CR/DX radiograph files or folders of them, prepared datasets, or folders of these.
        modality: CT or MR for NIfTI inputs (DICOM series and datasets know theirs).

    Returns:
        The jobs.

    Raises:
        UserError: an input that does not exist or cannot be read as any of these, or two
            inputs that would write the same output name.
    """
    jobs: list[InferJob] = []
    for item in inputs:
        jobs += _classify(Path(item), modality, batch_ok=True)
    if not jobs:
        raise UserError(f"{', '.join(inputs)}: no NIfTI file, DICOM series or prepared dataset to segment")
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.name in seen:
            raise UserError(f"{seen[job.name]} and {job.source} would both write {job.name}.nii.gz; run them with separate --out folders (or rename one)")
        seen[job.name] = job.source
    return jobs


def image_statistics(image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: dict[str, int], planar: bool = False) -> dict[str, Any]:
    """Per class: voxels, volume in mL (voxels x the voxel volume of the affine) and image intensity statistics inside the class.

    Args:
        image: the input image on its own grid.
        label: the label on the same grid.
        affine: the grid's voxel-to-world affine (mm).
        classes: class name -> label value (background left out).
        planar: a radiograph (one plane; its third axis a singleton): areas in cm^2 (in the image plane, the
            projection's magnification included), no volume.

    Returns:
        ``{"voxel_volume_ml", "classes": {name: {"voxels", "volume_ml", "intensity": {...} | None}}}``; planar:
        ``pixel_area_mm2`` and ``area_cm2`` instead.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    voxel_ml = float(abs(np.linalg.det(matrix))) / 1000.0
    pixel_mm2 = float(np.linalg.norm(np.cross(matrix[:, 0], matrix[:, 1])))
    out: dict[str, Any] = {"pixel_area_mm2": pixel_mm2, "classes": {}} if planar else {"voxel_volume_ml": voxel_ml, "classes": {}}
    for name, value in classes.items():
        mask = label == value
        n = int(mask.sum())
        stats = None
        if n:
            v = image[mask].astype(np.float64)
            p5, median, p95 = (float(x) for x in np.percentile(v, [5, 50, 95]))
            stats = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "p5": p5, "median": median, "p95": p95, "max": float(v.max())}
        size = {"area_cm2": n * pixel_mm2 / 100.0} if planar else {"volume_ml": n * voxel_ml}
        out["classes"][name] = {"voxels": n, **size, "intensity": stats}
    return out


def _targets(out: Path, job: InferJob, dicom_seg: bool, statistics: bool, preview: bool) -> list[Path]:
    paths = [out / f"{job.name}.nii.gz"]
    if dicom_seg and job.kind in ("dicom", "radiograph"):
        paths.append(out / f"{job.name}.seg.dcm")
    if statistics:
        paths.append(out / f"{job.name}.statistics.json")
    if preview:
        paths.append(out / PREVIEW_DIR / f"{job.name}.png")
    return paths


def _model_identity(package: ModelPackage) -> dict[str, Any]:
    return {"ref": package.ref, "weights_sha256": package.config["files"][WEIGHTS_FILE]["sha256"]}


def run_package_infer(
    package: ModelPackage,
    inputs: list[str],
    out: Path,
    *,
    modality: str | None = None,
    dicom_seg: bool = False,
    statistics: bool = False,
    preview: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Segment every input with a model package (see the module docstring for the outputs).

    Args:
        package: the loaded package (`site_agent.models.open_model`).
        inputs: NIfTI files, DICOM series folders, prepared datasets or folders of these.
        out: the output folder (created).
        modality: CT or MR for NIfTI inputs.
        dicom_seg: also write a DICOM SEG for DICOM series inputs.
        statistics: also write per-class volume and intensity statistics.
        preview: also write a PNG overlay per input.
        overwrite: replace outputs already in `out`.
        resume: skip inputs `out`'s record lists as done with this model.
        progress: called as ``progress(done, total, name)`` after each input.

    Returns:
        (one row per segmented input, one ``{"input", "error"}`` per failed input).

    Raises:
        UserError: before anything is written: bad inputs, clashing names, outputs already
            there (without `overwrite` or `resume`), or a record made by another model.
    """
    jobs = expand_inputs(inputs, modality)
    if dicom_seg and not any(j.kind in ("dicom", "radiograph") for j in jobs):
        raise UserError("--dicom-seg needs DICOM input (a series folder or CR/DX radiographs)")
    schema = package.schema
    for job in jobs:
        if job.modality and job.modality not in schema.modalities:  # "": a file in a folder of radiographs that is none (fails alone)
            raise UserError(f"{job.source}: modality {job.modality!r} has no intensity rule in schema {schema.name} ({', '.join(schema.modalities)})")
    identity = _model_identity(package)
    record_path = out / RECORD
    record: dict[str, Any] = {"model": identity, "done": {}}
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{record_path}: unreadable ({exc}); remove it or choose another --out") from None
        same_model = (previous.get("model") or {}).get("weights_sha256") == identity["weights_sha256"]
        if not same_model and not overwrite:
            raise UserError(
                f"{record_path}: the outputs there were made with model {(previous.get('model') or {}).get('ref')}, not {package.ref}; "
                "choose another --out (or --overwrite to replace them)"
            )
        if same_model:  # the record keeps every input this model segmented here
            record["done"] = {k: v for k, v in (previous.get("done") or {}).items() if isinstance(v, dict)}
    elif resume:
        log.warning("%s: no record of an earlier run there; segmenting every input", out)
    targets = {j.name: _targets(out, j, dicom_seg, statistics, preview) for j in jobs}
    done = {j.name for j in jobs if resume and j.name in record["done"] and all(t.is_file() for t in targets[j.name])}
    todo = [j for j in jobs if j.name not in done]
    if not overwrite:
        # An earlier run's label may be another patient's under the same name: never replace it silently. With
        # --resume, an input this model began here (its record is this model's) may be redone.
        ours = set(record["done"]) if resume else set()
        existing = [t for j in todo if j.name not in ours for t in targets[j.name] if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more output(s) of this run)" if len(existing) > 1 else ""
            raise UserError(
                f"{existing[0]} already exists{more}; pass --overwrite to replace it, --resume to go on with an interrupted run, or choose another --out"
            )
    if done:
        log.info("resuming: %d of %d input(s) already segmented with %s", len(done), len(jobs), package.ref)
    out.mkdir(parents=True, exist_ok=True)
    classes = {k: v for k, v in package.class_ids.items() if v != 0}
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for i, job in enumerate(todo, 1):
        start = time.perf_counter()
        # every output of an input is written in a staging folder and moved into place only when all succeeded:
        # a failing input leaves nothing behind
        staging = Path(tempfile.mkdtemp(prefix=".fedimg-infer-", dir=out))
        try:
            row = _segment_one(package, job, staging, classes, dicom_seg, statistics, preview)
            for target in targets[job.name]:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / target.relative_to(out), target)
        except Exception as exc:  # noqa: BLE001 - one bad input never stops the others (MONAI wraps reader errors as RuntimeError)
            message = " ".join(str(exc).split())[:500] or type(exc).__name__
            failures.append({"input": str(job.source), "error": message})
            log.error("%s: %s", job.source, message)
        else:
            row = {k: (str(out / Path(v).relative_to(staging)) if isinstance(v, str) and v.startswith(str(staging)) else v) for k, v in row.items()}
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            record["done"][job.name] = {"input": str(job.source), "outputs": [str(t.relative_to(out)) for t in targets[job.name]]}
            atomic.write_json(record_path, record)
            log.info("%d/%d %s: %s (%.1f s)", i, len(todo), job.name, row["label"], row["seconds"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if progress:
            progress(i, len(todo), job.name)
    return rows, failures


def _segment_one(package: ModelPackage, job: InferJob, out: Path, classes: dict[str, int], dicom_seg: bool, statistics: bool, preview: bool) -> dict[str, Any]:
    if job.kind == "dicom":
        files = sorted(f for f in job.source.rglob("*") if f.is_file() and not f.name.startswith("."))
        image, series_modality, sources = V.series_image(files)
        modality = series_modality
        pred = segment_image(package.network, package.settings, image, modality)
        pred.sources = sources
    elif job.kind == "radiograph":
        if not job.modality:  # a file beside radiographs that is not one
            raise ValueError(f"{job.source}: not a CR/DX radiograph (its folder holds radiographs: one image per file)")
        modality = job.modality
        pred = segment_image(package.network, package.settings, _radiograph_image(job.source), modality)
    else:
        assert job.modality is not None  # expand_inputs: a NIfTI job has its dataset's modality or --modality
        modality = job.modality
        pred = segment_image(package.network, package.settings, job.source, modality)
    target = out / f"{job.name}.nii.gz"
    pred.save_nifti(target)
    row: dict[str, Any] = {
        "input": str(job.source),
        "label": str(target),
        "modality": modality,
        "voxels": {n: int((pred.label == v).sum()) for n, v in classes.items()},
    }
    if dicom_seg and job.kind == "radiograph":
        seg_path = out / f"{job.name}.seg.dcm"
        V.write_radiograph_seg(pred.label, job.source, {v: n for n, v in classes.items()}, seg_path, package.schema,
                               algorithm_name=f"fedimg {package.config['name']}", algorithm_version=package.version or "unpublished",
                               series_description=f"fedimg {package.ref}"[:64])  # fmt: skip
        row["dicom_seg"] = str(seg_path)
    elif dicom_seg and job.kind == "dicom":
        seg_path = out / f"{job.name}.seg.dcm"
        assert pred.sources is not None
        V.write_dicom_seg(pred.label, pred.sources, {v: n for n, v in classes.items()}, seg_path, package.schema,
                          algorithm_name=f"fedimg {package.config['name']}", algorithm_version=package.version or "unpublished",
                          series_description=f"fedimg {package.ref}"[:64])  # fmt: skip
        row["dicom_seg"] = str(seg_path)
    image_array = np.asanyarray(pred.reference.dataobj).astype(np.float32)
    image_array = image_array[..., 0] if image_array.ndim == 4 else image_array
    if statistics:
        planar = job.kind == "radiograph"
        stats = {"input": job.name, "model": package.ref, "modality": modality, **image_statistics(image_array, pred.label, pred.affine, classes, planar)}
        stats_path = out / f"{job.name}.statistics.json"
        atomic.write_json(stats_path, stats)
        row["statistics"] = str(stats_path)
    if preview:
        row["preview"] = str(_write_preview(out, job.name, image_array, pred, package, modality))
    return row


def _radiograph_image(path: Path) -> nib.Nifti1Image:
    """A CR/DX file as `site-agent prepare` converts it: its image plane (columns, rows, 1), grey levels through DICOM's display
    pipeline in [0, 1], its pixel spacing (`preprocessing.radiograph.load_radiograph`).

    Raises:
        ValueError: naming the file, for a radiograph prepare would refuse (its code's reason).
    """
    try:
        radiograph = load_radiograph(path, read_header(path))
    except SeriesError as exc:
        raise ValueError(str(exc)) from None
    image = nib.Nifti1Image(radiograph.array, radiograph.affine_ras)
    image.set_qform(radiograph.affine_ras, code=1)
    image.set_sform(radiograph.affine_ras, code=1)
    return image


def _write_preview(out: Path, name: str, image: np.ndarray, pred: Any, package: ModelPackage, modality: str) -> Path:
    """The QC figure of `site-agent prepare` (`preprocessing.qc_figure.case_figure`) of the input with its predicted label."""
    from preprocessing.qc_figure import case_figure  # deferred: matplotlib

    target = out / PREVIEW_DIR / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedimg-preview-") as tmp:
        image_path, label_path = Path(tmp) / "image.nii.gz", Path(tmp) / "label.nii.gz"
        nib.save(nib.Nifti1Image(image, pred.affine), str(image_path))
        pred.save_nifti(label_path)
        png = Path(tmp) / "preview.png"
        case_figure(image_path, label_path, png, package.schema, modality=modality, case_id=name)
        atomic.write_bytes(target, png.read_bytes())
    return target
