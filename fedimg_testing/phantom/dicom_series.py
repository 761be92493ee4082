"""A phantom volume written as a PACS-like DICOM series (CT or MR), and the affines of that grid."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from highdicom.spatial import create_affine_matrix_from_attributes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from fedimg_core import atomic
from fedimg_testing.phantom.identifiers import PlantedIdentifiers
from fedimg_testing.phantom.volume import PhantomVolume, mr_like

_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0009, "FEDIMG PHANTOM"


def _directions(orientation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_dir, col_dir, normal) from ImageOrientationPatient-style 6 values: the first
    three are the direction of increasing column index, the next three of increasing row."""
    o = np.asarray(orientation, dtype=float).reshape(-1)
    if o.shape != (6,):
        raise ValueError(f"orientation must have 6 values, got {orientation!r}")
    r, c = o[:3], o[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise ValueError(f"orientation {tuple(o)} is not an orthonormal pair of directions")
    # Tolerate DICOM's limited precision, then work with an exactly orthonormal frame.
    r = r / np.linalg.norm(r)
    c = c - (c @ r) * r
    c = c / np.linalg.norm(c)
    return r, c, np.cross(r, c)


def volume_affine_lps(volume: PhantomVolume, origin, orientation) -> np.ndarray:
    """4x4 LPS affine of the voxel grid ``[x, y, z]`` as :func:`write_dicom_series` writes it."""
    r, c, _ = _directions(orientation)
    sx, sy, sz = volume.spacing
    # highdicom's affine of (IPP, IOP, PixelSpacing = [between rows, between columns], slice spacing)
    return create_affine_matrix_from_attributes(np.asarray(origin, dtype=float), [*r, *c], (sy, sx), sz)


def volume_affine_ras(volume: PhantomVolume, origin, orientation) -> np.ndarray:
    """4x4 RAS+ (NIfTI) affine of the grid as written: the LPS affine, x and y rows negated."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume_affine_lps(volume, origin, orientation)


def _ds(values) -> list[DSfloat]:
    # DS holds 16 characters at most; auto_format rounds instead of raising.
    return [DSfloat(float(v) + 0.0, auto_format=True) for v in values]  # + 0.0: no "-0.0"


def _uid(*parts, avoid: Sequence[str] = ()) -> UID:
    """A deterministic UID (pydicom's prefix) that contains no planted digit string."""
    for attempt in range(100):
        uid = generate_uid(entropy_srcs=[*map(str, parts), str(attempt)])
        if not any(a in uid for a in avoid):
            return uid
    raise RuntimeError("could not generate a UID free of planted strings")  # pragma: no cover


def _stored_values(hu: np.ndarray, rescale) -> tuple[np.ndarray, int]:
    slope, intercept = float(rescale[0]), float(rescale[1])
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    lo, hi = stored.min(), stored.max()
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16), 0
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16), 1
    raise ValueError(f"rescale {rescale} maps the HU range to [{lo}, {hi}], which does not fit 16 bits")


