"""A whole phantom site: DICOM series, the site's labels (NIfTI or DICOM SEG) and its label map,
optionally with test-only reference labels of classes the site does not label (NIfTI)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import yaml
from pydicom.uid import (
    ExplicitVRLittleEndian,
)

from fedimg_core import atomic
from fedimg_testing.phantom.dicom_series import _uid, volume_affine_ras, write_dicom_series
from fedimg_testing.phantom.identifiers import PlantedIdentifiers
from fedimg_testing.phantom.tissues import _default_schema
from fedimg_testing.phantom.volume import make_phantom
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.schema import LABEL_MAP_FORMAT, LabelSchema
from preprocessing.seg import write_seg


@dataclass
class PhantomSite:
    """What :func:`write_phantom_site` wrote. ``cases[i]`` has its series in
    ``dicom_dir / cases[i]``, its labels in ``label_paths[i]`` and the identifiers
    ``identifiers[i]`` planted in its headers. With reference classes, ``reference_label_paths[i]``
    is its test-only reference label and ``reference_label_map`` their label map."""

    root: Path
    dicom_dir: Path
    labels_dir: Path
    label_map: Path
    cases: list[str]
    identifiers: list[PlantedIdentifiers]
    classes: list[str]
    phase: str
    label_format: str = "nifti"
    local_values: dict[str, int] | None = None
    label_paths: list[Path] | None = None
    series_uids: list[str] | None = None
    origins: list[tuple[float, float, float]] | None = None
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)
    reference_classes: list[str] | None = None
    reference_label_paths: list[Path] | None = None
    reference_label_map: Path | None = None

    def series_dir(self, i: int) -> Path:
        """The folder of case ``i``'s DICOM series."""
        return self.dicom_dir / self.cases[i]


def site_label_volume(label: np.ndarray, classes: Sequence[str], local_values: dict[str, int], schema: LabelSchema) -> np.ndarray:
    """Schema-id labels -> a site's local labels: only `classes` are labelled; a lesion
    whose class the site does not label counts as its organ when the organ is labelled;
    everything else is background 0."""
    lut = np.zeros(max(schema.classes.values()) + 1, dtype=np.int64)
    for name, sid in schema.classes.items():
        if name in classes:
            lut[sid] = local_values[name]
        else:
            organ = schema.organ_of(name)
            if organ is not None and organ != name and organ in classes:
                lut[sid] = local_values[organ]
    out = lut[label]
    return out.astype(np.uint8 if out.max() <= 255 else np.uint16)


def _write_seg(
    series: list[Path],
    local: np.ndarray,
    segment_names: list[str],
    classes: list[str],
    out: Path,
    identifiers: PlantedIdentifiers,
    schema: LabelSchema,
    uid_seed: str,
) -> None:
    """A BINARY DICOM SEG of the series, one segment per labelled class (``local`` holds
    segment numbers 1..n on the image grid); UIDs deterministic and free of planted strings."""
    avoid = identifiers.strings()
    write_seg(
        series,  # slice order
        local,
        segment_names,
        classes,
        out,
        schema,
        series_instance_uid=_uid("seg-series", uid_seed, avoid=avoid),
        sop_instance_uid=_uid("seg-sop", uid_seed, avoid=avoid),
        series_number=300,
        instance_number=1,
        manufacturer="FEDIMG",
        manufacturer_model_name="Phantom SEG",
        software_versions="fedimg-phantom 1",
        device_serial_number=identifiers.device_serial,
    )


