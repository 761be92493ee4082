"""`site-agent prepare`: a site's DICOM/NIfTI images and labels -> a prepared dataset.

What it does, per case:
  discover inputs (regular files only; never the paths given for labels, label map, output,
  salt or case map, nor prepared datasets) -> group DICOM series (preprocessing.dicom) ->
  pair each image with its label (DICOM SEG by the series it references; a NIfTI label by
  name, never guessing between same-named images, see `pair_labels`)
  -> exact geometry, rescale -> remap labels to the federation schema -> check label and
  image share the grid -> canonical RAS+ NIfTI (qform = sform, empty text fields) -> QC.

Re-runs skip unchanged cases (an input fingerprint: source bytes, label map, schema,
converter version, options) and resume after an interruption: each finished case leaves a
record in `<out>/.state/cases/`; manifest.json and dataset.json are written last, atomically,
so a folder without them is never taken for a dataset.

Nothing identifying a patient is written: case ids are sequential, sources are stored as
salted hashes, refusals as reason codes, and every written field comes from an allowlist.
Console messages (local to the site) name the files, so staff can fix them, and a case map
next to the output folder (never inside it) maps each case id to its source for staff.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.errors import FedimgError
from fedimg_core.hashing import sha256_file
from preprocessing.dataset import CONVERTER_VERSION, FORMAT_NAME, FORMAT_VERSION
from preprocessing.dicom import Discovery, Series, SeriesError, discover, load_series, series_geometry
from preprocessing.labels import read_seg, remap, seg_references
from preprocessing.nifti import canonical, clean_image, grid_difference_mm, load_nifti, qform_sform_disagree, save_atomic
from preprocessing.schema import LabelSchema, SiteLabelMap

STATE_DIR = ".state"
GRID_TOLERANCE_MM = 0.01
MODALITIES = ("CT", "MR", "PT", "CR", "DX", "US", "OT")
MIN_SLICES_MULTI_ORIENTATION = 16


class PrepareError(FedimgError):
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
    refusal: tuple[str, str] | None = None  # (code, message): refused before conversion (ambiguous pairing)


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
    notes: list[str] = field(default_factory=list)  # inputs not scanned or skipped, for the console
    case_map: Path | None = None  # site-local case id -> source (never part of the dataset)

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


def _where(src: CaseSource) -> str:
    return str(src.series.folder) if src.series is not None else str(src.nifti)


def _parts(src: CaseSource) -> tuple[str, ...]:
    """Path components that name an image: its folder (DICOM) or folder + stem (NIfTI)."""
    if src.series is not None:
        return src.series.folder.parts
    return (*src.nifti.parent.parts, _image_stem(src.nifti.name))


def _grid_corners(shape, affine: np.ndarray) -> np.ndarray:
    """World positions of a grid's 8 corner voxels."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (idx @ np.asarray(affine, dtype=float).T)[:, :3]


def _corner_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two grids' corner sets are (each corner to its nearest): the same for
    every axis order and flip of one grid, so grids compare without reorienting either."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def _image_grid(src: CaseSource):
    if src.series is not None:
        geo = series_geometry(src.series, allow_irregular=True)
        return (src.series.first.cols, src.series.first.rows, len(src.series.slices)), geo.affine_ras
    img = nib.load(str(src.nifti))
    return img.shape[:3], img.affine


def _grid_hint(label: Path, candidates: list[CaseSource]) -> str:
    """Which candidates share the label's voxel grid (a hint for staff; pairing never guesses)."""
    try:
        lab = nib.load(str(label))
        lab_shape, lab_corners = sorted(lab.shape[:3]), _grid_corners(lab.shape[:3], lab.affine)
    except Exception:  # noqa: BLE001 - only a hint: an unreadable label is reported when it is read
        return ""
    same = []
    for c in candidates:
        try:
            shape, affine = _image_grid(c)
        except Exception:  # noqa: BLE001 - idem
            continue
        if sorted(shape) == lab_shape and _corner_distance(_grid_corners(shape, affine), lab_corners) <= GRID_TOLERANCE_MM:
            same.append(_where(c))
    if not same:
        return "; its voxel grid matches none of them"
    if len(same) == len(candidates):
        return "; all of them have its voxel grid"
    return f"; its voxel grid matches {', '.join(same)} only"


