"""`site-agent prepare`: a site's DICOM/NIfTI images and labels -> a prepared dataset.

What it does, per case:
  discover inputs -> group DICOM series (preprocessing.dicom) -> pair each image with its
  label (DICOM SEG by the series it references; a NIfTI label by name, see `pair_labels`)
  -> exact geometry, rescale -> remap labels to the federation schema -> check label and
  image share the grid -> canonical RAS+ NIfTI (qform = sform, empty text fields) -> QC.

Re-runs skip unchanged cases (an input fingerprint: source bytes, label map, schema,
converter version, options) and resume after an interruption: each finished case leaves a
record in `<out>/.state/cases/`; manifest.json and dataset.json are written last, atomically,
so a folder without them is never taken for a dataset.

Nothing identifying a patient is written: case ids are sequential, sources are stored as
salted hashes, refusals as reason codes, and every written field comes from an allowlist.
Console messages (local to the site) name the files, so staff can fix them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from preprocessing import atomic
from preprocessing.dataset import CONVERTER_VERSION, FORMAT_NAME, FORMAT_VERSION, sha256_file
from preprocessing.dicom import Discovery, Series, SeriesError, discover, load_series
from preprocessing.labels import read_seg, remap, seg_referenced_series
from preprocessing.nifti import canonical, clean_image, grid_difference_mm, load_nifti, qform_sform_disagree, save_atomic
from preprocessing.schema import LabelSchema, SiteLabelMap

STATE_DIR = ".state"
GRID_TOLERANCE_MM = 0.01
MODALITIES = ("CT", "MR", "PT", "CR", "DX", "US", "OT")
MIN_SLICES_MULTI_ORIENTATION = 16


class PrepareError(Exception):
    """Nothing could be prepared, or the inputs/options are wrong. One line, names the file."""


@dataclass
class PrepareOptions:
    name: str = "dataset"
    modality: str | None = None  # required when inputs are NIfTI only; filters DICOM series otherwise
    tolerance_mm: float = 0.01
    allow_irregular: bool = False
    unknown_labels: str = "error"  # or "ignore": map unknown local values to the ignore label
    grid_tolerance_mm: float = GRID_TOLERANCE_MM
    require_labels: bool = False
    prune: bool = False  # drop cases of earlier runs whose sources were not given this time
    qc_report: bool = True

    def fingerprint(self) -> dict:
        return {
            "tolerance_mm": self.tolerance_mm,
            "allow_irregular": self.allow_irregular,
            "unknown_labels": self.unknown_labels,
            "grid_tolerance_mm": self.grid_tolerance_mm,
        }


@dataclass
class CaseSource:
    kind: str  # "dicom" | "nifti"
    display: str  # for console messages only (a path); never written
    identifiers: list[str]  # hashed with the salt
    files: list[Path]
    series: Series | None = None
    nifti: Path | None = None
    label: Path | None = None
    label_kind: str | None = None  # "nifti" | "seg"
    modality: str = ""


@dataclass
class Outcome:
    source_hash: str
    display: str
    status: str  # "ok" | "flagged" | "refused" | "unchanged"
    case_id: str | None = None
    flags: list[str] = field(default_factory=list)
    code: str = ""
    message: str = ""  # console only


@dataclass
class PrepareResult:
    root: Path
    outcomes: list[Outcome]
    skipped_files: list[tuple[Path, str, str]]
    grouping_notes: list[str]
    report: Path | None = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


Progress = Callable[[str, int, int], None]


def _strip_nii(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _image_stem(name: str) -> str:
    return re.sub(r"_0000$", "", _strip_nii(name))  # nnU-Net channel suffix


def pair_labels(sources: list[CaseSource], label_files: list[Path], segs: list[Path]) -> list[tuple[Path, str, str]]:
    """Attach labels to images; return the labels that matched no image as refusals.

    Rules: a DICOM SEG goes to the series it references; a NIfTI label goes to the NIfTI
    image with the same name (an nnU-Net `_0000` suffix on the image is allowed), or to the
    DICOM series that is alone in a folder of the label's name (``dicom/case_07/`` <->
    ``labels/case_07.nii.gz``).
    """
    unmatched: list[tuple[Path, str, str]] = []
    by_series_uid = {s.series.first.series_uid: s for s in sources if s.series is not None and s.series.first.series_uid}
    by_nifti_stem = {_image_stem(s.nifti.name): s for s in sources if s.nifti is not None}
    folder_counts: dict[Path, int] = {}
    for s in sources:
        if s.series is not None:
            folder_counts[s.series.folder] = folder_counts.get(s.series.folder, 0) + 1
    by_folder = {s.series.folder.name: s for s in sources if s.series is not None and folder_counts[s.series.folder] == 1}

    def attach(src: CaseSource, path: Path, kind: str) -> None:
        if src.label is not None:
            unmatched.append((path, "duplicate_label", f"{path}: a second label for {src.display} (already {src.label})"))
            return
        src.label, src.label_kind = path, kind
        src.files.append(path)

    for seg in segs:
        try:
            uid = seg_referenced_series(seg)
        except SeriesError as exc:
            unmatched.append((seg, exc.code, str(exc)))
            continue
        if uid in by_series_uid:
            attach(by_series_uid[uid], seg, "seg")
        else:
            unmatched.append((seg, "unpaired_label", f"{seg}: DICOM SEG references a series that is not among the inputs"))
    for lab in label_files:
        stem = _strip_nii(lab.name)
        src = by_nifti_stem.get(stem) or by_folder.get(stem)
        if src is None:
            unmatched.append((lab, "unpaired_label", f"{lab}: no image named {stem!r} (NIfTI image of that name or DICOM folder of that name)"))
        else:
            attach(src, lab, "nifti")
    return unmatched


def _salt(out: Path, salt_file: Path | None) -> bytes:
    path = salt_file or out / STATE_DIR / "salt"
    if path.is_file():
        data = path.read_bytes().strip()
        if len(data) < 16:
            raise PrepareError(f"{path}: salt file is shorter than 16 bytes")
        return data
    if salt_file is not None:
        raise PrepareError(f"{salt_file}: salt file not found")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)
    return path.read_bytes().strip()


def _hash(salt: bytes, parts: list[str]) -> str:
    return hashlib.sha256(salt + b"\0" + "\n".join(parts).encode()).hexdigest()[:16]


def _fingerprint(src: CaseSource, context: dict) -> str:
    h = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    for f in sorted(src.files, key=str):
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _orientation(affine: np.ndarray) -> list[str]:
    return list(nib.aff2axcodes(affine))


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in np.sqrt((affine[:3, :3] ** 2).sum(0))]


class _Lock:
    def __init__(self, out: Path):
        self.path = out / STATE_DIR / "lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise PrepareError(f"{self.path.parent.parent}: another prepare is running on this output folder") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def collect_sources(discovery: Discovery, modality: str | None) -> tuple[list[CaseSource], list[tuple[Path, str, str]]]:
    sources: list[CaseSource] = []
    skipped: list[tuple[Path, str, str]] = []
    orientations: dict[str, set] = {}
    for series in discovery.series:
        if series.grouping.startswith("series_uid+split") and series.first.orientation is not None:
            orientations.setdefault(series.first.series_uid, set()).add(tuple(np.round(series.first.orientation, 3)))
    for series in discovery.series:
        first = series.first
        display = f"series in {series.folder} ({len(series.slices)} files)"
        if first.localizer or any(s.localizer for s in series.slices):
            skipped.append((series.folder, "localizer", f"{display}: localizer/scout images, skipped"))
            continue
        if len(orientations.get(first.series_uid, ())) > 1 and 2 <= len(series.slices) < MIN_SLICES_MULTI_ORIENTATION:
            # a few slices per plane in one series: a multi-plane localizer even when its
            # name and ImageType do not say so (de-identification removes the name)
            skipped.append((series.folder, "localizer", f"{display}: part of a multi-orientation series with few slices per plane (a localizer?), skipped"))
            continue
        if modality and first.modality != modality:
            skipped.append((series.folder, "other_modality", f"{display}: modality {first.modality}, not {modality}; skipped"))
            continue
        sources.append(
            CaseSource(
                kind="dicom",
                display=display,
                identifiers=["dicom", *series.source_identifiers()],
                files=[s.path for s in series.slices],
                series=series,
                modality=first.modality,
            )
        )
    for path in discovery.nifti:
        sources.append(
            CaseSource(kind="nifti", display=str(path), identifiers=["nifti", sha256_file(path)], files=[path], nifti=path, modality=modality or "")
        )
    return sources, skipped


def _choose_modality(sources: list[CaseSource], requested: str | None) -> str:
    if requested:
        return requested
    mods = sorted({s.modality for s in sources if s.kind == "dicom"})
    if any(s.kind == "nifti" for s in sources):
        raise PrepareError("NIfTI inputs carry no modality: pass --modality (e.g. --modality CT)")
    if len(mods) > 1:
        raise PrepareError(f"the inputs mix modalities {mods}: prepare one per dataset with --modality")
    return mods[0] if mods else "OT"


def convert_case(src: CaseSource, schema: LabelSchema, label_map: SiteLabelMap, opts: PrepareOptions):
    """-> (canonical image, canonical label or None, flags). Raises SeriesError."""
    flags: list[str] = []
    unknown_to_ignore = opts.unknown_labels == "ignore"
    if src.kind == "dicom":
        vol = load_series(src.series, opts.tolerance_mm, opts.allow_irregular)
        flags += vol.flags
        image = nib.Nifti1Image(vol.array, vol.affine_ras)
        label_arr = None
        if src.label_kind == "seg":
            label_arr = read_seg(src.label, src.series, vol.geometry.order, label_map, schema, unknown_to_ignore)
            label = nib.Nifti1Image(label_arr, vol.affine_ras)
        elif src.label_kind == "nifti":
            label = load_nifti(src.label, "label")
        else:
            label = None
    else:
        image = load_nifti(src.nifti, "image")
        if qform_sform_disagree(src.nifti):
            flags.append("qform_sform_mismatch")
        label = load_nifti(src.label, "label") if src.label_kind == "nifti" else None
    image = canonical(image)
    if label is not None:
        label = canonical(label)
        if label.shape != image.shape:
            raise SeriesError(
                f"{src.label}: label grid {label.shape} does not match image grid {image.shape} of {src.display}",
                "label_grid_mismatch",
            )
        diff = grid_difference_mm(image.affine, label.affine, image.shape)
        if diff > opts.grid_tolerance_mm:
            raise SeriesError(
                f"{src.label}: label and image grids differ by up to {diff:.4f} mm (max affine difference; tolerance {opts.grid_tolerance_mm} mm)",
                "label_grid_mismatch",
            )
        data = np.asanyarray(label.dataobj)
        mapped = data if src.label_kind == "seg" else remap(data, label_map, schema, str(src.label), unknown_to_ignore)
        label = nib.Nifti1Image(mapped.astype(np.uint8), image.affine)  # the image's affine: identical grid
    return image, label, flags


def _qc_flags(image_data: np.ndarray, label_data: np.ndarray | None, spacing, modality: str, schema: LabelSchema, labeled: list[int]) -> tuple[list[str], dict]:
    flags = []
    voxels: dict[str, int] = {}
    if label_data is None:
        flags.append("unlabeled")
    else:
        counts = np.bincount(label_data.ravel(), minlength=256)
        names = {v: k for k, v in schema.classes.items()}
        voxels = {names[i]: int(counts[i]) for i in range(1, schema.num_classes) if counts[i] > 0}
        if counts[schema.ignore_label]:
            voxels["ignore"] = int(counts[schema.ignore_label])
            flags.append("ignore_voxels")
        if not any(counts[i] for i in range(1, schema.num_classes)):
            flags.append("label_empty")
        else:
            flags += [f"missing_{names[c]}" for c in labeled if counts[c] == 0 and names[c] not in {l for ls in schema.groups.values() for l in ls}]
    if min(image_data.shape) < 16:
        flags.append("few_slices")
    if max(spacing) / min(spacing) > 4:
        flags.append("anisotropic")
    if modality == "CT":
        lo, hi = float(image_data.min()), float(image_data.max())
        if hi < 100 or lo > -500:
            flags.append("ct_values_not_hu")
    return flags, voxels


def prepare(
    images: list[Path],
    out: Path,
    schema: LabelSchema,
    label_map: SiteLabelMap | None,
    labels: list[Path] | None = None,
    options: PrepareOptions | None = None,
    salt_file: Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    opts = options or PrepareOptions()
    out = Path(out)
    log = log or (lambda msg: None)
    if opts.modality and opts.modality not in MODALITIES:
        raise PrepareError(f"--modality {opts.modality!r} is not one of {', '.join(MODALITIES)}")
    if opts.modality and opts.modality not in schema.modalities:
        raise PrepareError(f"modality {opts.modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
    for p in [*images, *(labels or [])]:
        if not Path(p).exists():
            raise PrepareError(f"{p}: no such file or folder")
        if not os.access(p, os.R_OK):
            raise PrepareError(f"{p}: permission denied")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / STATE_DIR).is_dir() and not (out / "manifest.json").is_file():
        raise PrepareError(f"{out}: folder exists, is not empty and is not a prepared dataset; choose a new output folder")
    created = not out.exists()
    try:
        try:
            disc = discover(images, progress=(lambda n, t: progress("scan", n, t)) if progress else None)
            label_disc = discover(labels, progress=None) if labels else Discovery()
        except OSError as exc:
            raise PrepareError(f"{exc.filename or exc}: {exc.strerror or exc}") from None
        sources, skipped = collect_sources(disc, opts.modality)
        skipped = list(disc.skipped) + skipped
        skipped += [s for s in label_disc.skipped if s[1] != "dicomdir"]
        if not sources:
            detail = f" ({len(skipped)} files skipped; first: {skipped[0][2]})" if skipped else ""
            raise PrepareError(f"no image series or NIfTI image found under {', '.join(str(p) for p in images)}{detail}")
        modality = _choose_modality(sources, opts.modality)
        if modality not in schema.modalities:
            raise PrepareError(f"modality {modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
        label_nifti = [p for p in label_disc.nifti]
        label_segs = disc.segs + label_disc.segs
        unmatched = pair_labels(sources, label_nifti, label_segs)
        if label_map is None:
            if any(s.label is not None for s in sources):
                raise PrepareError("labels were found but no site label map was given (--label-map): their values cannot be mapped to the schema")
            label_map = SiteLabelMap(schema.name, schema.version, {0: "background"}, "<none>")
        out.mkdir(parents=True, exist_ok=True)
        with _Lock(out):
            result = _run(sources, unmatched, skipped, disc, out, schema, label_map, modality, opts, salt_file, progress, log)
    except BaseException:
        if created and out.exists() and not (out / "manifest.json").exists():
            # nothing of value yet (no case finished): leave no trace, not even the salt
            records = list((out / STATE_DIR / "cases").glob("*.json")) if (out / STATE_DIR / "cases").is_dir() else []
            if not records:
                shutil.rmtree(out, ignore_errors=True)
        raise
    return result


def _clean_temp_files(out: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        for tmp in (out / sub).glob(".*"):
            tmp.unlink(missing_ok=True)  # leftovers of an interrupted atomic write


def _run(sources, unmatched, skipped, disc, out: Path, schema, label_map, modality, opts, salt_file, progress, log) -> PrepareResult:
    salt = _salt(out, salt_file)
    state = out / STATE_DIR / "cases"
    state.mkdir(parents=True, exist_ok=True)
    _clean_temp_files(out)
    records: dict[str, dict] = {}
    for f in state.glob("*.json"):
        try:
            rec = json.loads(f.read_text())
            records[rec["source_hash"]] = rec
        except (OSError, ValueError, KeyError):
            f.unlink(missing_ok=True)  # a damaged record: the case is simply redone
    used_ids = {int(r["case_id"].split("_")[1]) for r in records.values()}
    labeled = label_map.labeled_class_ids(schema)
    context = {
        "converter": CONVERTER_VERSION,
        "schema": [schema.name, schema.version, sorted(schema.classes.items())],
        "label_map": sorted((str(k), v) for k, v in label_map.mapping.items()),
        "modality": modality,
        "options": opts.fingerprint(),
    }
    outcomes: list[Outcome] = []
    for path, code, message in unmatched:
        outcomes.append(Outcome(_hash(salt, ["label", sha256_file(path) if path.is_file() else str(path)]), str(path), "refused", code=code, message=message))
        log(message)
    keyed = sorted(((_hash(salt, s.identifiers), s) for s in sources), key=lambda t: t[0])
    seen: set[str] = set()
    for n, (source_hash, src) in enumerate(keyed, 1):
        if progress:
            progress("convert", n - 1, len(keyed))
        seen.add(source_hash)
        if opts.require_labels and src.label is None:
            msg = f"{src.display}: no label found (--require-labels)"
            outcomes.append(Outcome(source_hash, src.display, "refused", code="no_label", message=msg))
            log(msg)
            continue
        try:
            fingerprint = _fingerprint(src, context)
        except OSError as exc:
            msg = f"{exc.filename}: {exc.strerror}"
            outcomes.append(Outcome(source_hash, src.display, "refused", code="unreadable", message=msg))
            log(msg)
            continue
        rec = records.get(source_hash)
        if rec and rec.get("input_sha256") == fingerprint and _outputs_intact(out, rec):
            outcomes.append(Outcome(source_hash, src.display, "unchanged", case_id=rec["case_id"], flags=rec["qc_flags"]))
            continue
        try:
            image, label, flags = convert_case(src, schema, label_map, opts)
        except SeriesError as exc:
            msg = str(exc) + _series_context(src, skipped)
            outcomes.append(Outcome(source_hash, src.display, "refused", code=exc.code, message=msg))
            log(msg)
            continue
        if rec:
            case_id = rec["case_id"]
        else:
            nxt = max(used_ids, default=-1) + 1
            used_ids.add(nxt)
            case_id = f"case_{nxt:04d}"
        rec = _write_case(out, case_id, source_hash, src, image, label, flags, fingerprint, modality, schema, labeled)
        atomic.write_json(state / f"{source_hash}.json", rec)
        records[source_hash] = rec
        outcomes.append(Outcome(source_hash, src.display, rec["status"], case_id=case_id, flags=rec["qc_flags"]))
    if progress:
        progress("convert", len(keyed), len(keyed))
    kept = {h: r for h, r in records.items() if h in seen or not opts.prune}
    for h, r in records.items():
        if h not in kept:
            for rel in (r.get("image"), r.get("label")):
                if rel:
                    (out / rel).unlink(missing_ok=True)
            (state / f"{h}.json").unlink(missing_ok=True)
    if not kept:
        # image refusals first: an unpaired label is usually a consequence, not the cause
        refused = sorted((o for o in outcomes if o.status == "refused"), key=lambda o: o.code in ("unpaired_label", "duplicate_label"))
        if len(refused) == 1:
            raise PrepareError(refused[0].message)
        first = refused[0].message if refused else "no inputs"
        raise PrepareError(f"no case could be prepared: {len(refused)} refused (first: {first})")
    _write_metadata(out, kept, outcomes, schema, modality, labeled, opts)
    report = None
    if opts.qc_report:
        report = _qc_report(out, schema, progress)
    notes = sorted({f"{se.grouping}: {se.note}" for se in disc.series if se.note})
    return PrepareResult(root=out, outcomes=outcomes, skipped_files=skipped, grouping_notes=notes, report=report)


def _series_context(src: CaseSource, skipped: list[tuple[Path, str, str]]) -> str:
    """What else went wrong around a refused series: files of its folder that could not be
    read (often the real cause of a "missing slice"), and how the series was grouped."""
    if src.series is None:
        return ""
    extra = ""
    near = [m for p, _, m in skipped if Path(p).parent == src.series.folder]
    if near:
        extra += f"; {len(near)} other file(s) in that folder were unusable (first: {near[0]})"
    if src.series.note:
        extra += f"; grouping: {src.series.note}"
    return extra


def _outputs_intact(out: Path, rec: dict) -> bool:
    for kind in ("image", "label"):
        rel = rec.get(kind)
        if rel is None:
            continue
        p = out / rel
        if not p.is_file() or sha256_file(p) != rec["sha256"][kind]:
            return False
    return True


def _write_case(out, case_id, source_hash, src, image, label, flags, fingerprint, modality, schema, labeled) -> dict:
    data = np.asanyarray(image.dataobj)
    if data.dtype.kind in "iu" and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16, copy=False)  # CT stays integer HU
    else:
        data = data.astype(np.float32, copy=False)
    img_rel = f"imagesTr/{case_id}.nii.gz"
    sums = {"image": save_atomic(clean_image(data, image.affine), out / img_rel)}
    label_rel = None
    label_data = None
    if label is not None:
        label_data = np.asanyarray(label.dataobj).astype(np.uint8)
        label_rel = f"labelsTr/{case_id}.nii.gz"
        sums["label"] = save_atomic(clean_image(label_data, image.affine), out / label_rel)
    spacing = _spacing(image.affine)
    qc, voxels = _qc_flags(data, label_data, spacing, modality, schema, labeled)
    flags = list(dict.fromkeys(flags + qc))
    status = "flagged" if [f for f in flags if f != "unlabeled"] else "ok"
    return {
        "case_id": case_id,
        "image": img_rel,
        "label": label_rel,
        "source_hash": source_hash,
        "source_kind": src.kind,
        "label_source_kind": src.label_kind,
        "shape": [int(x) for x in data.shape],
        "spacing": spacing,
        "affine": np.asarray(image.affine, dtype=float).round(6).tolist(),
        "orientation": _orientation(image.affine),
        "dtype": str(data.dtype),
        "intensity_range": [float(data.min()), float(data.max())],
        "schema_version": schema.version,
        "labeled_classes": labeled if label is not None else [],
        "label_voxels": voxels,
        "converter_version": CONVERTER_VERSION,
        "input_sha256": fingerprint,
        "sha256": sums,
        "qc_flags": flags,
        "status": status,
    }


_CASE_KEYS = (
    "case_id", "image", "label", "source_hash", "source_kind", "label_source_kind", "shape", "spacing", "affine",
    "orientation", "dtype", "intensity_range", "schema_version", "labeled_classes", "label_voxels",
    "converter_version", "input_sha256", "sha256", "qc_flags", "status",
)  # the manifest allowlist: nothing else from a record reaches it


def _write_metadata(out: Path, records: dict[str, dict], outcomes: list[Outcome], schema: LabelSchema, modality, labeled, opts) -> None:
    cases = sorted(({k: r.get(k) for k in _CASE_KEYS} for r in records.values()), key=lambda r: r["case_id"])
    refused = [{"source": o.source_hash, "reason_code": o.code} for o in outcomes if o.status == "refused"]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", opts.name).strip("_")[:48] or "dataset"
    training = [{"image": c["image"], **({"label": c["label"]} if c["label"] else {})} for c in cases]
    atomic.write_json(
        out / "dataset.json",
        {
            "name": name,
            "description": f"{name} (fedimg prepared dataset, schema {schema.name} {schema.version})",
            "tensorImageSize": "3D",
            "channel_names": {"0": modality},
            "modality": {"0": modality},
            "labels": dict(sorted(schema.classes.items(), key=lambda kv: kv[1])),
            "numTraining": len(training),
            "file_ending": ".nii.gz",
            "training": training,
        },
    )
    atomic.write_json(
        out / "manifest.json",
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "converter_version": CONVERTER_VERSION,
            "schema": {"name": schema.name, "version": schema.version},
            "modality": modality,
            "labeled_classes": labeled,
            "ignore_label": schema.ignore_label,
            "cases": cases,
            "refused": refused,
            "counts": {
                "ok": sum(c["status"] == "ok" for c in cases),
                "flagged": sum(c["status"] == "flagged" for c in cases),
                "refused": len(refused),
            },
        },
    )


def _qc_report(out: Path, schema: LabelSchema, progress) -> Path | None:
    try:
        from preprocessing import qc
    except ImportError:
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    return qc.write_report(out, manifest, schema, progress=(lambda d, t: progress("qc", d, t)) if progress else None)
