"""The folder `site-agent prepare` writes: whose it is, its lock, each case's files and record, the final metadata.

Each finished case leaves its NIfTI files (``imagesTr/``, ``labelsTr/``, test-only reference
labels in ``labelsRef/``; written under hidden staging names by `stage_case`, possibly in a
worker process, then named by `commit_case`) and a record in ``.state/cases/``; dataset.json and
manifest.json (models of `fedimg_core.dataset_manifest`) are written last, so a folder without
them is never taken for a dataset, and a re-run resumes from the records.
"""

from __future__ import annotations

import fcntl
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedimg_core.dataset_manifest import (
    CONVERTER_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    CaseRecord,
    Manifest,
    describe_cases,
    write_description,
    write_manifest,
)
from fedimg_core.hashing import sha256_file
from preprocessing.inputs import CaseSource, PrepareError, is_prepared_dataset
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.qc_flags import case_flags
from preprocessing.schema import LabelSchema

__all__ = [
    "STATE_DIR",
    "OutputLock",
    "check_out_folder",
    "clean_temp_files",
    "commit_case",
    "discard_staged",
    "outputs_intact",
    "stage_case",
    "staged_names",
    "write_metadata",
]

STATE_DIR = ".state"  # inside the dataset folder: salt, lock, per-case records


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that holds files which are not a dataset this command wrote.

    Ours: a `.state/` folder (every prepare run makes one) with no manifest.json (a run that
    was interrupted) or with our manifest.json. Anything else non-empty is somebody else's
    and is never written into (prepare would overwrite its manifest.json, dataset.json and
    case files, or mix its cases with ours).

    Args:
        out: the output folder (it need not exist).

    Raises:
        PrepareError: `out` is a file, or a non-empty folder that is not ours.
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


def _orientation(affine: np.ndarray) -> list[str]:
    return list(nib.aff2axcodes(affine))  # type: ignore[no-untyped-call]  # nibabel leaves it unannotated


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in np.sqrt((affine[:3, :3] ** 2).sum(0))]


class OutputLock:
    """An exclusive lock on an output folder (``.state/lock``): one prepare at a time writes it.

    Used as a context manager; entering it raises `PrepareError` when another prepare holds
    the lock (it never waits).

    Args:
        out: the output folder (its ``.state/`` is created on entry).
    """

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_DIR / "lock"

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise PrepareError(f"{self.path.parent.parent}: another prepare is running on this output folder") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def clean_temp_files(out: Path) -> None:
    """Remove what an interrupted atomic write left in imagesTr/, labelsTr/ and labelsRef/.

    Args:
        out: the dataset folder.
    """
    for sub in ("imagesTr", "labelsTr", "labelsRef"):
        for tmp in (out / sub).glob(".*"):
            tmp.unlink(missing_ok=True)  # leftovers of an interrupted atomic write


def outputs_intact(out: Path, rec: dict[str, Any]) -> bool:
    """Whether the files a case record lists are there with the recorded checksums.

    Args:
        out: the dataset folder.
        rec: the case record (`commit_case`).

    Returns:
        True when the image (and label, reference label) exist and their sha256 matches the record.
    """
    for kind in ("image", "label", "reference_label"):
        rel = rec.get(kind)
        if rel is None:
            continue
        p = out / rel
        if not p.is_file() or sha256_file(p) != rec["sha256"][kind]:
            return False
    return True


_FOLDERS = {"image": "imagesTr", "label": "labelsTr", "reference_label": "labelsRef"}


def stage_case(
    out: Path,
    token: str,
    src: CaseSource,
    image: nib.Nifti1Image,
    label: nib.Nifti1Image | None,
    flags: list[str],
    fingerprint: str,
    modality: str,
    schema: LabelSchema,
    labeled: list[int],
    reference: nib.Nifti1Image | None = None,
) -> dict[str, Any]:
    """Write one converted case's NIfTI files under hidden staging names and return its record, not yet named.

    The files' bytes do not depend on the case id (it is only in their names), so cases can be
    staged in parallel and named in order afterwards (`commit_case`); staging names start with a
    dot, so what an interrupted run staged is removed by `clean_temp_files`.

    Args:
        out: the dataset folder.
        token: names the staged files (unique per case of a run: its source hash).
        src: its source (kind and label kind are recorded, nothing identifying).
        image: the canonical image (nibabel).
        label: the canonical label in schema ids, or None.
        flags: the conversion's flags (QC flags are added).
        fingerprint: the input fingerprint (a re-run with the same one skips the case).
        modality: the dataset's modality.
        schema: the federation's label schema.
        labeled: the class ids the site labels.
        reference: the canonical test-only reference label in schema ids (``labelsRef/``), or None.

    Returns:
        The case's record (`commit_case` completes it), ``case_id`` None and the file keys naming the staged files.
    """
    data = np.asanyarray(image.dataobj)
    lo, hi = data.min(), data.max()  # once: the dtype check, the recorded range and the QC flags all need them
    if data.dtype.kind in "iu" and lo >= -32768 and hi <= 32767:
        data = data.astype(np.int16, copy=False)  # CT stays integer HU
        value_range = (float(lo), float(hi))
    else:
        data = data.astype(np.float32, copy=False)
        value_range = (float(np.float32(lo)), float(np.float32(hi)))  # rounding is monotonic: the written volume's extremes
    staged: dict[str, str | None] = {kind: None for kind in _FOLDERS}
    sums: dict[str, str] = {}
    label_data = None
    volumes: dict[str, np.ndarray | None] = {"image": data, "label": None, "reference_label": None}
    if label is not None:
        label_data = np.asanyarray(label.dataobj).astype(np.uint8)
        volumes["label"] = label_data
    if reference is not None:
        volumes["reference_label"] = np.asanyarray(reference.dataobj).astype(np.uint8)
    try:
        for kind, volume in volumes.items():
            if volume is None:
                continue
            rel = staged_names(token)[kind]
            staged[kind] = rel
            sums[kind] = save_atomic(clean_image(volume, image.affine), out / rel)
        spacing = _spacing(image.affine)
        qc, voxels = case_flags(data, label_data, spacing, modality, schema, labeled, planar=src.planar, value_range=value_range)
    except BaseException:  # what this case staged goes with it
        discard_staged(out, staged)
        raise
    flags = list(dict.fromkeys(flags + qc))
    status = "flagged" if [f for f in flags if f != "unlabeled"] else "ok"
    return {
        "case_id": None,
        **staged,
        "source_kind": src.kind,
        "label_source_kind": src.label_kind,
        "shape": [int(x) for x in data.shape],
        "spacing": spacing,
        "affine": np.asarray(image.affine, dtype=float).round(6).tolist(),
        "orientation": _orientation(image.affine),
        "dtype": str(data.dtype),
        "intensity_range": list(value_range),
        "schema_version": schema.version,
        "labeled_classes": labeled if label is not None else [],
        "label_voxels": voxels,
        "converter_version": CONVERTER_VERSION,
        "input_sha256": fingerprint,
        "sha256": sums,
        "qc_flags": flags,
        "status": status,
        "radiograph": src.radiograph,
    }