def write_phantom_site(
    root: str | os.PathLike,
    classes: Sequence[str],
    n_cases: int,
    seed: int,
    phase: str = "portal_venous",
    shape: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    local_values: dict[str, int] | None = None,
    label_format: str = "nifti",
    transfer_syntax: str = ExplicitVRLittleEndian,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    *,
    segment_labels: dict[str, str] | None = None,
    file_names: str = "random",
    schema: LabelSchema | None = None,
    modality: str = "CT",
    reference_classes: Sequence[str] | None = None,
) -> PhantomSite:
    """Write a phantom site under `root`, labelling only `classes`.

    ``modality="MR"``: an MR scanner's site, the same kind of anatomy written as MR series
    (:func:`mr_like` intensities; see :func:`write_dicom_series`).

    Layout::

        root/dicom/case_000/<files>      one CT series per case (names never carry PHI)
        root/labels/case_000.nii.gz      label_format="nifti": site-local values on the image grid
        root/labels/case_000.dcm         label_format="seg": DICOM SEG, one segment per class
        root/site-labels.yaml            the site label map (local value or segment -> class)
        root/reference-labels/case_000.nii.gz   with `reference_classes`: test-only reference labels
        root/reference-label-map.yaml    their label map (local values 1..m in the order given)

    Case ``i`` is :func:`make_phantom` of seed ``seed * 1000 + i`` with identifiers
    ``PlantedIdentifiers.for_case(seed, i)`` and an origin jittered per case. Local label
    values default to 1..n in the order of `classes` (deliberately not the schema ids);
    `local_values` overrides them. The NIfTI is uint8 (uint16 for values > 255) in the
    DICOM voxel order with the affine :func:`volume_affine_ras` (qform = sform, code 1),
    as ITK or 3D Slicer writes it. SEG segment labels are the class names unless
    `segment_labels` renames them; the label map then keys segments by label.

    `reference_classes` (disjoint from `classes`) are written as NIfTI reference labels the
    same way as NIfTI labels (whatever `label_format` is: SEG reference labels are not
    written), for ``site-agent prepare --reference-labels``.

    Raises:
        ValueError: unknown, repeated or overlapping classes, or bad local values.
    """
    schema = schema or _default_schema()
    classes = list(classes)
    if not classes:
        raise ValueError("a site labels at least one class")
    for cname in classes:
        if cname not in schema.classes or cname == "background":
            raise ValueError(f"{cname!r} is not a foreground class of schema {schema.name}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat: {classes}")
    if label_format not in ("nifti", "seg"):
        raise ValueError(f"label_format must be 'nifti' or 'seg', got {label_format!r}")
    values = {c: i for i, c in enumerate(classes, start=1)}
    if local_values:
        unknown = set(local_values) - set(classes)
        if unknown:
            raise ValueError(f"local_values names classes the site does not label: {sorted(unknown)}")
        values.update({k: int(v) for k, v in local_values.items()})
    if len(set(values.values())) != len(values) or not all(1 <= v <= 65535 for v in values.values()):
        raise ValueError(f"local label values must be distinct integers in [1, 65535], got {values}")
    ref_classes = list(reference_classes or [])
    for cname in ref_classes:
        if cname not in schema.classes or cname == "background":
            raise ValueError(f"reference class {cname!r} is not a foreground class of schema {schema.name}")
    if len(set(ref_classes)) != len(ref_classes):
        raise ValueError(f"reference classes repeat: {ref_classes}")
    if set(ref_classes) & set(classes):
        raise ValueError(f"reference classes {sorted(set(ref_classes) & set(classes))} are also labelled classes: they must be disjoint")
    ref_values = {c: i for i, c in enumerate(ref_classes, start=1)}
    seg_names = [(segment_labels or {}).get(c, c) for c in classes]
    if len(set(seg_names)) != len(seg_names):
        raise ValueError(f"segment labels repeat: {seg_names}")

    root = Path(root)
    dicom_dir, labels_dir = root / "dicom", root / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    site = PhantomSite(
        root=root,
        dicom_dir=dicom_dir,
        labels_dir=labels_dir,
        label_map=root / "site-labels.yaml",
        cases=[],
        identifiers=[],
        classes=classes,
        phase=phase,
        label_format=label_format,
        local_values=dict(values),
        label_paths=[],
        series_uids=[],
        origins=[],
        orientation=tuple(float(v) for v in orientation),
    )
    if ref_classes:
        site.reference_classes = ref_classes
        site.reference_label_paths = []
        site.reference_label_map = root / "reference-label-map.yaml"
    for i in range(int(n_cases)):
        case_seed = int(seed) * 1000 + i
        case = f"case_{i:03d}"
        vol = make_phantom(case_seed, phase, shape, spacing, schema=schema)
        ids = PlantedIdentifiers.for_case(seed, i)
        jrng = np.random.default_rng([case_seed, 0x0121])
        # Where the table put the patient differs from scan to scan.
        origin = tuple(float(v) for v in np.round(np.array([-150.0, -180.0, -300.0]) + jrng.uniform(-10, 10, 3), 2))
        paths = write_dicom_series(
            vol,
            dicom_dir / case,
            ids,
            origin=origin,
            orientation=orientation,
            transfer_syntax=transfer_syntax,
            file_names=file_names,
            seed=case_seed,
            modality=modality,
        )
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        if label_format == "nifti":
            local = site_label_volume(vol.label, classes, values, schema)
            label_path = labels_dir / f"{case}.nii.gz"
            save_atomic(clean_image(local, volume_affine_ras(vol, origin, orientation)), label_path)
        else:
            seg_numbers = {c: n for n, c in enumerate(classes, start=1)}
            local = site_label_volume(vol.label, classes, seg_numbers, schema)
            label_path = labels_dir / f"{case}.dcm"
            _write_seg(paths, local, seg_names, classes, label_path, ids, schema, uid_seed=f"{series_uid}:{case}")
        if ref_classes:
            assert site.reference_label_paths is not None
            ref_path = root / "reference-labels" / f"{case}.nii.gz"
            ref_local = site_label_volume(vol.label, ref_classes, ref_values, schema)
            save_atomic(clean_image(ref_local, volume_affine_ras(vol, origin, orientation)), ref_path)
            site.reference_label_paths.append(ref_path)
        site.cases.append(case)
        site.identifiers.append(ids)
        site.label_paths.append(label_path)
        site.series_uids.append(series_uid)
        site.origins.append(origin)

    if label_format == "nifti":
        labels: dict = {0: "background", **{values[c]: c for c in classes}}
    else:
        labels = {name: c for name, c in zip(seg_names, classes)}
    doc = {"format": LABEL_MAP_FORMAT, "schema": schema.name, "schema_version": schema.version, "labels": labels}
    atomic.write_text(site.label_map, yaml.safe_dump(doc, sort_keys=False))
    if site.reference_label_map is not None:
        ref_doc = {**doc, "labels": {0: "background", **{ref_values[c]: c for c in ref_classes}}}
        atomic.write_text(site.reference_label_map, yaml.safe_dump(ref_doc, sort_keys=False))
    return site
