"""What `site-agent prepare` reads: the input files, the image sources in them, and each image's label.

Scanning reads regular files only and never enters the paths given for something else (labels,
output, salt, case map, label map, schema) nor prepared datasets. Each DICOM series, NIfTI image
or projection radiograph (one CR/DX file) becomes a `CaseSource`; `pair_labels` attaches each label
(and, with ``reference=True``, each test-only reference label) to its image and never guesses between
images of the same name.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from fedimg_core.dataset_manifest import FORMAT_NAME
from fedimg_core.errors import FedimgError
from fedimg_core.hashing import sha256_file
from preprocessing.dicom import Discovery, Series, SeriesError, series_geometry
from preprocessing.labels import seg_references
from preprocessing.radiograph import is_radiograph

__all__ = [
    "GRID_TOLERANCE_MM",
    "MIN_SLICES_MULTI_ORIENTATION",
    "CaseSource",
    "PrepareError",
    "collect_sources",
    "label_kind",
    "source_location",
    "is_prepared_dataset",
    "pair_labels",
]

GRID_TOLERANCE_MM = 0.01  # label and image grids may differ by this much (mm)
MIN_SLICES_MULTI_ORIENTATION = 16


class PrepareError(FedimgError):
    """Nothing could be prepared, or the inputs/options are wrong. One line, names the file."""


@dataclass
class CaseSource:
    """One image to prepare (a DICOM series, a NIfTI file or a radiograph), with its label once paired."""

    kind: str  # "dicom" | "nifti" | "radiograph" (one CR/DX file: ``series`` holds its one image) | "picture" (a PNG/JPEG radiograph)
    display: str  # for console messages only (a path); never written
    identifiers: list[str]  # hashed with the salt
    files: list[Path]
    series: Series | None = None
    nifti: Path | None = None
    picture: Path | None = None  # a PNG/JPEG radiograph
    label: Path | None = None
    label_kind: str | None = None  # "nifti" | "seg" | "png"
    reference_label: Path | None = None  # test-only reference label (classes the site does not train on)
    reference_label_kind: str | None = None  # "nifti" | "seg" | "png"
    modality: str = ""
    refusal: tuple[str, str] | None = None  # (code, message): refused before conversion (ambiguous pairing)
    radiograph: dict[str, str] | None = None  # a converted radiograph's spacing source, view, ... (`Radiograph.details`)

    @property
    def planar(self) -> bool:
        """Whether the image is a radiograph (a DICOM file or a picture), prepared in its plane."""
        return self.kind in ("radiograph", "picture")


def _strip_nii(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_stem(name: str) -> str:
    """A label file's name without its suffix (NIfTI, or a PNG mask of a radiograph)."""
    return name[:-4] if name.lower().endswith(".png") else _strip_nii(name)


def _radiograph_stem(path: Path) -> str:
    """The name a radiograph file is paired by: the file name without a .dcm/.dicom/.png/.jpg/.jpeg suffix."""
    return re.sub(r"\.(dcm|dicom|png|jpe?g)$", "", path.name, flags=re.IGNORECASE)


def label_kind(path: Path) -> str:
    """How a label file is read: ``png`` (a radiograph's mask) or ``nifti``.

    Args:
        path: a label file found by `preprocessing.dicom.discover` (a SEG is ``seg``, found apart).

    Returns:
        ``png`` or ``nifti``.
    """
    return "png" if path.name.lower().endswith(".png") else "nifti"


def _image_stem(name: str) -> str:
    return re.sub(r"_0000$", "", _strip_nii(name))  # nnU-Net channel suffix


def source_location(src: CaseSource) -> str:
    """Where a source is on disk, for console messages and the case map.

    Args:
        src: a DICOM series or NIfTI source.

    Returns:
        The series' folder, the radiograph's file, or the NIfTI file.
    """
    if src.kind == "radiograph" and src.series is not None:
        return str(src.series.first.path)
    if src.picture is not None:
        return str(src.picture)
    return str(src.series.folder) if src.series is not None else str(src.nifti)


def _parts(src: CaseSource) -> tuple[str, ...]:
    """Path components that name an image: its folder (DICOM), folder + stem (NIfTI, radiograph)."""
    if src.kind == "radiograph" and src.series is not None:
        return (*src.series.folder.parts, _radiograph_stem(src.series.first.path))
    if src.picture is not None:
        return (*src.picture.parent.parts, _radiograph_stem(src.picture))
    if src.series is not None:
        return src.series.folder.parts
    assert src.nifti is not None  # a source is a series or a NIfTI file
    return (*src.nifti.parent.parts, _image_stem(src.nifti.name))