def staged_names(token: str) -> dict[str, str]:
    """The files `stage_case` writes for ``token`` (each kind's; not all exist for every case).

    Args:
        token: the case's staging token.

    Returns:
        kind -> path relative to the dataset folder.
    """
    return {kind: f"{folder}/.staged-{token}.nii.gz" for kind, folder in _FOLDERS.items()}


def discard_staged(out: Path, staged: dict[str, Any]) -> None:
    """Remove a case's staged files (a case that failed after staging, or whose staging failed).

    Args:
        out: the dataset folder.
        staged: the record of `stage_case` (or its file keys).
    """
    for kind in _FOLDERS:
        rel = staged.get(kind)
        if isinstance(rel, str) and "/.staged-" in rel:
            (out / rel).unlink(missing_ok=True)


def commit_case(out: Path, case_id: str, source_hash: str, staged: dict[str, Any]) -> dict[str, Any]:
    """Give a staged case its id: its files renamed (atomically, each) to ``<folder>/<case_id>.nii.gz``.

    Args:
        out: the dataset folder.
        case_id: the case's id (case_0000...).
        source_hash: the salted hash of its source.
        staged: the record of `stage_case`.

    Returns:
        The record: every key of `fedimg_core.dataset_manifest.CaseRecord`.
    """
    rest = {k: v for k, v in staged.items() if k not in (*_FOLDERS, "case_id", "source_hash")}
    rec = {"case_id": case_id, **{kind: staged.get(kind) for kind in _FOLDERS}, "source_hash": source_hash, **rest}
    for kind, folder in _FOLDERS.items():
        if staged.get(kind) is not None:
            final = f"{folder}/{case_id}.nii.gz"
            (out / staged[kind]).replace(out / final)
            rec[kind] = final
    return rec


def write_metadata(
    out: Path,
    records: dict[str, dict[str, Any]],
    refused: list[dict[str, str]],
    schema: LabelSchema,
    modality: str,
    labeled: list[int],
    name: str,
    reference_classes: list[int] | None = None,
) -> None:
    """Write dataset.json and manifest.json (atomically, last: a folder without them is no dataset).

    Args:
        out: the dataset folder.
        records: the per-case records of `write_case`, by source hash.
        refused: {source: salted hash, reason_code} per refused source.
        schema: the federation's label schema.
        modality: the dataset's modality.
        labeled: the class ids the site labels.
        name: the dataset's name (reduced to letters, digits, _ . + -).
        reference_classes: the class ids of the test-only reference labels (None: none); they
            are listed in the manifest only (dataset.json describes the training labels).
    """
    # the manifest allowlist is CaseRecord's keys: nothing else from a record reaches it
    keys = CaseRecord.model_fields
    cases = sorted((CaseRecord.model_validate({k: r.get(k) for k in keys}) for r in records.values()), key=lambda c: c.case_id)
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")[:48] or "dataset"
    write_description(out, describe_cases(name, f"{name} (fedimg prepared dataset, schema {schema.name} {schema.version})", modality, schema.classes, cases))
    write_manifest(
        out,
        Manifest.model_validate(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "converter_version": CONVERTER_VERSION,
                "schema": {"name": schema.name, "version": schema.version},
                "modality": modality,
                "labeled_classes": labeled,
                "reference_classes": reference_classes,
                "ignore_label": schema.ignore_label,
                "cases": cases,
                "refused": refused,
                "counts": {
                    "ok": sum(c.status == "ok" for c in cases),
                    "flagged": sum(c.status == "flagged" for c in cases),
                    "refused": len(refused),
                },
            }
        ),
    )