def pair_labels(
    sources: list[CaseSource], label_files: list[Path], segs: list[Path], label_roots: dict[Path, Path] | None = None
) -> list[tuple[Path, str, str]]:
    """Attach labels to images; return the labels that matched no image as refusals.

    Rules: a DICOM SEG goes to the series it references (and, when several volumes share
    that series UID, to the one holding the SOP instances it lists); a NIfTI label goes to
    the NIfTI image with the same name (an nnU-Net `_0000` suffix on the image is allowed),
    or to the DICOM series that is alone in a folder of the label's name
    (``dicom/case_07/`` <-> ``labels/case_07.nii.gz``). When several images have that name
    (``p1/case_a/`` and ``p2/case_a/``), a label in sub-folders of its labels folder goes to
    the image whose path ends the same way (``labels/p1/case_a.nii.gz`` -> ``p1/case_a/``);
    otherwise the label and those images are refused (``ambiguous_label``), naming every
    candidate: a name shared by two patients never decides which one gets the label. The
    label's voxel grid must then match its image's (checked at conversion).

    Args:
        sources: the images; a paired one gets ``label``/``label_kind``, an ambiguous one
            ``refusal`` (code, message).
        label_files: NIfTI label maps.
        segs: DICOM SEG files.
        label_roots: for each NIfTI label, the folder it was found under (for the
            sub-folder rule); labels given as files have none.

    Returns:
        (label path, reason code, message) for each label not attached.
    """
    unmatched: list[tuple[Path, str, str]] = []
    by_series_uid: dict[str, list[CaseSource]] = {}
    for s in sources:
        if s.series is not None and s.series.first.series_uid:
            by_series_uid.setdefault(s.series.first.series_uid, []).append(s)
    folder_counts: dict[Path, int] = {}
    for s in sources:
        if s.series is not None:
            folder_counts[s.series.folder] = folder_counts.get(s.series.folder, 0) + 1
    by_name: dict[str, list[CaseSource]] = {}
    for s in sources:
        if s.nifti is not None:
            by_name.setdefault(_image_stem(s.nifti.name), []).append(s)
        elif s.series is not None and folder_counts[s.series.folder] == 1:
            by_name.setdefault(s.series.folder.name, []).append(s)

    def attach(src: CaseSource, path: Path, kind: str) -> None:
        if src.label is not None:
            unmatched.append((path, "duplicate_label", f"{path}: a second label for {src.display} (already {src.label})"))
            return
        src.label, src.label_kind = path, kind
        src.files.append(path)

    def ambiguous(path: Path, candidates: list[CaseSource], how: str, hint: str = "", fix: str = "") -> None:
        where = ", ".join(_where(c) for c in candidates)
        unmatched.append((path, "ambiguous_label", f"{path}: {how} matches {len(candidates)} images ({where}); not paired{hint}{fix}"))
        for c in candidates:
            if c.refusal is None:
                c.refusal = ("ambiguous_label", f"{_where(c)}: label {path} matches this image and {len(candidates) - 1} other(s) ({where}); refused rather than guess")

    for seg in segs:
        try:
            uid, sops = seg_references(seg)
        except SeriesError as exc:
            unmatched.append((seg, exc.code, str(exc)))
            continue
        candidates = by_series_uid.get(uid, [])
        if len(candidates) > 1 and sops:
            candidates = [c for c in candidates if sops & {sl.sop_uid for sl in c.series.slices}] or candidates
        if not candidates:
            unmatched.append((seg, "unpaired_label", f"{seg}: DICOM SEG references a series that is not among the inputs"))
        elif len(candidates) > 1:
            ambiguous(seg, candidates, "the series it references")
        else:
            attach(candidates[0], seg, "seg")
    for lab in label_files:
        stem = _strip_nii(lab.name)
        candidates = by_name.get(stem, [])
        root = (label_roots or {}).get(lab)
        sub = lab.parent.relative_to(root).parts if root is not None and root in lab.parents else ()
        if len(candidates) > 1 and sub:
            want = (*sub, stem)
            candidates = [c for c in candidates if _parts(c)[-len(want):] == want] or candidates
        if not candidates:
            unmatched.append((lab, "unpaired_label", f"{lab}: no image named {stem!r} (NIfTI image of that name or DICOM folder of that name)"))
        elif len(candidates) > 1:
            example = Path(*_parts(candidates[0])[-2:])
            ambiguous(lab, candidates, f"its name {stem!r}", _grid_hint(lab, candidates),
                      f". Give the folders unique names, or put each label in sub-folders mirroring its image (e.g. labels/{example}.nii.gz)")  # fmt: skip
        else:
            attach(candidates[0], lab, "nifti")
    return unmatched