def _grid_corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World positions of a grid's 8 corner voxels."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    corners: np.ndarray = (idx @ np.asarray(affine, dtype=float).T)[:, :3]
    return corners


def _corner_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two grids' corner sets are (each corner to its nearest): the same for
    every axis order and flip of one grid, so grids compare without reorienting either."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def _image_grid(src: CaseSource) -> tuple[Sequence[int], np.ndarray]:
    """A source's voxel grid: (shape, voxel-to-world affine)."""
    if src.kind == "radiograph" and src.series is not None:  # its image plane; the spacing does not matter to a hint
        return (src.series.first.cols, src.series.first.rows, 1), np.eye(4)
    if src.picture is not None:
        from PIL import Image

        with Image.open(src.picture) as im:
            return (im.width, im.height, 1), np.eye(4)
    if src.series is not None:
        geo = series_geometry(src.series, allow_irregular=True)
        return (src.series.first.cols, src.series.first.rows, len(src.series.slices)), geo.affine_ras
    img = cast(nib.Nifti1Image, nib.load(str(src.nifti)))  # a .nii/.nii.gz file (NIfTI-2 images are NIfTI-1 subclasses)
    return img.shape[:3], img.affine


def _grid_hint(label: Path, candidates: list[CaseSource]) -> str:
    """Which candidates share the label's voxel grid (a hint for staff; pairing never guesses)."""
    try:
        lab = cast(nib.Nifti1Image, nib.load(str(label)))  # a .nii/.nii.gz file
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
            same.append(source_location(c))
    if not same:
        return "; its voxel grid matches none of them"
    if len(same) == len(candidates):
        return "; all of them have its voxel grid"
    return f"; its voxel grid matches {', '.join(same)} only"


