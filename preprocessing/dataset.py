"""Prepared datasets on disk: write one from arrays, read and check one (files, checksums, grids).

The format (``manifest.json``, ``dataset.json``, ``imagesTr/``, ``labelsTr/``, optional
``labelsRef/`` of test-only reference labels) is defined by
the models of `fedimg_core.dataset_manifest`; this module adds the NIfTI side. Case ids are
sequential (``case_0000``); nothing identifying a patient is stored.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.dataset_manifest import (
    CONVERTER_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    CaseRecord,
    DatasetError,
    DatasetSchemaError,
    Manifest,
    describe_cases,
    read_description,
    read_manifest,
    write_description,
    write_manifest,
)
from fedimg_core.hashing import sha256_file
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.schema import LabelSchema

__all__ = [
    "CONVERTER_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "DatasetError",
    "DatasetSchemaError",
    "PreparedCase",
    "PreparedDataset",
    "check_schema",
    "load_dataset",
    "sha256_file",
    "write_dataset",
]


@dataclass
class PreparedCase:
    """One case of a loaded dataset: its id and the absolute paths of its files.

    ``reference_label`` is the case's test-only reference label map (classes the site does
    not train on, `PreparedDataset.reference_classes`), or None.
    """

    case_id: str
    image: Path
    label: Path | None
    reference_label: Path | None = None


@dataclass
class PreparedDataset:
    """A loaded (checked) prepared dataset."""

    root: Path
    name: str
    modality: str
    labels: dict[str, int]
    cases: list[PreparedCase] = field(default_factory=list)
    labeled_classes: list[int] | None = None  # schema ids this site labels (None: every class)
    reference_classes: list[int] | None = None  # schema ids of the test-only reference labels (None: none)

    def description(self) -> str:
        """A one-line description built only from allowlisted fields (name, count, modality,
        labelled class names, and the class names and case count of test-only reference labels
        when there are any), each reduced to a short safe token so free text cannot ride along.

        Returns:
            ``"<name>: <n> <modality> cases, classes: <names>"``, followed by
            ``"; test-only reference labels: <names> (<k> cases)"`` when the dataset has some.
        """
        by_id = sorted(self.labels.items(), key=lambda kv: kv[1])
        labeled = set(self.labeled_classes) if self.labeled_classes is not None else None
        classes = ", ".join(_token(k) for k, v in by_id if v != 0 and (labeled is None or v in labeled))
        text = f"{_token(self.name)}: {len(self.cases)} {_token(self.modality, 16)} cases, classes: {classes or 'none'}"
        with_ref = sum(c.reference_label is not None for c in self.cases)
        if self.reference_classes and with_ref:
            ref = ", ".join(_token(k) for k, v in by_id if v in set(self.reference_classes))
            text += f"; test-only reference labels: {ref or 'none'} ({with_ref} cases)"
        return text


def _token(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_")[:limit] or "unnamed"


def write_dataset(
    root: str | os.PathLike[str],
    name: str,
    modality: str,
    labels: dict[str, int],
    cases: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
) -> PreparedDataset:
    """Write (image, label, affine) arrays as a prepared dataset.

    The dataset is built in a sibling temporary folder and renamed into place, so an
    interrupted run never leaves a half-written dataset at `root`. `root` must not exist.

    Args:
        root: the dataset folder to create.
        name: the dataset's name (dataset.json).
        modality: the images' modality (CT, MR, ...).
        labels: class name -> id, as dataset.json lists them.
        cases: (image, label or None, 4x4 affine) per case; case ids follow their order.

    Returns:
        The dataset written, as `load_dataset` reads it.

    Raises:
        DatasetError: `root` exists, there are no cases, or a label's shape differs from its image's.
    """
    root = Path(root)
    if root.exists():
        raise DatasetError(f"{root}: already exists; refusing to overwrite a prepared dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    os.chmod(staging, atomic.default_mode(directory=True))
    try:
        entries: list[dict[str, str]] = []
        manifest_cases: list[CaseRecord] = []
        for i, (image, label, affine) in enumerate(cases):
            case_id = f"case_{i:04d}"
            img_rel = f"imagesTr/{case_id}.nii.gz"
            save_atomic(clean_image(np.asarray(image, dtype=np.float32), affine), staging / img_rel)
            entry = {"image": img_rel}
            sums = {"image": sha256_file(staging / img_rel)}
            if label is not None:
                if label.shape != image.shape:
                    raise DatasetError(f"case {i}: label shape {label.shape} != image shape {image.shape}")
                lab_rel = f"labelsTr/{case_id}.nii.gz"
                save_atomic(clean_image(np.asarray(label, dtype=np.uint8), affine), staging / lab_rel)
                entry["label"] = lab_rel
                sums["label"] = sha256_file(staging / lab_rel)
            entries.append(entry)
            manifest_cases.append(
                CaseRecord.model_validate(
                    {
                        "case_id": case_id,
                        **entry,
                        "shape": [int(n) for n in image.shape],
                        "spacing": [float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))],
                        "affine": np.asarray(affine, dtype=float).round(6).tolist(),
                        "intensity_range": [float(np.min(image)), float(np.max(image))],
                        "sha256": sums,
                        "qc_flags": [],
                    }
                )
            )
        if not entries:
            raise DatasetError(f"{root}: no cases to write")
        write_description(staging, describe_cases(name, f"{name} (fedimg prepared dataset)", modality, labels, manifest_cases))
        write_manifest(
            staging,
            Manifest.model_validate(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "converter_version": CONVERTER_VERSION,
                    "schema": None,
                    "modality": modality,
                    "labeled_classes": sorted(v for v in labels.values() if v != 0),
                    "cases": manifest_cases,
                    "refused": [],
                }
            ),
        )
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_dataset(root)


def check_schema(manifest: Mapping[str, Any] | Manifest, schema: LabelSchema, where: str) -> None:
    """Refuse a dataset prepared with another schema (or another major version of it).

    Args:
        manifest: the dataset's manifest (parsed ``manifest.json`` or its model).
        schema: the federation's label schema.
        where: the dataset, as named in the message.

    Raises:
        DatasetSchemaError: naming both schemas and what to do.
    """
    if isinstance(manifest, Manifest):
        used = manifest.schema_ref.model_dump() if manifest.schema_ref is not None else None
    else:
        used = manifest.get("schema")
    if not used:  # format v1 (before schemas): class ids are checked against the schema's classes instead
        return
    name, version = used.get("name"), str(used.get("version", "0"))
    if name != schema.name or version.split(".")[0] != str(schema.major):
        raise DatasetSchemaError(
            f"{where}: prepared with label schema {name} {version}, but the experiment uses {schema.name} "
            f"{schema.version}; re-run `site-agent prepare` with the federation's schema"
        )


def _finite_4x4(value: object) -> bool:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.shape == (4, 4) and bool(np.all(np.isfinite(a)))


def _check_grid(path: Path, shown: Path) -> None:
    """A volume whose header places its voxels nowhere (NaN/infinite or singular affine, as a
    float32 overflow of an absurd spacing leaves) cannot be trained on: refuse the dataset."""
    try:
        # whatever format nibabel recognised: a header without these methods is refused below
        hdr: Any = nib.load(str(path)).header
        with np.errstate(all="ignore"):
            forms = [(name, *getter(coded=True)) for name, getter in (("sform", hdr.get_sform), ("qform", hdr.get_qform))]
            best = hdr.get_best_affine()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on a damaged header
        raise DatasetError(f"{shown}: not a readable NIfTI header ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    for name, affine, code in forms:
        if code and not _finite_4x4(affine):
            raise DatasetError(f"{shown}: the {name} has non-finite values (NaN or infinite spacing or position); re-run `site-agent prepare`")
    if not _finite_4x4(best) or abs(np.linalg.det(best[:3, :3])) < 1e-12:
        raise DatasetError(f"{shown}: the voxel-to-world affine is non-finite or singular; re-run `site-agent prepare`")


def load_dataset(root: str | os.PathLike[str], verify_checksums: bool = False) -> PreparedDataset:
    """Read and check a prepared dataset.

    Always checks the structure, that every listed file (image, label, test-only reference
    label) exists inside the folder and that every volume's header places its voxels
    somewhere; with `verify_checksums` also re-hashes every file against the manifest (slower).

    Args:
        root: the dataset folder.
        verify_checksums: re-hash every file against manifest.json.

    Returns:
        The dataset: its name, modality, labels and cases.

    Raises:
        DatasetError: naming the file and the problem (missing, changed, outside the folder,
            an unusable grid, or a manifest/dataset.json that does not fit its model).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    manifest_path = root / "manifest.json"
    manifest = read_manifest(root)
    desc = read_description(root)
    cases = []
    for meta in manifest.cases:
        paths = {}
        for kind in ("image", "label", "reference_label"):
            rel = {"image": meta.image, "label": meta.label, "reference_label": meta.reference_label}[kind]
            if rel is None:
                continue
            p = (root / rel).resolve()
            if root.resolve() not in p.parents:
                raise DatasetError(f"{manifest_path}: case {meta.case_id}: {kind} path {rel!r} leaves the dataset folder")
            if not p.is_file():
                raise DatasetError(f"{root / rel}: listed in manifest.json but missing")
            if verify_checksums:
                expected = meta.sha256.get(kind)
                if expected is None:
                    raise DatasetError(f"{manifest_path}: case {meta.case_id}: no sha256 for {kind}")
                if sha256_file(p) != expected:
                    raise DatasetError(f"{root / rel}: checksum does not match manifest.json (file changed or corrupt)")
            _check_grid(p, root / rel)
            paths[kind] = p
        if meta.affine is not None and not _finite_4x4(meta.affine):
            raise DatasetError(f"{manifest_path}: case {meta.case_id}: 'affine' is not a 4x4 matrix of finite numbers (re-run `site-agent prepare`)")
        cases.append(PreparedCase(case_id=meta.case_id, image=paths["image"], label=paths.get("label"), reference_label=paths.get("reference_label")))
    return PreparedDataset(
        root=root,
        name=desc.name,
        modality=desc.modality_name(),
        labels=dict(desc.labels),
        cases=cases,
        labeled_classes=list(manifest.labeled_classes) if manifest.labeled_classes is not None else None,
        reference_classes=list(manifest.reference_classes) if manifest.reference_classes is not None else None,
    )
