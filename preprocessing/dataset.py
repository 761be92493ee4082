"""The prepared-dataset format: what a site registers with its node and trains on.

Layout (readable by MONAI's decathlon loader and by nnU-Net-style tools)::

    <root>/dataset.json      name, labels, channel names, "training" list of image/label pairs
    <root>/manifest.json     format version, per-case geometry and sha256 of every output
    <root>/imagesTr/<case>.nii.gz
    <root>/labelsTr/<case>.nii.gz

Case ids are sequential (``case_0000``); nothing identifying a patient is stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.errors import FedimgError
from fedimg_core.hashing import sha256_file
from preprocessing.nifti import clean_image, save_atomic

FORMAT_NAME = "fedimg-prepared-dataset"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # v1: before the DICOM converter (no schema block); read as-is
CONVERTER_VERSION = "0.2.0"


class DatasetError(FedimgError):
    """A folder is not a valid prepared dataset. The message names the file and the problem."""


@dataclass
class PreparedCase:
    case_id: str
    image: Path
    label: Path | None


@dataclass
class PreparedDataset:
    root: Path
    name: str
    modality: str
    labels: dict[str, int]
    cases: list[PreparedCase] = field(default_factory=list)
    labeled_classes: list[int] | None = None  # schema ids this site labels (None: every class)

    def description(self) -> str:
        """A one-line description built only from allowlisted fields (name, count, modality,
        labelled class names), each reduced to a short safe token so free text cannot ride along."""
        labeled = set(self.labeled_classes) if self.labeled_classes is not None else None
        classes = ", ".join(
            _token(k)
            for k, v in sorted(self.labels.items(), key=lambda kv: kv[1])
            if v != 0 and (labeled is None or v in labeled)
        )
        return f"{_token(self.name)}: {len(self.cases)} {_token(self.modality, 16)} cases, classes: {classes or 'none'}"


def _token(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_")[:limit] or "unnamed"


def write_dataset(
    root: str | os.PathLike,
    name: str,
    modality: str,
    labels: dict[str, int],
    cases: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
) -> PreparedDataset:
    """Write (image, label, affine) arrays as a prepared dataset.

    The dataset is built in a sibling temporary folder and renamed into place, so an
    interrupted run never leaves a half-written dataset at `root`. `root` must not exist.
    """
    root = Path(root)
    if root.exists():
        raise DatasetError(f"{root}: already exists; refusing to overwrite a prepared dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    os.chmod(staging, atomic.default_mode(directory=True))
    try:
        entries, manifest_cases = [], []
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
                {
                    "case_id": case_id,
                    **entry,
                    "shape": list(image.shape),
                    "spacing": [float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))],
                    "affine": np.asarray(affine, dtype=float).round(6).tolist(),
                    "intensity_range": [float(np.min(image)), float(np.max(image))],
                    "sha256": sums,
                    "qc_flags": [],
                }
            )
        if not entries:
            raise DatasetError(f"{root}: no cases to write")
        atomic.write_json(
            staging / "dataset.json",
            {
                "name": name,
                "description": f"{name} (fedimg prepared dataset)",
                "channel_names": {"0": modality},
                "modality": {"0": modality},
                "labels": labels,
                "numTraining": len(entries),
                "file_ending": ".nii.gz",
                "training": entries,
            },
        )
        atomic.write_json(
            staging / "manifest.json",
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "converter_version": CONVERTER_VERSION,
                "schema": None,
                "modality": modality,
                "labeled_classes": sorted(v for v in labels.values() if v != 0),
                "cases": manifest_cases,
                "refused": [],
            },
        )
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_dataset(root)


class DatasetSchemaError(FedimgError, ValueError):
    """A prepared dataset does not fit the federation's label schema."""


def check_schema(manifest: dict, schema, where: str) -> None:
    """A dataset prepared with another schema (or another major version) cannot join."""
    used = manifest.get("schema")
    if not used:  # format v1 (before schemas): class ids are checked against the schema's classes instead
        return
    name, version = used.get("name"), str(used.get("version", "0"))
    if name != schema.name or version.split(".")[0] != str(schema.major):
        raise DatasetSchemaError(
            f"{where}: prepared with label schema {name} {version}, but the experiment uses {schema.name} "
            f"{schema.version}; re-run `site-agent prepare` with the federation's schema"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (this folder is not a prepared dataset)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return data


def _finite_4x4(value) -> bool:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.shape == (4, 4) and bool(np.all(np.isfinite(a)))


def _check_grid(path: Path, shown: Path) -> None:
    """A volume whose header places its voxels nowhere (NaN/infinite or singular affine, as a
    float32 overflow of an absurd spacing leaves) cannot be trained on: refuse the dataset."""
    try:
        hdr = nib.load(str(path)).header
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


def load_dataset(root: str | os.PathLike, verify_checksums: bool = False) -> PreparedDataset:
    """Read and check a prepared dataset; raise DatasetError naming the file and problem.

    Always checks the structure and that every listed file exists; with
    `verify_checksums` also re-hashes every file against the manifest (slower).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    manifest_path = root / "manifest.json"
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{manifest_path}: 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise DatasetError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported (expected one of {list(SUPPORTED_VERSIONS)})"
        )
    desc_path = root / "dataset.json"
    desc = _read_json(desc_path)
    for key in ("name", "labels", "training"):
        if key not in desc:
            raise DatasetError(f"{desc_path}: missing key {key!r}")
    labels = desc["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise DatasetError(f"{desc_path}: 'labels' must map class names to integer ids")
    cases_meta = manifest.get("cases")
    if not isinstance(cases_meta, list) or not cases_meta:
        raise DatasetError(f"{manifest_path}: 'cases' must be a non-empty list")
    cases = []
    for i, meta in enumerate(cases_meta):
        if not isinstance(meta, dict) or "image" not in meta or "case_id" not in meta:
            raise DatasetError(f"{manifest_path}: case #{i} lacks 'case_id' or 'image'")
        paths = {}
        for kind in ("image", "label"):
            rel = meta.get(kind)
            if rel is None:
                continue
            p = (root / rel).resolve()
            if root.resolve() not in p.parents:
                raise DatasetError(f"{manifest_path}: case {meta['case_id']}: {kind} path {rel!r} leaves the dataset folder")
            if not p.is_file():
                raise DatasetError(f"{root / rel}: listed in manifest.json but missing")
            if verify_checksums:
                expected = (meta.get("sha256") or {}).get(kind)
                if expected is None:
                    raise DatasetError(f"{manifest_path}: case {meta['case_id']}: no sha256 for {kind}")
                if sha256_file(p) != expected:
                    raise DatasetError(f"{root / rel}: checksum does not match manifest.json (file changed or corrupt)")
            _check_grid(p, root / rel)
            paths[kind] = p
        affine = meta.get("affine")
        if affine is not None and not _finite_4x4(affine):
            raise DatasetError(f"{manifest_path}: case {meta['case_id']}: 'affine' is not a 4x4 matrix of finite numbers (re-run `site-agent prepare`)")
        cases.append(PreparedCase(case_id=meta["case_id"], image=paths["image"], label=paths.get("label")))
    modality = (desc.get("channel_names") or desc.get("modality") or {}).get("0", "unknown")
    labeled = manifest.get("labeled_classes")
    return PreparedDataset(
        root=root,
        name=str(desc["name"]),
        modality=str(modality),
        labels=labels,
        cases=cases,
        labeled_classes=[int(v) for v in labeled] if isinstance(labeled, list) else None,
    )