def pair_labels(
    sources: list[CaseSource],
    label_files: list[Path],
    segs: list[Path],
    label_roots: dict[Path, Path] | None = None,
    *,
    reference: bool = False,
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

    Test-only reference labels (``reference=True``) follow the same rules and go to
    ``reference_label``/``reference_label_kind``; an ambiguous one is refused alone: its
    images are not refused (a reference label never stops its case).

    Args:
        sources: the images; a paired one gets ``label``/``label_kind``, an ambiguous one
            ``refusal`` (code, message).
        label_files: NIfTI label maps.
        segs: DICOM SEG files.
        label_roots: for each NIfTI label, the folder it was found under (for the
            sub-folder rule); labels given as files have none.
        reference: pair test-only reference labels instead of training labels.

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
        elif s.picture is not None:
            by_name.setdefault(_radiograph_stem(s.picture), []).append(s)
        elif s.series is not None:
            names = {s.series.folder.name} if folder_counts[s.series.folder] == 1 else set()
            if s.kind == "radiograph":  # also by its file's name: images/cxr_07.dcm <-> labels/cxr_07.png
                names.add(_radiograph_stem(s.series.first.path))
            for name in sorted(names):
                by_name.setdefault(name, []).append(s)

    what = "reference label" if reference else "label"

    def attach(src: CaseSource, path: Path, kind: str) -> None:
        already = src.reference_label if reference else src.label
        if already is not None:
            unmatched.append((path, "duplicate_label", f"{path}: a second {what} for {src.display} (already {already})"))
            return
        if reference:
            src.reference_label, src.reference_label_kind = path, kind
        else:
            src.label, src.label_kind = path, kind
        src.files.append(path)  # part of the case's input fingerprint: a changed label redoes the case

    def ambiguous(path: Path, candidates: list[CaseSource], how: str, hint: str = "", fix: str = "") -> None:
        where = ", ".join(source_location(c) for c in candidates)
        unmatched.append(
            (
                path,
                "ambiguous_label",
                f"{path}: {how} matches {len(candidates)} images ({where}); {'reference label ' if reference else ''}not paired{hint}{fix}",
            )
        )
        if reference:
            return  # the images keep their training labels and are prepared without this reference label
        for c in candidates:
            if c.refusal is None:
                c.refusal = (
                    "ambiguous_label",
                    f"{source_location(c)}: label {path} matches this image and {len(candidates) - 1} other(s) ({where}); refused rather than guess",
                )

    for seg in segs:
        try:
            uid, sops = seg_references(seg)
        except SeriesError as exc:
            unmatched.append((seg, exc.code, str(exc)))
            continue
        candidates = by_series_uid.get(uid, [])
        if len(candidates) > 1 and sops:
            candidates = [c for c in candidates if c.series is not None and sops & {sl.sop_uid for sl in c.series.slices}] or candidates
        if not candidates:
            unmatched.append((seg, "unpaired_label", f"{seg}: DICOM SEG references a series that is not among the inputs"))
        elif len(candidates) > 1:
            ambiguous(seg, candidates, "the series it references")
        else:
            attach(candidates[0], seg, "seg")
    for lab in label_files:
        stem = _label_stem(lab.name)
        candidates = by_name.get(stem, [])
        root = (label_roots or {}).get(lab)
        sub = lab.parent.relative_to(root).parts if root is not None and root in lab.parents else ()
        if len(candidates) > 1 and sub:
            want = (*sub, stem)
            candidates = [c for c in candidates if _parts(c)[-len(want) :] == want] or candidates
        if not candidates:
            unmatched.append((lab, "unpaired_label", f"{lab}: no image named {stem!r} (NIfTI image, radiograph file or DICOM folder of that name)"))
        elif len(candidates) > 1:
            example = Path(*_parts(candidates[0])[-2:])
            ambiguous(lab, candidates, f"its name {stem!r}", _grid_hint(lab, candidates),
                      f". Give the folders unique names, or put each label in sub-folders mirroring its image (e.g. labels/{example}.nii.gz)")  # fmt: skip
        else:
            attach(candidates[0], lab, label_kind(lab))
    return unmatched


def is_prepared_dataset(folder: Path) -> bool:
    """Whether `folder` holds a dataset in our format (manifest.json with our format marker).

    Args:
        folder: any folder.

    Returns:
        True when its manifest.json is readable JSON naming `fedimg_core.dataset_manifest.FORMAT_NAME`.
    """
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def file_identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of a path, so a path given twice under two names is recognised.

    Args:
        path: a file or folder (links are followed).

    Returns:
        (st_dev, st_ino), or None when the path does not exist or cannot be examined.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan_inputs(
    roots: list[Path], excluded: dict[tuple[int, int], str], what: str
) -> tuple[list[Path], dict[Path, Path], list[tuple[Path, str, str]], list[str]]:
    """The regular files under `roots` (hidden names skipped, as by `discover`), never
    entering the paths given for something else (`excluded`) nor prepared datasets, and never
    opening FIFOs, sockets or devices (reading one blocks forever or never ends).

    Args:
        roots: the files and folders given for one purpose.
        excluded: (device, inode) -> the option that named that file or folder (not scanned).
        what: what is being scanned for ("images", "labels"), for the messages.

    Returns:
        (files, file -> root folder it was found under, skipped files as (path, code,
        message), notes for the console).

    Raises:
        PrepareError: a root is itself given for something else, or is not a regular file
            or folder.
        OSError: a root cannot be examined or a folder cannot be listed.
    """
    files: list[Path] = []
    found_under: dict[Path, Path] = {}
    skipped: list[tuple[Path, str, str]] = []
    notes: list[str] = []
    for root in roots:
        root = Path(root)
        st = os.stat(root)
        for p in (root, *root.resolve().parents):
            key = file_identity(p)
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
                key = file_identity(sub)
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


def collect_sources(discovery: Discovery, modality: str | None) -> tuple[list[CaseSource], list[tuple[Path, str, str]]]:
    """The image sources of a discovery: its DICOM series (localizers and other modalities
    skipped), each radiograph file (CR, DX) on its own, its NIfTI images and its PNG/JPEG radiographs.

    Args:
        discovery: what `preprocessing.dicom.discover` found.
        modality: keep only DICOM series of this modality (None: all).

    Returns:
        (sources, skipped series as (folder, reason code, message)).
    """
    sources: list[CaseSource] = []
    skipped: list[tuple[Path, str, str]] = []
    orientations: dict[str, set[tuple[float, ...]]] = {}
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
        if is_radiograph(first.modality):
            # a projection has no slices: each file (a PA and a lateral view, say) is its own case
            for image in series.slices:
                one = Series([image], series.grouping, series.note)
                sources.append(
                    CaseSource(
                        kind="radiograph",
                        display=f"radiograph {image.path}",
                        identifiers=["radiograph", *one.source_identifiers()],
                        files=[image.path],
                        series=one,
                        modality=first.modality,
                    )
                )
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
        sources.append(CaseSource(kind="nifti", display=str(path), identifiers=["nifti", sha256_file(path)], files=[path], nifti=path, modality=modality or ""))
    for path in discovery.pictures:
        sources.append(
            CaseSource(kind="picture", display=str(path), identifiers=["picture", sha256_file(path)], files=[path], picture=path, modality=modality or "")
        )
    return sources, skipped
