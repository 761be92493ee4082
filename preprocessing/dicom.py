"""DICOM discovery, series grouping and exact volume geometry.

Geometry comes from the headers only (PS3.3 C.7.6.2): the in-plane axes from
ImageOrientationPatient, the pixel size from PixelSpacing, and the slice order and spacing
from ImagePositionPatient projected on the slice normal. SliceThickness and
SpacingBetweenSlices are never used: they are often wrong or missing. Missing slices,
irregular spacing, duplicate positions and gantry tilt are detected and reported; nothing
is interpolated.

Voxel (i, j, k) of a volume = (column, row, slice sorted along the normal); the affine
returned is in RAS+ world millimetres (DICOM's LPS with x and y negated), as NIfTI wants.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, cast

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID

# pixel decoding and the refusal limits live in their own modules; their names stay importable from here
from preprocessing.dicom_pixels import (
    DECODE_TIMEOUT_S,
    ISOLATED_PLUGINS,
    IsolatedDecoder,
    check_pixel_length,
    decoding_plugins,
    in_process_plugins_only,
    plugins_for,
    read_pixels,
)
from preprocessing.refusals import (
    MAX_ABS_POSITION_MM,
    MAX_DATA_BYTES,
    MAX_VOXELS,
    SPACING_RANGE_MM,
    SeriesError,
    check_affine,
    check_size,
    short_error,
)

__all__ = [
    "DECODE_TIMEOUT_S",
    "ISOLATED_PLUGINS",
    "MAX_ABS_POSITION_MM",
    "MAX_DATA_BYTES",
    "MAX_VOXELS",
    "NIFTI_SUFFIXES",
    "ORIENTATION_TOLERANCE",
    "POSITION_TOLERANCE_MM",
    "SEG_SOP_CLASS",
    "SPACING_RANGE_MM",
    "Discovery",
    "Geometry",
    "IsolatedDecoder",
    "Series",
    "SeriesError",
    "SliceHeader",
    "Volume",
    "check_affine",
    "check_pixel_length",
    "check_size",
    "decoding_plugins",
    "discover",
    "group_series",
    "in_process_plugins_only",
    "iter_files",
    "load_series",
    "read_header",
    "read_pixels",
    "series_geometry",
    "slice_headers",
]

log = logging.getLogger(__name__)

# SOP classes that hold images we convert; anything else (SR, RTSTRUCT, presentation states,
# ...) is reported and skipped. SEG is collected separately as a label source.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Default tolerances: a slice position must fall within this distance of its voxel plane
# (the 0.01 mm), and in-plane drift between slices beyond it means gantry tilt.
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class SliceHeader:
    """What one image slice (a file, or a frame of an enhanced multi-frame file) declares: identity, geometry, pixel layout."""

    path: Path
    sop_uid: str
    series_uid: str
    study_uid: str
    frame_uid: str
    modality: str
    series_number: str
    acquisition_number: str
    echo_number: str
    rows: int
    cols: int
    position: np.ndarray | None  # IPP, LPS mm
    orientation: np.ndarray | None  # IOP, 6 values
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    frames: int
    samples_per_pixel: int
    # The parsed header, pixel data deferred (read from the file on first access), so each
    # file is parsed once for discovery and conversion.
    dataset: pydicom.Dataset | None = field(default=None, repr=False, compare=False)
    # Enhanced multi-frame files give one header per frame: its 0-based index and the
    # frame's own rescale (from the functional groups).
    frame: int | None = None
    rescale: tuple[float, float] | None = None
    localizer: bool = False  # ImageType LOCALIZER, or a scout-like series/protocol name


@dataclass
class Series:
    """Slices grouped as one volume candidate, plus how they were grouped (for the report)."""

    slices: list[SliceHeader]
    grouping: str  # "series_uid" | "series_uid+split" | "fallback"
    note: str = ""

    @property
    def first(self) -> SliceHeader:
        """The first slice (its header stands for the series)."""
        return self.slices[0]

    @property
    def modality(self) -> str:
        """The series' Modality (CT, MR, ...)."""
        return self.first.modality

    @property
    def folder(self) -> Path:
        """The folder of the first slice."""
        return self.first.path.parent

    def source_identifiers(self) -> list[str]:
        """What identifies this series at the site (hashed with a salt before it is stored).

        Returns:
            Its study and series UIDs, sorted, then its SOP instance UIDs, sorted.
        """
        return sorted({s.study_uid for s in self.slices} | {s.series_uid for s in self.slices}) + sorted(s.sop_uid for s in self.slices)