def is_prepared_dataset(folder: Path) -> bool:
    """Whether `folder` holds a dataset in our format (manifest.json with our format marker)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _check_out_folder(out: Path) -> None:
    """Refuse an output folder that holds files which are not a dataset this command wrote.

    Ours: a `.state/` folder (every prepare run makes one) with no manifest.json (a run that
    was interrupted) or with our manifest.json. Anything else non-empty is somebody else's
    and is never written into (prepare would overwrite its manifest.json, dataset.json and
    case files, or mix its cases with ours).
    """
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    has_state = (out / STATE_DIR).is_dir()
    manifest = out / "manifest.json"
    if has_state and (not manifest.exists() or is_prepared_dataset(out)):
        return
    if is_prepared_dataset(out):
        why = f"holds a prepared dataset that `site-agent prepare` did not write (no {STATE_DIR}/ folder): adding cases would overwrite its own"
    elif manifest.exists():
        why = f"holds a manifest.json that is not a {FORMAT_NAME} manifest"
    else:
        why = "is not empty and is not a prepared dataset"
    raise PrepareError(f"{out}: folder exists and {why}; refusing to write into it: choose a new or empty output folder")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan(
    roots: list[Path], excluded: dict[tuple[int, int], str], what: str
) -> tuple[list[Path], dict[Path, Path], list[tuple[Path, str, str]], list[str]]:
    """The regular files under `roots` (hidden names skipped, as by `discover`), never
    entering the paths given for something else (`excluded`: file/folder identity -> the
    option that named it) nor prepared datasets, and never opening FIFOs, sockets or
    devices (reading one blocks forever or never ends).

    Returns:
        (files, file -> root folder it was found under, skipped files as (path, code,
        message), notes for the console).

    Raises:
        PrepareError: a root is itself given for something else, or is not a regular file
            or folder.
        OSError: a folder cannot be listed.
    """
    files: list[Path] = []
    found_under: dict[Path, Path] = {}
    skipped: list[tuple[Path, str, str]] = []
    notes: list[str] = []
    for root in roots:
        root = Path(root)
        st = os.stat(root)
        for p in (root, *root.resolve().parents):
            key = _identity(p)
            if key in excluded:
                raise PrepareError(f"{root}: is {'' if p == root else 'inside '}the {excluded[key]} path; it cannot also be scanned for {what}")
        if stat.S_ISREG(st.st_mode):
            files.append(root)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise PrepareError(f"{root}: not a regular file or folder (a FIFO, socket or device?)")
        if is_prepared_dataset(root):
            raise PrepareError(f"{root}: is a prepared dataset (manifest.json), not {what}")
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                sub = Path(dirpath) / d
                key = _identity(sub)
                if key in excluded:
                    notes.append(f"{sub}: the {excluded[key]} path, not scanned for {what}")
                elif is_prepared_dataset(sub):
                    notes.append(f"{sub}: a prepared dataset (manifest.json), not scanned for {what}")
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    fst = os.stat(path)  # follows links: a link to a regular file is read
                except OSError as exc:
                    skipped.append((path, "unreadable", f"{path}: {exc.strerror} (a broken link?)"))
                    continue
                if (fst.st_dev, fst.st_ino) in excluded:
                    continue
                if not stat.S_ISREG(fst.st_mode):
                    msg = f"{path}: not a regular file (a FIFO, socket, device or a link to one); skipped"
                    skipped.append((path, "not_regular_file", msg))
                    notes.append(msg)
                    continue
                files.append(path)
                found_under[path] = root
    return files, found_under, skipped, notes


def _raise(exc: OSError) -> None:
    raise exc


def default_case_map(out: Path) -> Path:
    """Where prepare keeps the site-local case map: next to the dataset folder, outside it."""
    out = Path(out)
    return out.parent / f"{out.name}.case-map.json"


CASE_MAP_FORMAT = "fedimg-case-map"


def _write_case_map(path: Path, out: Path, sources: list[CaseSource], salt: bytes) -> None:
    """Record, for staff only, which source each case id came from.

    Kept outside the dataset folder (see `default_case_map`): nothing that reads or sends a
    dataset sees it. Entries of cases an earlier run prepared from sources not given this
    time are kept until those cases are pruned; owner-only permissions (it names patients'
    folders).
    """
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    by_hash = {_hash(salt, s.identifiers): s for s in sources}
    old = read_case_map(path) if path.exists() else {}
    cases: dict[str, dict] = {}
    for case in manifest["cases"]:
        src = by_hash.get(case["source_hash"])
        if src is None:
            if case["case_id"] in old:
                cases[case["case_id"]] = old[case["case_id"]]
            continue
        entry: dict = {"kind": src.kind, "source": os.path.abspath(_where(src))}
        if src.series is not None:
            entry["files"] = len(src.series.slices)
            entry["series_uid"] = src.series.first.series_uid
        if src.label is not None:
            entry["label"] = os.path.abspath(src.label)
        cases[case["case_id"]] = entry
    atomic.write_bytes(
        path,
        (json.dumps({"format": CASE_MAP_FORMAT, "note": "site-local: names patients' source folders; never send this file",
                     "dataset": str(out.resolve()), "cases": cases}, indent=2, sort_keys=True) + "\n").encode(),
        mode=0o600,
    )  # fmt: skip


def read_case_map(path: Path) -> dict[str, dict]:
    """The case id -> source entries of a case map written by prepare.

    Raises:
        PrepareError: the file is missing, unreadable or not a case map.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepareError(f"{path}: no case map here (prepare writes <dataset folder>.case-map.json, or --case-map)") from None
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read the case map ({exc.strerror or exc})") from None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != CASE_MAP_FORMAT or not isinstance(doc.get("cases"), dict):
        raise PrepareError(f"{path}: not a case map (no JSON with format {CASE_MAP_FORMAT!r}); refusing to use or overwrite it (pass --case-map)")
    return doc["cases"]


