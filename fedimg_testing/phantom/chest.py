"""A deterministic chest radiograph phantom (PA view), written as real CR or DX DICOM with planted identifiers.

Anatomy, as a PA radiograph shows it (the patient's right on the viewer's left, first row at the top):
two lung fields (dark, with branching vessel markings), the heart's silhouette (bright, over the
medial part of the left lung field and the mediastinum), ribs as curved bright bands across both
lungs and two clavicles (distractors: never labelled), the diaphragm domes and the soft tissue of
the trunk; optionally a pneumothorax: a crescent of air without markings at the lateral edge of one
lung, bounded by a thin pleural line, the lung field receding from it. Labels (schema ``chest-xr``):
left lung 1, right lung 2, heart 3, pneumothorax 4; a lung's label is its visible field (the heart's
overlap and the pneumothorax excluded), as the paper's datasets draw them.

Scanner differences per site (`SCANNERS`): CR or DX, MONOCHROME1 or MONOCHROME2, bit depth, pixel
spacing and matrix, window, exposure (gain and gamma), noise, a collimation border, and where the
spacing is written (PixelSpacing, ImagerPixelSpacing with or without a magnification factor).
Everything is drawn from ``numpy.random.default_rng`` seeded by (seed, case): the same call gives
the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from fedimg_testing.phantom.identifiers import PlantedIdentifiers

__all__ = ["CHEST_CLASSES", "SCANNERS", "ChestScanner", "ChestRadiograph", "make_chest_radiograph", "write_chest_radiograph"]

CHEST_CLASSES = {"background": 0, "left_lung": 1, "right_lung": 2, "heart": 3, "pneumothorax": 4}
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "FEDIMG PHANTOM"


@dataclass(frozen=True)
class ChestScanner:
    """How one site's machine images and stores a chest PA.

    Attributes:
        modality: CR or DX.
        photometric: MONOCHROME1 (bone dark in the stored values) or MONOCHROME2.
        bits: BitsStored (10 to 16).
        spacing_mm: detector pixel size (square).
        size_mm: (height, width) of the detector field.
        spacing_tag: where the spacing is written: ``PixelSpacing``, ``ImagerPixelSpacing``,
            ``ImagerPixelSpacing+magnification`` (with EstimatedRadiographicMagnificationFactor 1.1) or ``none``.
        gamma: exposure curve (display value ** gamma).
        noise: quantum noise, as a fraction of the display range.
        border: collimation border width in mm (0: none).
        transfer_syntax: how the pixel data is stored.
    """

    modality: str
    photometric: str
    bits: int
    spacing_mm: float
    size_mm: tuple[float, float]
    spacing_tag: str
    gamma: float
    noise: float
    border: float
    transfer_syntax: str = ExplicitVRLittleEndian


# The paper's four sites had four machines: Montgomery (CR), Shenzhen (DX), JSRT (digitised film), SIIM (DX).
SCANNERS: tuple[ChestScanner, ...] = (
    ChestScanner("CR", "MONOCHROME1", 12, 0.175, (420.0, 420.0), "ImagerPixelSpacing", 1.00, 0.010, 12.0),
    ChestScanner("DX", "MONOCHROME2", 14, 0.148, (430.0, 350.0), "PixelSpacing", 0.85, 0.006, 0.0, RLELossless),
    ChestScanner("CR", "MONOCHROME2", 12, 0.200, (430.0, 430.0), "ImagerPixelSpacing+magnification", 1.20, 0.015, 6.0),
    ChestScanner("DX", "MONOCHROME1", 16, 0.139, (410.0, 410.0), "PixelSpacing", 0.95, 0.008, 0.0, JPEG2000Lossless),
)


@dataclass
class ChestRadiograph:
    """One rendered case.

    Attributes:
        display: (rows, columns) display values in [0, 1] (bone white), before the scanner's storage.
        stored: (rows, columns) stored pixel values (uint16), as the DICOM file holds them.
        label: (rows, columns) schema ids of ``chest-xr``.
        spacing_mm: the detector pixel size.
        pneumothorax: whether the case has one (its side: ``left``, ``right`` or ``""``).
    """

    display: np.ndarray
    stored: np.ndarray
    label: np.ndarray
    spacing_mm: float
    pneumothorax: str


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_chest_radiograph(seed: int, case: int, scanner: ChestScanner, pneumothorax: float = 0.3, scale: float = 1.0) -> ChestRadiograph:
    """Render a chest PA of one case on one scanner.

    Args:
        seed: the site's seed.
        case: the case number (with the seed, the random state).
        scanner: the site's scanner.
        pneumothorax: the probability that the case has one.
        scale: the matrix's size relative to the scanner's (0.25: pixels 4x larger, for quick tests).

    Returns:
        The display values, stored values and label.
    """
    rng = np.random.default_rng([int(seed), int(case), 2026])
    spacing = scanner.spacing_mm / scale
    rows, cols = (max(32, int(round(s / spacing))) for s in scanner.size_mm)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    yy, xx = yy * spacing, xx * spacing  # mm, from the top left
    h, w = scanner.size_mm
    cx = w / 2 + rng.normal(0, 6)  # the patient's midline
    top = h * 0.12 + rng.normal(0, 5)
    width = rng.uniform(0.62, 0.72) * w  # the thorax
    lung_h = rng.uniform(0.52, 0.6) * h
    trunk = _ellipse(yy, xx, top + lung_h * 0.55, cx, lung_h * 0.85, width * 0.62)
    # lungs: the patient's right on the viewer's left (PA)
    lungs = {}
    for side, sign in (("right_lung", -1.0), ("left_lung", 1.0)):
        lcx = cx + sign * width * rng.uniform(0.22, 0.25)
        field = _ellipse(yy, xx, top + lung_h * 0.5, lcx, lung_h * 0.5, width * rng.uniform(0.19, 0.22))
        field &= sign * (xx - cx) > width * 0.05  # the mediastinum between them
        lungs[side] = field
    heart = _ellipse(yy, xx, top + lung_h * 0.78, cx + width * 0.08, lung_h * rng.uniform(0.2, 0.24), width * rng.uniform(0.2, 0.24))
    diaphragm = yy > top + lung_h * (0.95 + 0.05 * np.cos((xx - cx) / width * np.pi))
    for side in lungs:
        lungs[side] &= ~diaphragm
    ptx_side = ""
    ptx = np.zeros_like(heart)
    if rng.random() < pneumothorax:
        ptx_side = str(rng.choice(["left", "right"]))
        field = lungs[f"{ptx_side}_lung"]
        sign = 1.0 if ptx_side == "left" else -1.0
        # a crescent along the lateral and apical edge: the field minus the field shrunk towards the hilum
        depth = rng.uniform(8.0, 20.0) / spacing
        shrunk = ndimage.binary_erosion(field, iterations=max(1, int(depth)))
        lateral = sign * (xx - cx) > width * 0.25
        ptx = field & ~shrunk & (lateral | (yy < top + lung_h * 0.25))
        lungs[f"{ptx_side}_lung"] = field & ~ptx
    # attenuation (display value: higher = whiter)
    img = np.where(trunk, 0.55, 0.08)
    img = img + 0.25 * (1 - np.clip(np.abs(xx - cx) / (width * 0.7), 0, 1))  # thicker trunk at the midline
    markings = ndimage.gaussian_filter(rng.normal(0, 1, (rows, cols)), 1.5 / spacing * 2)
    markings = np.clip(markings / (markings.std() + 1e-9), 0, None) * 0.05
    for side, field in lungs.items():
        img = np.where(field, 0.22 + markings, img)
    img = np.where(ptx, 0.12, img)  # air without markings
    if ptx.any():
        line = ptx & ~ndimage.binary_erosion(ptx, iterations=max(1, int(1.0 / spacing)))
        img = np.where(line & ~ndimage.binary_dilation(lungs[f"{ptx_side}_lung"] == 0, iterations=1), 0.5, img)
    img = np.where(heart, np.maximum(img, 0.62), img)
    img = np.where(diaphragm & trunk, 0.7, img)
    # ribs and clavicles: distractors
    for k in range(9):
        for sign in (-1.0, 1.0):  # each side's ribs stop at the spine
            y0 = top + lung_h * (0.08 + 0.105 * k)
            curve = y0 + 0.0015 * (xx - cx) ** 2 / (1 + k * 0.1)  # a rib's arc, flatter lower down
            band = (np.abs(yy - curve) < rng.uniform(3.0, 5.0)) & (sign * (xx - cx) > width * 0.04) & trunk
            img = np.where(band, img + 0.12, img)
    for sign in (-1.0, 1.0):
        slope = 0.18 * sign
        clavicle = (np.abs(yy - (top - 8 + slope * (xx - cx))) < 6.0) & (np.abs(xx - cx) < width * 0.42) & (np.abs(xx - cx) > 15)
        img = np.where(clavicle, img + 0.2, img)
    spine = np.abs(xx - cx) < width * 0.05
    img = np.where(spine & trunk, np.maximum(img, 0.66), img)
    img = np.clip(ndimage.gaussian_filter(img, 0.6 / spacing), 0, 1)
    img = np.clip(img**scanner.gamma + rng.normal(0, scanner.noise, img.shape), 0, 1)
    if scanner.border > 0:
        b = int(round(scanner.border / spacing))
        img[:b, :] = img[-b:, :] = img[:, :b] = img[:, -b:] = 1.0  # collimated: unexposed, white
    label = np.zeros((rows, cols), np.uint8)
    label[lungs["left_lung"]] = CHEST_CLASSES["left_lung"]
    label[lungs["right_lung"]] = CHEST_CLASSES["right_lung"]
    label[heart] = CHEST_CLASSES["heart"]  # the heart over the left lung field: the lung's label is its visible part
    label[ptx] = CHEST_CLASSES["pneumothorax"]
    top_value = 2**scanner.bits - 1
    shown = 1.0 - img if scanner.photometric == "MONOCHROME1" else img
    stored = np.round(shown * top_value).astype(np.uint16)
    return ChestRadiograph(display=img.astype(np.float32), stored=stored, label=label, spacing_mm=spacing, pneumothorax=ptx_side)


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return f"2.25.{int(digest[:30], 16)}"


def write_chest_radiograph(
    case: ChestRadiograph, scanner: ChestScanner, path: str | os.PathLike, identifiers: PlantedIdentifiers, seed: int, number: int
) -> Path:
    """Write one case as a CR or DX (for presentation) DICOM file, identifiers planted where scanners put them.

    Args:
        case: the rendered case.
        scanner: its scanner.
        path: the file to write (atomically).
        identifiers: what to plant (names, IDs, dates, institution, private tags).
        seed: the site's seed (UIDs derive from it and ``number``).
        number: the case number.

    Returns:
        The file.
    """
    ids = identifiers
    sop_class = CR_SOP_CLASS if scanner.modality == "CR" else DX_PRESENTATION_SOP_CLASS
    sop_uid = _uid("sop", seed, number, ids.patient_id)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.UID(str(scanner.transfer_syntax))
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = ids.ae_title
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ids.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ids.study_time
    ds.AccessionNumber = ids.accession
    ds.Modality = scanner.modality
    ds.Manufacturer = "FEDIMG"
    ds.ManufacturerModelName = f"Phantom {scanner.modality}"
    ds.InstitutionName = ids.institution
    ds.InstitutionAddress = ids.institution_address
    ds.InstitutionalDepartmentName = ids.department
    ds.ReferringPhysicianName = ids.referring_physician
    ds.PerformingPhysicianName = ids.performing_physician
    ds.OperatorsName = ids.operator
    ds.StationName = ids.station
    ds.StudyDescription = ids.study_description
    ds.SeriesDescription = ids.series_description
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ids.birth_date
    ds.PatientSex = ids.patient_sex
    ds.PatientAge = ids.patient_age
    ds.PatientAddress = ids.patient_address
    other = Dataset()
    other.PatientID = ids.other_patient_id
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.DeviceSerialNumber = ids.device_serial
    ds.SoftwareVersions = "fedimg-phantom 1"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # +column to the patient's left, +row to the feet: a PA view
    ds.KVP = 120
    ds.ExposureTime = 12
    ds.XRayTubeCurrent = 200
    ds.StudyInstanceUID = _uid("study", seed, number, ids.patient_id)
    ds.SeriesInstanceUID = _uid("series", seed, number, ids.patient_id)
    ds.StudyID = ids.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageComments = ids.image_comments
    request = Dataset()
    request.AccessionNumber = ids.accession
    request.RequestedProcedureID = ids.requested_procedure_id
    request.RequestedProcedureDescription = ids.requested_procedure_description
    ds.RequestAttributesSequence = DicomSequence([request])
    if scanner.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if scanner.photometric == "MONOCHROME1" else "IDENTITY"
        ds.ImageLaterality = "U"
    spacing = [round(case.spacing_mm, 6)] * 2
    if scanner.spacing_tag == "PixelSpacing":
        ds.PixelSpacing = spacing
        ds.ImagerPixelSpacing = spacing
    elif scanner.spacing_tag.startswith("ImagerPixelSpacing"):
        ds.ImagerPixelSpacing = spacing
        if scanner.spacing_tag.endswith("+magnification"):
            ds.EstimatedRadiographicMagnificationFactor = 1.1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.Rows, ds.Columns = case.stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits
    ds.HighBit = scanner.bits - 1
    ds.PixelRepresentation = 0
    top_value = 2**scanner.bits - 1
    ds.WindowCenter = round(top_value * 0.5, 1)
    ds.WindowWidth = round(top_value * 0.95, 1)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", ids.private_text)
    block.add_new(0x11, "LO", ids.patient_id)
    block.add_new(0x12, "SH", ids.accession)
    frame = np.ascontiguousarray(case.stored)
    if meta.TransferSyntaxUID.is_compressed:
        ds.compress(meta.TransferSyntaxUID, frame, generate_instance_uid=False)
    else:
        ds.PixelData = frame.tobytes()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, out)
    return out


@dataclass
class ChestSite:
    """What `write_chest_site` wrote: ``images/<case>.dcm``, PNG masks ``labels/<case>.png`` of the classes
    the site labels (its own local values, in ``site-labels.yaml``), and, for classes it does not label,
    PNG reference masks ``reference-labels/<case>.png`` with ``reference-labels.yaml``.

    Attributes:
        root: the site folder.
        images: the DICOM files, one per case.
        labels: the masks (same order).
        label_map: the site label map.
        classes: the classes the site labels.
        identifiers: what each case's header carries (planted).
        pneumothorax: each case's pneumothorax side (``""``: none).
        scanner: the site's scanner.
        reference_labels: the reference masks, or None.
        reference_label_map: their label map, or None.
    """

    root: Path
    images: list[Path]
    labels: list[Path]
    label_map: Path
    classes: list[str]
    identifiers: list[PlantedIdentifiers]
    pneumothorax: list[str]
    scanner: ChestScanner
    reference_labels: list[Path] | None = None
    reference_label_map: Path | None = None


def _label_map_text(local: dict[str, int]) -> str:
    lines = ["format: fedimg-site-labels", "schema: chest-xr", "schema_version: 0.1.0", "labels:", "  0: background"]
    lines += [f"  {value}: {name}" for name, value in sorted(local.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"


def _write_mask(label: np.ndarray, local: dict[str, int], path: Path) -> Path:
    """A PNG mask of the named classes of a schema-id label, in the site's local values."""
    from PIL import Image

    mask = np.zeros(label.shape, np.uint8)
    for name, value in local.items():
        mask[label == CHEST_CLASSES[name]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def write_chest_site(
    root: str | os.PathLike, seed: int, n_cases: int, scanner: ChestScanner, classes: list[str], reference_classes: list[str] | None = None,
    scale: float = 0.25, pneumothorax: float = 0.3,
) -> ChestSite:  # fmt: skip
    """A phantom radiograph site: DICOM files, masks of the classes it labels, reference masks of others.

    Local label values are the class's schema id + 10 (a site's own numbering, remapped by its
    label map). A pneumothorax site labels the pneumothorax only, and most of its images have none
    (an empty mask is a valid label).

    Args:
        root: the site folder (created).
        seed: the site's seed.
        n_cases: how many images.
        scanner: the site's scanner (`SCANNERS`).
        classes: the classes it labels (of `CHEST_CLASSES`).
        reference_classes: classes it holds test-only reference masks of.
        scale: the matrix's size relative to the scanner's.
        pneumothorax: the probability of a pneumothorax per case.

    Returns:
        What was written.
    """
    root = Path(root)
    local = {name: CHEST_CLASSES[name] + 10 for name in classes}
    ref_local = {name: CHEST_CLASSES[name] + 10 for name in reference_classes or []}
    images, labels, refs, ids, ptx = [], [], [], [], []
    for i in range(n_cases):
        case = make_chest_radiograph(seed, i, scanner, pneumothorax=pneumothorax, scale=scale)
        planted = PlantedIdentifiers.for_case(seed, i)
        images.append(write_chest_radiograph(case, scanner, root / "images" / f"cxr_{i:03d}.dcm", planted, seed, i))
        labels.append(_write_mask(case.label, local, root / "labels" / f"cxr_{i:03d}.png"))
        if ref_local:
            refs.append(_write_mask(case.label, ref_local, root / "reference-labels" / f"cxr_{i:03d}.png"))
        ids.append(planted)
        ptx.append(case.pneumothorax)
    label_map = root / "site-labels.yaml"
    label_map.write_text(_label_map_text(local))
    ref_map = None
    if ref_local:
        ref_map = root / "reference-labels.yaml"
        ref_map.write_text(_label_map_text(ref_local))
    return ChestSite(root, images, labels, label_map, list(classes), ids, ptx, scanner, refs or None, ref_map)