@dataclass
class Discovery:
    """What `discover` found: image series, DICOM SEG files, NIfTI files and the files skipped (with a reason)."""

    series: list[Series] = field(default_factory=list)
    segs: list[Path] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)  # PNG label masks (radiographs), when asked for
    pictures: list[Path] = field(default_factory=list)  # PNG/JPEG radiographs, when asked for
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, code, message)


def _str(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        arr = np.asarray([float(v) for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])])
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: {keyword} is not numeric ({value!r})", "bad_geometry_tag") from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{path}: {keyword} must have {n} finite values, got {list(value)!r}", "bad_geometry_tag")
    return arr


_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def read_header(path: Path) -> pydicom.Dataset:
    """Parse a file once; values over 4 KiB (pixel data) are read only when accessed.

    Parsing stops at the first top-level element after the pixel data: some exporters pad
    files with megabytes of zeros there, which pydicom would otherwise read as hundreds of
    thousands of empty elements (seconds per file).

    Args:
        path: the file.

    Returns:
        Its dataset, pixel data deferred.

    Raises:
        pydicom.errors.InvalidDicomError: not a DICOM file (no DICM preamble).
        OSError: the file cannot be read; pydicom raises other types on a garbled file.
    """
    seen_pixels = False

    def after_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal seen_pixels
        if seen_pixels:
            return True
        seen_pixels = tag in _PIXEL_TAGS
        return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every odd VR; errors are what we report
        with open(path, "rb") as fh:
            return read_partial(fh, after_pixel_data, defer_size=4096)


