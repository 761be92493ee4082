"""Projection radiographs (CR, DX; one frame per file) as 2D images: which spacing, which grey values, which plane.

A radiograph is a projection: it has no place in the patient's 3D space (no ImagePositionPatient or
ImageOrientationPatient), so it is prepared in its own image plane. Voxel (i, j, 0) = (column, row):
the same axis order as a DICOM slice of a volume, with a singleton third axis of 1 mm, and an affine
that only carries the pixel spacing (diagonal, positive, so that RAS+ canonicalisation never moves
the axes). What the axes point to in the patient (PatientOrientation, e.g. ``L\\F``) and the view
(ViewPosition) are recorded beside the image, from allowlists.

Spacing (PS3.3 C.8.11.4, C.7.6.3.1.7, C.8.11.7): PixelSpacing when present and positive (the
patient plane: calibrated, or equal to the detector's), else ImagerPixelSpacing divided by
EstimatedRadiographicMagnificationFactor when that is present (the detector plane brought to the
patient), else ImagerPixelSpacing as it is (the detector plane; a chest PA magnifies ~5-10 %), else
the spacing the site declares (``--pixel-spacing``); none of these refuses the image. Which one was
used is recorded with the case.

A PNG or JPEG radiograph (an export, or a public dataset's file) is prepared the same way: its grey
levels as stored are the displayed ones (scaled to [0, 1] by the bit depth), and its pixel spacing,
which such files do not carry, is the one the site declares; without one it is refused.

Grey values follow the display pipeline of the standard (PS3.4 N.2.1): Modality LUT (rescale or
LUT sequence), then the first VOI transform the header gives (VOI LUT sequence or window, with
its VOILUTFunction), then MONOCHROME1 inverted; the result is scaled to [0, 1] over the range of
the last transform's output (0 black, 1 white as displayed). Images "for processing" (raw detector
values, before the vendor's processing) are refused: models are trained and used on images for
presentation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from preprocessing.dicom_pixels import read_pixels
from preprocessing.refusals import SPACING_RANGE_MM, SeriesError, check_affine, check_size

__all__ = [
    "DX_FOR_PROCESSING_SOP_CLASS",
    "PICTURE_SUFFIXES",
    "RADIOGRAPH_MODALITIES",
    "SPACING_SOURCES",
    "VIEW_POSITIONS",
    "Radiograph",
    "is_radiograph",
    "load_picture",
    "load_radiograph",
    "presentation_values",
    "radiograph_spacing",
]

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # radiographs as pictures: the spacing is declared
DX_FOR_PROCESSING_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1.1"
# How the pixel spacing was found, in order of preference (recorded with the case).
SPACING_SOURCES = ("PixelSpacing", "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor", "ImagerPixelSpacing", "declared")
# ViewPosition's defined terms (PS3.3 C.8.11.5.1.1): anything else is recorded as "other".
VIEW_POSITIONS = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"})
_ORIENTATION_TERM = re.compile(r"^[APRLHF]{1,3}$")  # PatientOrientation (PS3.3 C.7.6.1.1.1)
SINGLETON_SPACING_MM = 1.0  # the third axis of a 2D image: one voxel of 1 mm


@dataclass
class Radiograph:
    """A radiograph in its image plane.

    Attributes:
        array: (columns, rows, 1) float32 in [0, 1], Fortran order (as NIfTI stores it).
        affine_ras: diagonal affine of the pixel spacing (column, row, 1 mm).
        spacing: (between columns, between rows) in mm.
        spacing_source: one of `SPACING_SOURCES`.
        values: which step of the display pipeline set the grey levels: ``voi_lut``, ``window`` or ``modality``;
            ``picture`` for a PNG/JPEG file (its grey levels as stored).
        photometric: MONOCHROME1 (inverted here) or MONOCHROME2.
        view: ViewPosition from `VIEW_POSITIONS`, ``other`` or ``""`` (absent).
        patient_orientation: what +column and +row point to in the patient (e.g. ``("L", "F")``), or None.
        modality: CR or DX.
    """

    array: np.ndarray
    affine_ras: np.ndarray
    spacing: tuple[float, float]
    spacing_source: str
    values: str
    photometric: str
    view: str
    patient_orientation: tuple[str, str] | None
    modality: str

    def details(self) -> dict[str, str]:
        """What the manifest records about the image (allowlisted values only).

        Returns:
            ``{"spacing_source", "values", "photometric", "view", "patient_orientation"}``.
        """
        return {
            "spacing_source": self.spacing_source,
            "values": self.values,
            "photometric": self.photometric,
            "view": self.view,
            "patient_orientation": "\\".join(self.patient_orientation) if self.patient_orientation else "",
        }


def is_radiograph(modality: str) -> bool:
    """Whether an image is a projection radiograph prepared in 2D.

    Args:
        modality: the Modality (CR, DX, ...).

    Returns:
        True for CR and DX images.
    """
    return modality.upper() in RADIOGRAPH_MODALITIES


def _pair(ds: pydicom.Dataset, keyword: str) -> tuple[float, float] | None:
    """A two-valued DS attribute as floats; None when absent, empty, malformed or not positive."""
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != 2 or not all(np.isfinite(values)) or min(values) <= 0:
        return None
    return values[0], values[1]


def radiograph_spacing(ds: pydicom.Dataset, path: object, declared: tuple[float, float] | None = None) -> tuple[float, float, str]:
    """The pixel spacing of a radiograph and where it came from (see the module docstring for the rule).

    Args:
        ds: the image's header.
        path: the file (named in errors).
        declared: (between rows, between columns) in mm that the site declares for images without one.

    Returns:
        (between rows, between columns, source) in mm; source is one of `SPACING_SOURCES`.

    Raises:
        SeriesError: ``no_pixel_spacing`` when the header has none and none is declared;
            ``bad_geometry_tag`` when the spacing is outside the plausible range.
    """
    spacing: tuple[float, float] | None = None
    source = ""
    if (pixel := _pair(ds, "PixelSpacing")) is not None:
        spacing, source = pixel, "PixelSpacing"
    elif (imager := _pair(ds, "ImagerPixelSpacing")) is not None:
        try:
            magnification = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0.0)
        except (TypeError, ValueError):
            magnification = 0.0
        if np.isfinite(magnification) and magnification >= 1.0:  # >= 1 by construction: the object is between source and detector
            spacing = (imager[0] / magnification, imager[1] / magnification)
            source = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        else:
            spacing, source = imager, "ImagerPixelSpacing"
    elif declared is not None:
        spacing, source = (float(declared[0]), float(declared[1])), "declared"
    if spacing is None:
        raise SeriesError(
            f"{path}: no usable PixelSpacing or ImagerPixelSpacing (PixelSpacing {ds.get('PixelSpacing', 'absent')!s}); "
            "declare the detector's pixel size with --pixel-spacing ROW_MM,COL_MM",
            "no_pixel_spacing",
        )
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= v <= hi for v in spacing):
        raise SeriesError(f"{path}: pixel spacing {list(spacing)} mm ({source}) is outside the plausible range [{lo:g}, {hi:g}] mm", "bad_geometry_tag")
    return spacing[0], spacing[1], source


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range of stored pixel values (BitsStored, PixelRepresentation)."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range of the Modality LUT's output (PS3.3 C.11.1): the LUT's bit depth, or the stored range rescaled."""
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = _stored_range(ds)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def presentation_values(arr: np.ndarray, ds: pydicom.Dataset, path: object) -> tuple[np.ndarray, str]:
    """A radiograph's stored values as displayed, in [0, 1] (0 black).

    Args:
        arr: the decoded stored values (rows, columns).
        ds: the image's header.
        path: the file (named in errors).

    Returns:
        (float32 array in [0, 1], the step that set the grey levels: ``voi_lut``, ``window`` or ``modality``).

    Raises:
        SeriesError: ``bad_presentation`` when the header's LUTs or window cannot be applied,
            ``colour_image`` for anything but MONOCHROME1/2, ``constant_image`` when nothing is left to see.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(f"{path}: PhotometricInterpretation {photometric or 'absent'}; a radiograph must be MONOCHROME1 or MONOCHROME2", "colour_image")
    try:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        lo, hi = _modality_range(ds)
        step = "modality"
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            values = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
            lo, hi, step = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1), "voi_lut"
        elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
            # pydicom maps the window onto the Modality LUT's output range (PS3.3 C.11.2.1.2)
            values = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), dtype=np.float64)
            step = "window"
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise SeriesError(f"{path}: its Modality LUT / VOI LUT / window cannot be applied ({exc})", "bad_presentation") from None
    if not hi > lo:
        raise SeriesError(f"{path}: the display range of its values is empty ({lo:g}..{hi:g})", "bad_presentation")
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":  # the minimum value is white
        scaled = 1.0 - scaled
    if not np.all(np.isfinite(scaled)):
        raise SeriesError(f"{path}: pixel values are not finite after the display pipeline", "non_finite")
    if scaled.size and float(scaled.max() - scaled.min()) == 0.0:
        raise SeriesError(f"{path}: every pixel has the same value after the display pipeline (a blank image)", "constant_image")
    return scaled.astype(np.float32), step


def _view(ds: pydicom.Dataset) -> str:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return view if view in VIEW_POSITIONS or not view else "other"


def _patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    terms = [str(v).strip().upper() for v in value] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else []
    if len(terms) == 2 and all(_ORIENTATION_TERM.match(t) for t in terms):
        return terms[0], terms[1]
    return None


def load_radiograph(path: object, ds: pydicom.Dataset, declared_spacing: tuple[float, float] | None = None) -> Radiograph:
    """Read one radiograph file into its image plane (see the module docstring).

    Args:
        path: the file (a `pathlib.Path`).
        ds: its header (`preprocessing.dicom.read_header`; pixel data read here).
        declared_spacing: (between rows, between columns) in mm for images whose header has none.

    Returns:
        The radiograph: (columns, rows, 1) values in [0, 1], its spacing and how it was found.

    Raises:
        SeriesError: refused, with its code: ``for_processing``, ``multiframe_unsupported``,
            ``colour_image``, ``no_pixel_spacing``, ``bad_image_tag``, ``bad_presentation``,
            ``constant_image``, or a decoding error (`read_pixels`).
    """
    file = Path(str(path))
    modality = str(ds.get("Modality", "") or "").upper() or "OT"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    intent = str(ds.get("PresentationIntentType", "") or "").upper()
    if sop_class == DX_FOR_PROCESSING_SOP_CLASS or intent == "FOR PROCESSING":
        raise SeriesError(
            f"{file}: a radiograph 'for processing' (raw detector values); export it 'for presentation' from the modality or PACS",
            "for_processing",
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise SeriesError(f"{file}: Rows/Columns/NumberOfFrames/SamplesPerPixel are not integers", "bad_image_tag") from None
    if frames != 1:
        raise SeriesError(f"{file}: a radiograph with {frames} frames; one image per file is supported", "multiframe_unsupported")
    if samples != 1:
        raise SeriesError(f"{file}: colour image (SamplesPerPixel={samples}); only greyscale is supported", "colour_image")
    if rows <= 0 or cols <= 0:
        raise SeriesError(f"{file}: Rows/Columns missing or zero", "bad_image_tag")
    row_mm, col_mm, source = radiograph_spacing(ds, file, declared_spacing)
    check_size((cols, rows, 1), 4, f"radiograph {file}")
    arr, ds = read_pixels(file, ds)  # in this process, or GDCM in a child process for this file
    if arr.shape != (rows, cols):
        raise SeriesError(f"{file}: pixel array shape {arr.shape} does not match Rows x Columns {(rows, cols)}", "bad_image_tag")
    values, step = presentation_values(arr, ds, file)
    affine = np.diag([col_mm, row_mm, SINGLETON_SPACING_MM, 1.0])
    check_affine(affine, (cols, rows, 1), f"radiograph {file}")
    return Radiograph(
        array=np.asfortranarray(values.T[:, :, None]),
        affine_ras=affine,
        spacing=(col_mm, row_mm),
        spacing_source=source,
        values=step,
        photometric=str(ds.get("PhotometricInterpretation", "")).upper(),
        view=_view(ds),
        patient_orientation=_patient_orientation(ds),
        modality=modality,
    )


def _grey(arr: np.ndarray, path: Path, problem: str, code: str) -> np.ndarray:
    """A picture's one value per pixel: itself when greyscale, one channel of an RGB(A)/LA picture whose colour
    channels are equal (exports often save grey that way); anything else is refused with ``problem``/``code``."""
    if arr.ndim != 3:
        return arr
    colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
    if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(colour.shape[2])):
        raise SeriesError(f"{path}: {problem}", code)
    return colour[..., 0]


def read_mask(path: Path, kind: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """A radiograph's label mask in the site's values, on the radiograph's pixel grid.

    A PNG mask is read as drawn: rows x columns, one value per pixel (greyscale, palette indices,
    or RGB whose channels are equal). A NIfTI mask is in NIfTI's voxel order, columns x rows, as the
    prepared image (and dcm2niix) store a radiograph; its affine is not used (a mask drawn on a
    projection has no place in space either): only its pixel grid has to match.

    Args:
        path: the mask file.
        kind: ``png`` or ``nifti``.
        image_shape: the prepared radiograph's shape (columns, rows, 1).

    Returns:
        (columns, rows, 1) array of the mask's values.

    Raises:
        SeriesError: ``corrupt_label``, ``colour_label``, ``label_grid_mismatch`` (``label_transposed``
            when it is the image's grid with rows and columns swapped), or a NIfTI reading error.
    """
    from preprocessing.nifti import load_nifti  # the NIfTI reader's checks (size, affine, dtype)

    cols, rows = int(image_shape[0]), int(image_shape[1])
    if kind == "png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.width * im.height > 4 * cols * rows:  # refused before decoding a decompression bomb
                    raise SeriesError(f"{path}: mask of {im.width}x{im.height} pixels for a radiograph of {cols}x{rows}", "label_grid_mismatch")
                arr = np.asarray(im)
        except SeriesError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise SeriesError(f"{path}: unreadable PNG mask ({' '.join(str(exc).split())[:120]})", "corrupt_label") from None
        arr = _grey(arr, path, "a colour PNG mask; save one value per pixel (greyscale or palette)", "colour_label")
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if arr.shape == (cols, rows) and cols != rows:
            raise SeriesError(
                f"{path}: mask is {arr.shape[1]} wide and {arr.shape[0]} high, the radiograph {cols} wide and {rows} high: transposed?", "label_transposed"
            )
        if arr.shape != (rows, cols):
            raise SeriesError(f"{path}: mask of {arr.shape[1]}x{arr.shape[0]} pixels does not match the radiograph's {cols}x{rows}", "label_grid_mismatch")
        return np.asfortranarray(arr.T[:, :, None])
    data = np.asanyarray(load_nifti(path, "label", planar=True).dataobj)
    if data.shape[:2] == (rows, cols) and cols != rows and data.shape[2] == 1:
        raise SeriesError(
            f"{path}: mask grid {tuple(data.shape)} is the radiograph's {(cols, rows, 1)} with rows and columns swapped: store it columns x rows",
            "label_transposed",
        )
    if tuple(data.shape) != (cols, rows, 1):
        raise SeriesError(f"{path}: mask grid {tuple(data.shape)} does not match the radiograph's {(cols, rows, 1)}", "label_grid_mismatch")
    return data


def load_picture(path: Path, modality: str, declared_spacing: tuple[float, float] | None) -> Radiograph:
    """Read a PNG or JPEG radiograph into its image plane (see the module docstring).

    Greyscale of 8 or 16 bits (or RGB with equal channels, as some exports are) is scaled to
    [0, 1] by its bit depth; nothing in the file but its pixels is read (text chunks, EXIF and
    comments never are).

    Args:
        path: the file.
        modality: the site's ``--modality`` (CR or DX): a picture carries none.
        declared_spacing: (between rows, between columns) in mm: required, a picture carries none.

    Returns:
        The radiograph: (columns, rows, 1) values in [0, 1], ``spacing_source`` ``declared``.

    Raises:
        SeriesError: ``no_pixel_spacing``, ``corrupt_image``, ``colour_image``, ``bad_dtype``,
            ``constant_image``, or a size beyond the limits (`check_size`).
    """
    from PIL import Image, UnidentifiedImageError

    if declared_spacing is None:
        raise SeriesError(
            f"{path}: a PNG/JPEG image carries no pixel spacing; declare the detector's pixel size with --pixel-spacing ROW_MM,COL_MM", "no_pixel_spacing"
        )
    row_mm, col_mm = float(declared_spacing[0]), float(declared_spacing[1])
    try:
        with Image.open(path) as im:
            check_size((im.width, im.height, 1), 4, f"image {path}")  # before any pixel is decoded
            mode = im.mode
            arr = np.asarray(im.convert("L") if mode == "P" else im)
    except SeriesError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise SeriesError(f"{path}: unreadable image ({' '.join(str(exc).split())[:120]})", "corrupt_image") from None
    arr = _grey(arr, path, "a colour image; a radiograph is greyscale", "colour_image")
    if arr.dtype == np.uint8:
        top = 255.0
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4 and (arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= 65535)):
        top = 65535.0  # 16-bit greyscale (Pillow's I;16 and I modes)
    else:
        raise SeriesError(f"{path}: pixel type {arr.dtype} ({mode}); give 8- or 16-bit greyscale", "bad_dtype")
    values = arr.astype(np.float64) / top
    if values.size and float(values.max() - values.min()) == 0.0:
        raise SeriesError(f"{path}: every pixel has the same value (a blank image)", "constant_image")
    rows, cols = values.shape
    affine = np.diag([col_mm, row_mm, SINGLETON_SPACING_MM, 1.0])
    check_affine(affine, (cols, rows, 1), f"image {path}")
    return Radiograph(
        array=np.asfortranarray(values.astype(np.float32).T[:, :, None]),
        affine_ras=affine,
        spacing=(col_mm, row_mm),
        spacing_source="declared",
        values="picture",
        photometric="MONOCHROME2",
        view="",
        patient_orientation=None,
        modality=modality,
    )
