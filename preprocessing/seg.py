"""DICOM SEG writing (highdicom): a label volume on a DICOM series' grid -> one BINARY SEG.

Used by the phantom (sites' manual labels) and by inference (`pipelines.adaptation.volumes.
write_dicom_seg`, automatic segmentations). Segments are coded with SNOMED CT concepts
derived from the federation schema (organ, or a lesion of an organ).

Voxel order convention (the one of `preprocessing.dicom.load_series` and of the phantom):
``label[i, j, k]`` = (column, row, slice), slice ``k`` being ``source_images[k]``, i.e. the
instances sorted along the slice normal. The SEG's pixel array is ``[slice, row, column]``.

The output is serialised in memory and written atomically: no partial file. A SEG carries
the patient and study attributes of its source images (highdicom copies them, as the
standard requires): it belongs with the images at the site, never with shared outputs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from fedimg_core import atomic
from preprocessing.schema import LabelSchema

__all__ = ["segment_codes", "write_seg"]


def segment_codes(name: str, schema: LabelSchema) -> tuple[Code | CodedConcept, Code | CodedConcept, Code | None]:
    """The SNOMED CT concepts that code a schema class in a DICOM SEG.

    An organ is an anatomical structure of its own type; a lesion class is a morphologically
    altered structure (neoplasm) of its organ's region.

    Args:
        name: a class name of ``schema``.
        schema: the federation's label schema (gives the organ of a lesion class).

    Returns:
        (segmented property category, segmented property type, anatomic region or None).
    """
    organ = schema.organ_of(name) or name
    organ_code = {"liver": codes.SCT.Liver, "kidney": codes.SCT.Kidney, "pancreas": codes.SCT.Pancreas, "spleen": codes.SCT.Spleen}.get(organ)
    if name != organ:  # a lesion class
        return CodedConcept("49755003", "SCT", "Morphologically Altered Structure"), codes.SCT.Neoplasm, organ_code
    if organ_code is None:
        return codes.SCT.AnatomicalStructure, codes.SCT.Organ, None
    return codes.SCT.AnatomicalStructure, organ_code, None


def write_seg(
    source_images: Sequence[str | os.PathLike[str] | pydicom.Dataset],
    local: np.ndarray,
    segment_labels: Sequence[str],
    classes: Sequence[str],
    out: str | os.PathLike[str],
    schema: LabelSchema,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 300,
    instance_number: int = 1,
    manufacturer: str = "FEDIMG",
    manufacturer_model_name: str = "fedimg",
    software_versions: str = "fedimg",
    device_serial_number: str = "0",
    series_description: str | None = None,
    algorithm: hd.AlgorithmIdentificationSequence | None = None,
) -> None:
    """Write a BINARY DICOM SEG of `source_images` (slice order) to `out`, atomically.

    ``local`` holds segment numbers ``1..n`` (0: no segment) on the image grid, indexed
    ``[column, row, slice]``; segment ``s`` is ``classes[s - 1]`` (a schema class name, which
    chooses the codes) labelled ``segment_labels[s - 1]``. ``algorithm`` (a
    ``highdicom.AlgorithmIdentificationSequence``) makes every segment AUTOMATIC; without it
    they are MANUAL. UIDs default to new random ones.

    Args:
        source_images: the series' images (files or datasets), in slice order.
        local: segment numbers on the image grid, ``[column, row, slice]``.
        segment_labels: each segment's SegmentLabel.
        classes: each segment's schema class name (chooses its codes).
        out: the SEG file to write.
        schema: the federation's label schema.
        series_instance_uid: the SEG's series UID (default: a new one).
        sop_instance_uid: the SEG's SOP instance UID (default: a new one).
        series_number: the SEG's SeriesNumber.
        instance_number: the SEG's InstanceNumber.
        manufacturer: the SEG's Manufacturer.
        manufacturer_model_name: the SEG's ManufacturerModelName.
        software_versions: the SEG's SoftwareVersions.
        device_serial_number: the SEG's DeviceSerialNumber.
        series_description: the SEG's SeriesDescription.
        algorithm: makes every segment AUTOMATIC, produced by this algorithm.

    Raises:
        ValueError: labels and classes differ in number, or ``local`` is not integer segment
            numbers with one slice per source image.
    """
    if len(segment_labels) != len(classes):
        raise ValueError(f"{len(segment_labels)} segment labels for {len(classes)} classes")
    sources = [s if isinstance(s, pydicom.Dataset) else pydicom.dcmread(s, stop_before_pixels=True) for s in source_images]
    local = np.asarray(local)
    if local.ndim != 3 or local.shape[2] != len(sources):
        raise ValueError(f"label volume of shape {local.shape} does not have one slice per source image ({len(sources)})")
    if local.dtype.kind not in "iu" or (local.size and (local.min() < 0 or local.max() > len(classes))):
        raise ValueError(f"label volume must hold integer segment numbers 0..{len(classes)}")
    descriptions = []
    for number, (cls, label) in enumerate(zip(classes, segment_labels), start=1):
        category, prop, region = segment_codes(cls, schema)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if algorithm is not None else hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                algorithm_identification=algorithm,
                anatomic_regions=[region] if region is not None else None,
            )
        )
    dtype = np.uint8 if len(classes) <= 255 else np.uint16
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(local.astype(dtype, copy=False).transpose(2, 1, 0)),  # [slice, row, column]
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=int(instance_number),
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        series_description=series_description,
    )
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic.write_bytes(Path(out), buf.getvalue())