def write_dicom_series(
    volume: PhantomVolume,
    out_dir: str | os.PathLike,
    identifiers: PlantedIdentifiers,
    *,
    origin: Sequence[float] = (-150.0, -180.0, -300.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    file_names: str = "random",
    rescale: tuple[float, float] = (1.0, -1024.0),
    seed: int = 0,
    series_number: int = 2,
    instance_order: str = "shuffled",
    modality: str = "CT",
    pixel_values: np.ndarray | None = None,
    body_part: str = "ABDOMEN",
) -> list[Path]:
    """Write `volume` as a CT Image Storage series, one file per slice, into `out_dir`.

    ``modality="MR"`` writes an MR Image Storage series of the same anatomy instead: the
    pixel values are :func:`mr_like` of the volume (seeded by `seed`), stored as unsigned
    integers without a rescale (MR has no Hounsfield scale; `rescale` is not used), with MR
    acquisition attributes in place of the CT ones. With `pixel_values` (MR only; an array of
    the volume's shape, values in [0, 65535]) those values, rounded, are stored instead of
    :func:`mr_like`'s: for phantoms that render their own MR contrast (the brain phantom).
    `body_part` is written as BodyPartExamined.

    Slice ``k`` (``volume.hu[:, :, k]``, transposed to DICOM's [row, column]) is at
    ``ImagePositionPatient = origin + k * slice_spacing * normal``. Stored values are
    ``(HU - intercept) / slope`` (uint16 when they fit, else int16), exact when that is an
    integer. `transfer_syntax` is a native one (Explicit/Implicit VR Little Endian,
    Deflated -- whose header bytes are compressed, so byte scans do not see them) or RLE
    Lossless, JPEG-LS Lossless, JPEG 2000 Lossless. UIDs not given are derived
    deterministically from the identifiers, the phase and `seed`; so are the file names
    (``"random"``: 16 hex digits, no extension; ``"instance"``: ``IM%04d`` of the
    InstanceNumber) and the InstanceNumbers (`instance_order` ``"shuffled"``,
    ``"ascending"`` or ``"descending"`` along the normal). Files are written atomically.

    Files already in `out_dir` are left alone (same name: replaced), so write each series
    into its own folder. Returns the file paths in slice order (ascending position along
    the normal).
    """
    ts = UID(str(transfer_syntax))
    if ts not in _NATIVE + _COMPRESSED:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}); use one of {[u.name for u in _NATIVE + _COMPRESSED]}")
    if file_names not in ("random", "instance"):
        raise ValueError(f"file_names must be 'random' or 'instance', got {file_names!r}")
    if instance_order not in ("shuffled", "ascending", "descending"):
        raise ValueError(f"instance_order must be shuffled, ascending or descending, got {instance_order!r}")
    r, c, n = _directions(orientation)
    origin = np.asarray(origin, dtype=float)
    nx, ny, nz = volume.hu.shape
    dx, dy, dz = volume.spacing
    ids = identifiers
    avoid = ids.strings()
    study_uid = study_uid or _uid("study", ids.patient_id, ids.accession, seed, avoid=avoid)
    series_uid = series_uid or _uid("series", study_uid, volume.phase, series_number, seed, avoid=avoid)
    frame_of_reference_uid = frame_of_reference_uid or _uid("for", series_uid, avoid=avoid)
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    mr = modality == "MR"
    if pixel_values is not None:
        if not mr:
            raise ValueError("pixel_values is for MR series only (a CT series stores the volume's HU)")
        given = np.rint(np.asarray(pixel_values, dtype=np.float64))
        if given.shape != volume.hu.shape:
            raise ValueError(f"pixel_values has shape {given.shape}, the volume {volume.hu.shape}")
        if given.size and (given.min() < 0 or given.max() > 65535):
            raise ValueError(f"pixel_values must lie in [0, 65535], got [{given.min()}, {given.max()}]")
        stored, pixel_rep = given.astype(np.uint16), 0
    elif mr:
        stored, pixel_rep = np.rint(mr_like(volume, seed)).astype(np.uint16), 0
    else:
        stored, pixel_rep = _stored_values(volume.hu, rescale)
    sop_class = MRImageStorage if mr else CTImageStorage

    rng = np.random.default_rng([int(seed), zlib.crc32(series_uid.encode())])
    if instance_order == "shuffled":
        numbers = rng.permutation(nz) + 1
    elif instance_order == "ascending":
        numbers = np.arange(1, nz + 1)
    else:
        numbers = np.arange(nz, 0, -1)
    if file_names == "random":
        names: list[str] = []
        while len(names) < nz:
            name = rng.bytes(8).hex().upper()
            if name not in names:
                names.append(name)
    else:
        names = [f"IM{int(num):04d}" for num in numbers]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contrast = volume.phase != "non_contrast"
    paths = []
    for k in range(nz):
        ipp = origin + k * dz * n
        sop_uid = _uid("sop", series_uid, k, avoid=avoid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.SourceApplicationEntityTitle = ids.ae_title
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ids.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ids.study_time
        ds.AcquisitionDateTime = ids.study_date + ids.study_time
        ds.AccessionNumber = ids.accession
        ds.Modality = modality
        ds.Manufacturer = "FEDIMG"
        ds.InstitutionName = ids.institution
        ds.InstitutionAddress = ids.institution_address
        ds.ReferringPhysicianName = ids.referring_physician
        ds.StationName = ids.station
        ds.StudyDescription = ids.study_description
        ds.SeriesDescription = ids.series_description
        ds.InstitutionalDepartmentName = ids.department
        ds.PerformingPhysicianName = ids.performing_physician
        ds.OperatorsName = ids.operator
        ds.ManufacturerModelName = f"Phantom {modality}"
        ds.PatientName = ids.patient_name
        ds.PatientID = ids.patient_id
        ds.PatientBirthDate = ids.birth_date
        ds.PatientSex = ids.patient_sex
        ds.OtherPatientIDs = ids.other_patient_id  # retired, but still written by many scanners
        other = Dataset()
        other.PatientID = ids.other_patient_id
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = DicomSequence([other])
        ds.PatientAge = ids.patient_age
        ds.PatientAddress = ids.patient_address
        ds.BodyPartExamined = body_part
        if contrast:
            ds.ContrastBolusAgent = "GADOTERATE" if mr else "IOHEXOL 350"
            ds.ContrastBolusRoute = "IV"
            ds.ContrastBolusVolume = 15 if mr else 100
        ds.SliceThickness = _ds([dz])[0]
        ds.DeviceSerialNumber = ids.device_serial
        ds.SoftwareVersions = "fedimg-phantom 1"
        if mr:  # a T1-weighted 3D gradient echo
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = 4.0
            ds.EchoTime = 1.9
            ds.EchoTrainLength = 1
            ds.FlipAngle = 10
            ds.MagneticFieldStrength = 1.5
            ds.ImagingFrequency = 63.87
            ds.ImagedNucleus = "1H"
        else:
            ds.ScanOptions = "HELICAL MODE"
            ds.KVP = 120
            ds.DataCollectionDiameter = 500
            ds.ReconstructionDiameter = _ds([max(nx * dx, ny * dy)])[0]
            ds.GantryDetectorTilt = 0
            ds.TableHeight = 150
            ds.RotationDirection = "CW"
            ds.ExposureTime = 500
            ds.XRayTubeCurrent = 250
            ds.Exposure = 125
            ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ids.study_id
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = _ds(ipp)
        ds.ImageOrientationPatient = _ds([*r, *c])
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds([ipp @ n])[0]
        ds.ImageComments = ids.image_comments
        request = Dataset()
        request.AccessionNumber = ids.accession
        request.RequestedProcedureID = ids.requested_procedure_id
        request.RequestedProcedureDescription = ids.requested_procedure_description
        request.ScheduledProcedureStepID = ids.requested_procedure_id
        ds.RequestAttributesSequence = DicomSequence([request])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = _ds([dy, dx])  # [between rows, between columns]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        if mr:
            ds.WindowCenter, ds.WindowWidth = 400, 800
        else:
            ds.WindowCenter = 40
            ds.WindowWidth = 400
            ds.RescaleIntercept = _ds([rescale[1]])[0]
            ds.RescaleSlope = _ds([rescale[0]])[0]
            ds.RescaleType = "HU"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", ids.private_text)
        block.add_new(0x11, "LO", ids.patient_id)  # vendors copy IDs into private tags
        block.add_new(0x12, "SH", ids.accession)

        frame = np.ascontiguousarray(stored[:, :, k].T)  # DICOM frames are [row, column]
        if ts in _COMPRESSED:
            # generate_instance_uid=False: pydicom 3 otherwise gives the (lossless!) result a new SOP Instance UID
            ds.compress(ts, frame, generate_instance_uid=False)
        else:
            ds.add_new(0x7FE00010, "OW", frame.tobytes())
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = out / names[k]
        atomic.write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