def _salt(out: Path, salt_file: Path | None) -> bytes:
    path = salt_file or out / STATE_DIR / "salt"
    try:
        data = atomic.read_small_file(path, "salt file").strip()
    except atomic.FileReadError as exc:
        raise PrepareError(str(exc)) from None
    except FileNotFoundError:
        data = None
    if data is not None:
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
    nifti = [str(s.nifti) for s in sources if s.kind == "nifti"]
    if nifti:
        found = ", ".join(nifti[:3]) + (f" and {len(nifti) - 3} more" if len(nifti) > 3 else "")
        raise PrepareError(
            f"NIfTI inputs carry no modality: pass --modality (e.g. --modality CT); found {found} "
            "(label maps belong in the folder given with --labels)"
        )
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
    if looks_like_label(image_data):
        flags.append("looks_like_label")
    return flags, voxels


# QC flags saying a case's "image" is probably not an image: `site-agent dataset add`
# refuses datasets with such cases unless told otherwise.
SUSPECT_IMAGE_FLAGS = ("looks_like_label", "ct_values_not_hu")
LABEL_LIKE_MAX_VALUES = 32


def looks_like_label(data: np.ndarray, max_values: int = LABEL_LIKE_MAX_VALUES) -> bool:
    """Whether a volume looks like a label map (or a blank): a few non-negative integer values.

    A scan has hundreds of distinct intensities (noise alone gives that); a label map has
    one per class. Checked on at most ~1M voxels spread over the volume.

    Args:
        data: the volume.
        max_values: at most this many distinct values counts as label-like.

    Returns:
        True when the volume has at most `max_values` distinct values, all non-negative
        integers.
    """
    step = max(1, round((data.size / 1e6) ** (1 / 3)))
    sample = np.asarray(data[::step, ::step, ::step])
    values = np.unique(sample)
    if values.size > max_values or (values.size and values[0] < 0):
        return False
    return bool(np.all(values == np.round(values)))


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
    case_map: Path | None = None,
) -> PrepareResult:
    """Convert images (+ labels) into the prepared dataset at `out` (see the module docstring).

    Args:
        images: DICOM/NIfTI files or folders to scan for images.
        out: the dataset folder: new, empty, or one this function wrote before.
        schema: the federation's label schema.
        label_map: the site label map (None: no labels).
        labels: label files or folders (never scanned for images).
        options: see `PrepareOptions`.
        salt_file: the secret salt of the source hashes (default `<out>/.state/salt`).
        progress: called with (stage, done, total).
        log: called with each refusal's console message.
        case_map: the site-local case id -> source file (default `default_case_map(out)`).

    Returns:
        The outcome per case, skipped files and notes.

    Raises:
        PrepareError: wrong options or inputs, an output folder that is not ours, or no case
            could be prepared (nothing is left behind in a folder this call created).
    """
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
    _check_out_folder(out)
    case_map = Path(case_map) if case_map is not None else default_case_map(out)
    if case_map.exists():
        read_case_map(case_map)  # somebody else's file of that name is never overwritten
    elif case_map.parent.is_dir() and not os.access(case_map.parent, os.W_OK):
        raise PrepareError(f"{case_map.parent}: not writable, so the case map {case_map.name} cannot be kept there; pass --case-map PATH")
    # Paths given for something else are never read as images (labels inside the input
    # folder became "CT images"; an output folder inside it was ingested on each re-run).
    excluded: dict[tuple[int, int], str] = {}
    for path, option in [
        *((Path(lab), "--labels") for lab in labels or []), (out, "--out"), (case_map, "case map"),
        (salt_file, "--salt-file"), (Path(label_map.source) if label_map is not None else None, "--label-map"),
        (Path(schema.source), "--schema"),
    ]:  # fmt: skip
        key = _identity(path) if path is not None else None
        if key is not None:
            excluded.setdefault(key, option)
    label_excluded = {k: v for k, v in excluded.items() if v != "--labels"}
    created = not out.exists()
    try:
        try:
            files, _, scan_skipped, notes = _scan(list(images), excluded, "images")
            label_files, label_roots, label_skipped, label_notes = _scan(list(labels or []), label_excluded, "labels")
            disc = discover(files, progress=(lambda n, t: progress("scan", n, t)) if progress else None)
            label_disc = discover(label_files, progress=None) if label_files else Discovery()
        except OSError as exc:
            raise PrepareError(f"{exc.filename or exc}: {exc.strerror or exc}") from None
        notes += label_notes
        sources, skipped = collect_sources(disc, opts.modality)
        skipped = scan_skipped + list(disc.skipped) + skipped
        skipped += label_skipped + [s for s in label_disc.skipped if s[1] != "dicomdir"]
        if not sources:
            detail = f" ({len(skipped)} files skipped; first: {skipped[0][2]})" if skipped else ""
            raise PrepareError(f"no image series or NIfTI image found under {', '.join(str(p) for p in images)}{detail}")
        modality = _choose_modality(sources, opts.modality)
        if modality not in schema.modalities:
            raise PrepareError(f"modality {modality} has no rule in schema {schema.source} (modalities: {', '.join(schema.modalities)})")
        label_nifti = [p for p in label_disc.nifti]
        label_segs = disc.segs + label_disc.segs
        unmatched = pair_labels(sources, label_nifti, label_segs, label_roots)
        # images whose pairing was ambiguous are refused as cases; the others go on
        unmatched += [(Path(_where(s)), *s.refusal) for s in sources if s.refusal is not None]
        sources = [s for s in sources if s.refusal is None]
        if label_map is None:
            if any(s.label is not None for s in sources):
                raise PrepareError("labels were found but no site label map was given (--label-map): their values cannot be mapped to the schema")
            label_map = SiteLabelMap(schema.name, schema.version, {0: "background"}, "<none>")
        out.mkdir(parents=True, exist_ok=True)
        with _Lock(out):
            result = _run(sources, unmatched, skipped, disc, out, schema, label_map, modality, opts, salt_file, progress, log)
            _write_case_map(case_map, out, sources, _salt(out, salt_file))
    except BaseException:
        if created and out.exists() and not (out / "manifest.json").exists():
            # nothing of value yet (no case finished): leave no trace, not even the salt
            records = list((out / STATE_DIR / "cases").glob("*.json")) if (out / STATE_DIR / "cases").is_dir() else []
            if not records:
                shutil.rmtree(out, ignore_errors=True)
        raise
    result.notes = notes
    result.case_map = case_map
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
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the others
            outcomes.append(_unexpected(src, source_hash, exc, "converting", log))
            continue
        if rec:
            case_id = rec["case_id"]
        else:
            nxt = max(used_ids, default=-1) + 1
            used_ids.add(nxt)
            case_id = f"case_{nxt:04d}"
        try:
            rec = _write_case(out, case_id, source_hash, src, image, label, flags, fingerprint, modality, schema, labeled)
            atomic.write_json(state / f"{source_hash}.json", rec)
        except Exception as exc:  # noqa: BLE001 - idem; what this case wrote goes, so the manifest stays true
            for rel in (f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz", f"{STATE_DIR}/cases/{source_hash}.json"):
                (out / rel).unlink(missing_ok=True)
            records.pop(source_hash, None)
            outcomes.append(_unexpected(src, source_hash, exc, "writing", log))
            continue
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


def _unexpected(src: CaseSource, source_hash: str, exc: Exception, stage: str, log) -> Outcome:
    """A refusal for an error no check foresaw (MemoryError, a library's ValueError, ...):
    the files are named on the console, the traceback goes to the local log at debug level
    (FEDIMG_DEBUG=1 raises it instead, so a programming error is not hidden while testing)."""
    if os.environ.get("FEDIMG_DEBUG", "").lower() in ("1", "true", "yes"):
        raise exc
    where = getattr(exc, "filename", None) or (f"{src.display} (label {src.label})" if src.label else src.display)
    detail = " ".join(str(exc).split())[:200] or "no message"
    code = "out_of_memory" if isinstance(exc, MemoryError) else "unexpected_error"
    msg = f"{where}: unexpected error while {stage} the case ({type(exc).__name__}: {detail}); the case is refused, the others go on"
    logging.getLogger(__name__).debug("case %s refused: %s", src.display, msg, exc_info=exc)
    log(msg)
    return Outcome(source_hash, src.display, "refused", code=code, message=msg)


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