def _functional(ds: pydicom.Dataset, frame_item: pydicom.Dataset, sequence: str, keyword: str) -> pydicom.Dataset | None:
    """A value from the per-frame functional group of a frame, else from the shared one."""
    for groups in (frame_item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is None or sequence not in groups or not len(groups[sequence].value):
            continue
        item: pydicom.Dataset = groups[sequence].value[0]
        if keyword in item:
            return item
    return None


def _enhanced_headers(path: Path, ds: pydicom.Dataset, base: dict[str, Any]) -> list[SliceHeader]:
    """One header per frame of an enhanced multi-frame image (PS3.3 C.7.6.16): position,
    orientation, pixel spacing and rescale from the per-frame or shared functional groups."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != base["frames"]:
        raise SeriesError(f"{path}: {len(per_frame)} per-frame functional groups for NumberOfFrames {base['frames']}", "bad_image_tag")
    headers = []
    for f, item in enumerate(per_frame):
        geo: dict[str, np.ndarray | None] = {}
        for sequence, keyword, n in (
            ("PlanePositionSequence", "ImagePositionPatient", 3),
            ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
            ("PixelMeasuresSequence", "PixelSpacing", 2),
        ):
            holder = _functional(ds, item, sequence, keyword)
            geo[keyword] = _floats(holder, keyword, n, path) if holder is not None else None
        transform = _functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
        rescale = _rescale(transform, path) if transform is not None else None
        ps = geo["PixelSpacing"]
        headers.append(
            SliceHeader(
                **{**base, "sop_uid": f"{base['sop_uid']}/{f + 1}", "frames": 1},
                position=geo["ImagePositionPatient"],
                orientation=geo["ImageOrientationPatient"],
                pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
                dataset=ds,
                frame=f,
                rescale=rescale,
            )
        )
    return headers


# Vendors name planning scans differently and do not all set ImageType LOCALIZER (Siemens
# 3-plane localizers say ORIGINAL\PRIMARY\M\NORM\DIS2D). The names are only matched here,
# never stored.
_LOCALIZER_NAMES = re.compile(r"locali[sz]er|scout|survey|surview|topogram|scanogram|scanoscope|planning", re.I)


def _is_localizer(ds: pydicom.Dataset) -> bool:
    if "LOCALIZER" in _str(ds, "ImageType").upper():
        return True
    return any(_LOCALIZER_NAMES.search(_str(ds, k)) for k in ("SeriesDescription", "ProtocolName"))


def slice_headers(path: Path, ds: pydicom.Dataset) -> list[SliceHeader]:
    """The header of a classic single-frame image, or one per frame of an enhanced one.

    Args:
        path: the file.
        ds: its dataset (`read_header`).

    Returns:
        One `SliceHeader` per image slice (per frame for an enhanced multi-frame image).

    Raises:
        SeriesError: image or geometry tags that are not numbers of the right count
            (``bad_image_tag``, ``bad_geometry_tag``, ``bad_rescale``).
    """
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: Rows/Columns/NumberOfFrames/SamplesPerPixel are not integers", "bad_image_tag") from None
    base: dict[str, Any] = dict(
        path=path,
        sop_uid=_str(ds, "SOPInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        study_uid=_str(ds, "StudyInstanceUID"),
        frame_uid=_str(ds, "FrameOfReferenceUID"),
        modality=_str(ds, "Modality").upper() or "OT",
        series_number=_str(ds, "SeriesNumber"),
        acquisition_number=_str(ds, "AcquisitionNumber"),
        echo_number=_str(ds, "EchoNumbers"),
        rows=rows,
        cols=cols,
        frames=frames,
        samples_per_pixel=spp,
        localizer=_is_localizer(ds),
    )
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_headers(path, ds, base)
    ipp = _floats(ds, "ImagePositionPatient", 3, path)
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    ps = _floats(ds, "PixelSpacing", 2, path)
    return [
        SliceHeader(
            **base,
            position=ipp,
            orientation=iop,
            pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
            dataset=ds,
        )
    ]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def iter_files(roots: Iterable[Path]) -> list[Path]:
    """The non-hidden files under ``roots`` (a file root is itself), sorted per folder.

    Args:
        roots: files and folders.

    Returns:
        The files, hidden names (and hidden folders' contents) left out.

    Raises:
        FileNotFoundError: a root does not exist.
        OSError: a folder cannot be listed.
    """
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such file or folder")
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def _raise(exc: OSError) -> None:
    raise exc


def discover(roots: Iterable[Path], progress: Callable[[int, int], None] | None = None, masks: bool = False, pictures: bool = False) -> Discovery:
    """Find DICOM images, DICOM SEG files and NIfTI files under `roots` (any file names).

    DICOM image files are grouped into series (see `group_series`); everything that is not
    usable is listed in `skipped` with a reason code, never silently dropped.

    Args:
        roots: files and folders to scan.
        progress: called as ``progress(done, total)`` after each file.
        masks: also collect PNG files (``*.png``) as label masks (label folders only).
        pictures: also collect PNG/JPEG files as radiographs (image folders).

    Returns:
        The series, SEG files, NIfTI files, PNG masks and skipped files found.
    """
    out = Discovery()
    headers: list[SliceHeader] = []
    files = iter_files(roots)
    for n, path in enumerate(files, 1):
        if progress:
            progress(n, len(files))
        if _is_nifti(path):
            out.nifti.append(path)
            continue
        if masks and path.name.lower().endswith(".png"):
            out.masks.append(path)
            continue
        if pictures and path.name.lower().endswith((".png", ".jpg", ".jpeg")):
            out.pictures.append(path)
            continue
        if path.name.upper() == "DICOMDIR":
            out.skipped.append((path, "dicomdir", f"{path}: DICOMDIR index file (not an image)"))
            continue
        try:
            ds = read_header(path)
        except InvalidDicomError:
            out.skipped.append((path, "not_dicom", f"{path}: not a DICOM file (no DICM preamble)"))
            continue
        except PermissionError:
            out.skipped.append((path, "unreadable", f"{path}: permission denied"))
            continue
        except Exception as exc:  # noqa: BLE001 - truncated/garbled files raise many types
            out.skipped.append((path, "corrupt_dicom", f"{path}: unreadable DICOM ({type(exc).__name__}: {short_error(exc)})"))
            continue
        sop_class = _str(ds, "SOPClassUID")
        if sop_class == SEG_SOP_CLASS:
            out.segs.append(path)
            continue
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            out.skipped.append((path, "no_pixel_data", f"{path}: DICOM without pixel data ({_sop_name(sop_class)})"))
            continue
        try:
            headers.extend(slice_headers(path, ds))
        except SeriesError as exc:
            out.skipped.append((path, exc.code, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a header garbled in a way no check foresaw skips its file, not the run
            out.skipped.append((path, "bad_header", f"{path}: unusable DICOM header ({type(exc).__name__}: {short_error(exc)})"))
    out.series = group_series(headers)
    return out


def _sop_name(uid: str) -> str:
    try:
        return UID(uid).name if uid else "no SOPClassUID"
    except Exception:  # noqa: BLE001
        return uid


def _geometry_key(s: SliceHeader) -> tuple[object, ...]:
    iop = tuple(np.round(s.orientation, 4)) if s.orientation is not None else None
    ps = tuple(round(v, 4) for v in s.pixel_spacing) if s.pixel_spacing else None
    return (s.frame_uid, iop, s.rows, s.cols, ps, s.samples_per_pixel)


def group_series(headers: list[SliceHeader]) -> list[Series]:
    """Group slices into volumes.

    Primary key: SeriesInstanceUID. A UID shared by slices of different geometry, echo or
    acquisition (a duplicated UID, or a multi-echo series) is split on those attributes.
    Slices with an empty SeriesInstanceUID fall back to study + frame of reference +
    geometry + series/acquisition/echo numbers. Every group records how it was made.

    Args:
        headers: the slices of every file discovered.

    Returns:
        The series, sorted by folder, series number and first file.
    """
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    fallback: dict[tuple[object, ...], list[SliceHeader]] = defaultdict(list)
    for s in headers:
        if s.series_uid:
            by_uid[s.series_uid].append(s)
        else:
            key = (s.study_uid, s.modality, s.series_number, s.acquisition_number, s.echo_number, *_geometry_key(s))
            fallback[key].append(s)
    result: list[Series] = []
    for uid, slices in by_uid.items():
        parts: dict[tuple[object, ...], list[SliceHeader]] = defaultdict(list)
        for s in slices:
            parts[(s.study_uid, *_geometry_key(s), s.echo_number)].append(s)
        if len(parts) == 1:
            # Same UID, same geometry: split by acquisition only when that resolves duplicate positions.
            result.extend(_split_acquisitions(slices, "series_uid"))
        else:
            for sub in parts.values():
                result.extend(_split_acquisitions(sub, "series_uid+split", f"SeriesInstanceUID shared by {len(parts)} geometries/echoes/studies"))
    for slices in fallback.values():
        result.extend(
            _split_acquisitions(slices, "fallback", "SeriesInstanceUID empty: grouped by study, frame of reference, geometry, series/acquisition/echo numbers")
        )
    for series in result:
        series.slices.sort(key=lambda s: str(s.path))
    result.sort(key=lambda se: (str(se.folder), se.first.series_number, str(se.first.path)))
    return result


def _split_acquisitions(slices: list[SliceHeader], grouping: str, note: str = "") -> list[Series]:
    positions = [tuple(np.round(s.position, 3)) if s.position is not None else None for s in slices]
    has_dupes = len(set(positions)) < len(positions)
    acqs = {s.acquisition_number for s in slices}
    if has_dupes and len(acqs) > 1:
        groups: dict[str, list[SliceHeader]] = defaultdict(list)
        for s in slices:
            groups[s.acquisition_number].append(s)
        extra = f"split into {len(groups)} acquisitions (duplicate positions)"
        return [Series(g, grouping + "+acquisition", "; ".join(x for x in (note, extra) if x)) for g in groups.values()]
    return [Series(list(slices), grouping, note)]


@dataclass
class Geometry:
    """A series' exact voxel grid: RAS+ affine, slice order and spacing, and what was noticed (flags)."""

    affine_ras: np.ndarray  # 4x4
    order: list[int]  # slice index k -> index into series.slices
    spacing: tuple[float, float, float]
    max_position_error_mm: float
    flags: list[str]


def series_geometry(series: Series, tolerance_mm: float = POSITION_TOLERANCE_MM, allow_irregular: bool = False) -> Geometry:
    """Slice order, spacing and RAS affine from IPP/IOP/PixelSpacing; refuse what is not exact.

    Args:
        series: the series.
        tolerance_mm: how far a slice origin may lie from a regular grid.
        allow_irregular: flag missing slices, irregular spacing and in-plane drift instead of
            refusing them.

    Returns:
        The exact grid: RAS+ affine, slice order, spacing, largest position error and flags.

    Raises:
        SeriesError: what no exact grid can represent, with its code (``missing_geometry``,
            ``duplicate_position``, ``gantry_tilt``, ``missing_slices``, ``mixed_orientation``, ...).
    """
    first = series.first
    where = f"series in {series.folder} ({len(series.slices)} files)"
    placed: list[tuple[np.ndarray, np.ndarray, tuple[float, float]]] = []  # (IPP, IOP, PixelSpacing) of each slice, once present
    for s in series.slices:
        if s.frames != 1:
            raise SeriesError(f"{s.path}: multi-frame image ({s.frames} frames) in a series of single frames is not supported", "multiframe_unsupported")
        if s.samples_per_pixel != 1:
            raise SeriesError(f"{s.path}: colour image (SamplesPerPixel={s.samples_per_pixel}); only greyscale is supported", "colour_image")
        if s.position is None or s.orientation is None or s.pixel_spacing is None:
            absent = [
                k for k, v in (("ImagePositionPatient", s.position), ("ImageOrientationPatient", s.orientation), ("PixelSpacing", s.pixel_spacing)) if v is None
            ]
            raise SeriesError(f"{s.path}: missing {', '.join(absent)}: the slice cannot be placed in space", "missing_geometry")
        if s.rows <= 0 or s.cols <= 0:
            raise SeriesError(f"{s.path}: Rows/Columns missing or zero", "bad_image_tag")
        if min(s.pixel_spacing) <= 0:
            raise SeriesError(f"{s.path}: PixelSpacing must be positive, got {list(s.pixel_spacing)}", "bad_geometry_tag")
        lo, hi = SPACING_RANGE_MM
        if not all(lo <= v <= hi for v in s.pixel_spacing):
            raise SeriesError(f"{s.path}: PixelSpacing {list(s.pixel_spacing)} mm is outside the plausible range [{lo:g}, {hi:g}] mm", "bad_geometry_tag")
        if not np.max(np.abs(s.position)) <= MAX_ABS_POSITION_MM:
            raise SeriesError(
                f"{s.path}: ImagePositionPatient {[float(v) for v in s.position]} mm is further than {MAX_ABS_POSITION_MM:g} mm from the scanner origin",
                "bad_geometry_tag",
            )
        placed.append((s.position, s.orientation, s.pixel_spacing))
    if len(series.slices) < 2:
        raise SeriesError(f"{first.path}: single-slice series: no slice spacing can be derived from positions", "single_slice")
    iop = placed[0][1]
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise SeriesError(f"{first.path}: ImageOrientationPatient is not two orthogonal unit vectors ({[float(v) for v in iop]})", "bad_orientation")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    for s, (_, orientation, _) in zip(series.slices, placed):
        if np.max(np.abs(orientation - iop)) > ORIENTATION_TOLERANCE * 10:
            raise SeriesError(f"{where}: slices have different ImageOrientationPatient (e.g. {s.path})", "mixed_orientation")
    positions = np.stack([position for position, _, _ in placed])
    dist = positions @ normal
    order = list(np.argsort(dist, kind="stable"))
    d = dist[order]
    gaps = np.diff(d)
    if np.any(gaps < tolerance_mm):
        k = int(np.argmin(gaps))
        a, b = series.slices[order[k]].path, series.slices[order[k + 1]].path
        raise SeriesError(f"{where}: duplicate slice position {d[k]:.3f} mm along the normal ({a.name} and {b.name})", "duplicate_position")
    # Residual of every slice origin from a regular grid along the normal, in 3D: along the
    # normal it is irregular spacing or missing slices; in-plane it is drift (jitter, or a
    # sheared stack from gantry tilt, which no exact qform can represent).
    p0 = positions[order[0]]
    n = len(d)
    dz = float((d[-1] - d[0]) / (n - 1))
    resid = positions[order] - (p0 + np.outer(dz * np.arange(n), normal))
    along = np.abs(resid @ normal)
    drift_k = np.linalg.norm(resid - np.outer(resid @ normal, normal), axis=1)
    drift = float(np.max(drift_k))
    err = float(np.max(np.linalg.norm(resid, axis=1)))
    if drift > max(0.1, 10 * tolerance_mm) and drift_k[-1] >= 0.5 * drift:
        raise SeriesError(
            f"{where}: slice origins drift {drift:.2f} mm in-plane, growing along the stack (gantry tilt or sheared stack); "
            "an exact NIfTI with qform = sform cannot represent it. Resample it with a tilt-correcting tool first",
            "gantry_tilt",
        )
    flags: list[str] = []
    if err > tolerance_mm:
        median = float(np.median(gaps))
        big = np.nonzero(gaps > 1.5 * median)[0]
        if len(big):
            missing = int(round(float(np.sum(gaps[big] / median - 1))))
            msg = f"{where}: about {missing} missing slice(s): gap of {gaps[big[0]]:.3f} mm after position {d[big[0]]:.3f} mm (typical spacing {median:.3f} mm)"
            code = "missing_slices"
        elif float(np.max(along)) > tolerance_mm:
            msg = f"{where}: irregular slice spacing: positions deviate up to {err:.4f} mm from a regular grid (tolerance {tolerance_mm} mm)"
            code = "irregular_spacing"
        else:
            msg = f"{where}: slice origins drift up to {drift:.4f} mm in-plane from a regular grid (tolerance {tolerance_mm} mm)"
            code = "inplane_drift"
        if not allow_irregular:
            raise SeriesError(msg + "; refused (pass --allow-irregular to convert it with a flag)", code)
        flags.append(code)
    ps_row, ps_col = placed[0][2]  # DICOM: [between rows, between columns]
    # The LPS affine (i along a row, j down a column, k along row x column) from the normalised
    # directions: the matrix highdicom's create_affine_matrix_from_attributes builds, bit for bit
    # (tests/test_dicom_affine.py), assembled with nibabel, which prepare imports anyway;
    # highdicom's own import (its SR code dictionaries) cost every prepare 0.1 s of start-up.
    from nibabel.affines import from_matvec

    lps = from_matvec(np.column_stack([row_dir * ps_col, col_dir * ps_row, normal * dz]), p0)  # type: ignore[no-untyped-call]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    check_affine(ras, (first.cols, first.rows, n), where)
    return Geometry(affine_ras=ras, order=[int(o) for o in order], spacing=(ps_col, ps_row, dz), max_position_error_mm=err, flags=flags)


@dataclass
class Volume:
    """A loaded series: voxels on its exact grid, affine, modality, flags and geometry."""

    array: np.ndarray  # [i, j, k]; int16 when exact (CT in HU), else float32
    affine_ras: np.ndarray
    modality: str
    flags: list[str]
    geometry: Geometry


def _needs_gdcm(s: SliceHeader) -> bool:
    in_process, isolated = plugins_for(s.dataset) if s.dataset is not None else ([], False)
    return isolated and not in_process


def load_series(series: Series, tolerance_mm: float = POSITION_TOLERANCE_MM, allow_irregular: bool = False) -> Volume:
    """Read a series into a volume on its exact grid, with rescale slope/intercept applied.

    The volume is Fortran-ordered [i, j, k], the order NIfTI stores, so each slice is one
    contiguous copy and writing needs no transpose. Integer pixels with slope 1 and an
    integer intercept (CT) stay exact int16 HU; anything else becomes float32.

    Args:
        series: the series.
        tolerance_mm: see `series_geometry`.
        allow_irregular: see `series_geometry`.

    Returns:
        The volume, its RAS+ affine, modality, flags and geometry.

    Raises:
        SeriesError: the geometry is refused, pixel data is too large, short, undecodable or
            of the wrong shape, or values are not finite after rescale.
    """
    geometry = series_geometry(series, tolerance_mm, allow_irregular)
    first = series.first
    shape = (first.cols, first.rows, len(series.slices))
    for s in series.slices:
        if s.dataset is not None:
            check_pixel_length(s.path, s.dataset)  # every slice, before the volume is allocated
    check_size(shape, 2, f"series in {series.folder} ({len(series.slices)} files)")
    out16 = np.empty(shape, dtype=np.int16, order="F")
    out32: np.ndarray | None = None  # switched to when a slice is not exact int16
    frames: dict[Path, np.ndarray] = {}  # decoded enhanced multi-frame files
    # Files only GDCM decodes go through one child process for the whole series, in the
    # order they are read here; uncompressed data never leaves this process.
    ordered = list(dict.fromkeys(series.slices[idx].path for idx in geometry.order if _needs_gdcm(series.slices[idx])))
    batch = set(ordered)
    with IsolatedDecoder(ordered) if ordered else contextlib.nullcontext() as isolated:
        for k, idx in enumerate(geometry.order):
            s = series.slices[idx]
            if s.frame is None:
                arr, ds = read_pixels(s.path, s.dataset, isolated if s.path in batch else None)
                s.dataset = None  # pixel data cached on the dataset: drop it once copied
            else:
                if s.path not in frames:
                    whole, _ = read_pixels(s.path, s.dataset, isolated if s.path in batch else None)
                    frames[s.path] = whole.reshape((-1, *whole.shape[-2:]))
                # an enhanced image's frames keep its dataset (only single-frame slices drop theirs)
                arr, ds = frames[s.path][s.frame], cast(pydicom.Dataset, s.dataset)
            out32 = _place_slice(series, first, s, k, arr, ds, out16, out32)
    array = out16 if out32 is None else out32
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise SeriesError(f"series in {series.folder}: pixel values are not finite after rescale", "non_finite")
    return Volume(array=array, affine_ras=geometry.affine_ras, modality=first.modality, flags=list(geometry.flags), geometry=geometry)


def _place_slice(
    series: Series, first: SliceHeader, s: SliceHeader, k: int, arr: np.ndarray, ds: pydicom.Dataset, out16: np.ndarray, out32: np.ndarray | None
) -> np.ndarray | None:
    """Write slice `k` (rescaled) into the volume; returns the float32 volume once a slice
    is not exact int16 (None while every slice so far was)."""
    if arr.shape != (first.rows, first.cols):
        raise SeriesError(f"{s.path}: pixel array shape {arr.shape} does not match Rows x Columns of the series {(first.rows, first.cols)}", "bad_image_tag")
    slope, intercept = s.rescale or _rescale(ds, s.path)
    if out32 is None and arr.dtype.kind in "iu" and slope == 1.0 and intercept == round(intercept):
        shift = int(intercept)
        if arr.size and (int(arr.min()) + shift < -32768 or int(arr.max()) + shift > 32767):
            out32 = out16.astype(np.float32, order="F")
        else:
            # one pass: out16's slice k is laid out as arr.T (i along a row); the sum fits int16 (checked), so the cast is exact
            np.add(arr.T, shift, out=out16[:, :, k], casting="unsafe", dtype=np.int32)
            return None
    if out32 is None:
        out32 = out16.astype(np.float32, order="F")  # earlier slices were exact: same values
    out32[:, :, k] = (arr.astype(np.float64) * slope + intercept).T
    return out32


def _rescale(ds: pydicom.Dataset, path: Path) -> tuple[float, float]:
    try:
        raw_slope, raw_intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope = 1.0 if raw_slope in (None, "") else float(raw_slope)
        intercept = 0.0 if raw_intercept in (None, "") else float(raw_intercept)
    except (TypeError, ValueError):
        raise SeriesError(f"{path}: RescaleSlope/RescaleIntercept are not numeric", "bad_rescale") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise SeriesError(f"{path}: RescaleSlope {slope} / RescaleIntercept {intercept} are not usable", "bad_rescale")
    return slope, intercept
