"""Export a prepared dataset as an nnU-Net v2 raw dataset (``nnUNet_raw/DatasetNNN_Name``).

A prepared dataset's own ``dataset.json`` already reads as an nnU-Net v2 raw dataset when
its label files hold only class ids (`fedimg_core.dataset_manifest.describe_cases`). The
export is for what nnU-Net cannot express in place:

* **Partial labels.** A site labels some of the schema's classes; in its label files the
  voxels of the other classes are background. nnU-Net knows nothing of partial labels and
  would learn those classes as background, so by default the export keeps only the classes
  the site labels, renumbered 1..K in schema order (within that label set, background is
  true background). ``classes="all"`` keeps every schema id as it is, for sites that label
  every class.
* **The ignore label.** nnU-Net requires its ``ignore`` label to be the highest label value
  (max class id + 1); the schema's ignore value (255 by default) is rewritten to it.
* **Its folder layout**: ``DatasetNNN_Name/imagesTr/<case>_0000.nii.gz`` (channel suffix),
  ``labelsTr/<case>.nii.gz``, a ``dataset.json`` whose ``fedimg`` block maps the exported
  ids back to the schema's classes.

Images are copied (``link=True`` hard-links them instead, which costs no space, but an image
edited in place under ``nnUNet_raw`` would then change the checksummed prepared dataset too).
Label files are rewritten through the id lookup table on their own grid (the prepared label's
affine, the same clean header). Test-only reference labels (``labelsRef/``) and unlabelled
cases are left out: they are not training data. A case whose own labelled classes are fewer
than the exported ones (its manifest's ``labeled_classes``) is left out too, with a warning:
its background would teach nnU-Net that the missing classes are background. The folder is
built next to its target and renamed into place; an existing folder is never overwritten.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from fedimg_core import atomic
from fedimg_core.dataset_manifest import DatasetError, read_manifest
from preprocessing.dataset import load_dataset
from preprocessing.nifti import clean_image, save_atomic

__all__ = ["NnunetExport", "export_nnunet"]

logger = logging.getLogger(__name__)

ClassChoice = Literal["labelled", "all"]
Progress = Callable[[int, int, str], None]


@dataclass
class NnunetExport:
    """What `export_nnunet` wrote."""

    folder: Path
    cases: int
    labels: dict[str, int]  # nnU-Net's labels block: background, classes, ignore when present
    schema_ids: dict[str, int]  # exported class name -> its schema id
    ignore_voxels: int  # voxels carrying the ignore label over all cases
    left_out: list[str]  # case ids that label fewer classes than the export has


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: a copy reads the same
            pass
    shutil.copyfile(src, dst)


def export_nnunet(
    dataset_root: str | os.PathLike[str],
    raw_root: str | os.PathLike[str],
    dataset_id: int,
    name: str | None = None,
    classes: ClassChoice = "labelled",
    link: bool = False,
    progress: Progress | None = None,
) -> NnunetExport:
    """Write a prepared dataset's labelled cases as nnU-Net v2 raw dataset ``DatasetNNN_Name``.

    Args:
        dataset_root: the prepared dataset (``site-agent prepare``); its checksums are verified.
        raw_root: nnU-Net's raw folder (``$nnUNet_raw``); created when missing.
        dataset_id: nnU-Net's dataset id, 1..999.
        name: the name after the id (default: the dataset's name); letters, digits, _ . -.
        classes: ``labelled`` keeps the classes the site labels, renumbered 1..K (the
            default: nnU-Net would learn unlabelled classes as background); ``all`` keeps
            every schema id.
        link: hard-link the images instead of copying them.
        progress: called as ``progress(done, total, case_id)`` after each case.

    Returns:
        The export: its folder, case count and label blocks.

    Raises:
        DatasetError: the dataset is not a valid prepared dataset or has no labelled case,
            the id or name is not usable, or the target folder (or another folder with the
            same dataset id) already exists.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise DatasetError(f"nnU-Net dataset id must be 1..999 (got {dataset_id})")
    dataset = load_dataset(dataset_root, verify_checksums=True)
    manifest = read_manifest(dataset.root)
    folder_name = f"Dataset{int(dataset_id):03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name or dataset.name).strip('_') or 'fedimg'}"
    raw = Path(raw_root)
    target = raw / folder_name
    if target.exists():
        raise DatasetError(f"{target}: already exists; refusing to overwrite it (choose another --id or remove it)")
    taken = sorted(p.name for p in raw.glob(f"Dataset{int(dataset_id):03d}_*")) if raw.is_dir() else []
    if taken:
        raise DatasetError(f"{raw / taken[0]}: nnU-Net dataset id {dataset_id} is taken; choose another --id")
    by_id = {v: k for k, v in dataset.labels.items()}
    labelled = sorted(dataset.labeled_classes if dataset.labeled_classes is not None else (v for v in by_id if v != 0))
    kept = labelled if classes == "labelled" else sorted(v for v in by_id if v != 0)
    per_case: dict[str, list[int]] = {}
    for meta in manifest.cases:
        own = (meta.model_extra or {}).get("labeled_classes")
        if isinstance(own, list):
            per_case[meta.case_id] = [int(c) for c in own]
    left_out = [c.case_id for c in dataset.cases if c.label is not None and c.case_id in per_case and not set(labelled) <= set(per_case[c.case_id])]
    for case_id in left_out:
        logger.warning("%s: labels only %s of the site's classes %s: left out", case_id, per_case[case_id], labelled)
    cases = [c for c in dataset.cases if c.label is not None and c.case_id not in left_out]
    if not cases:
        raise DatasetError(f"{dataset.root}: no labelled case to export (nnU-Net trains on labelled cases only)")
    new_id = {schema_id: i + 1 for i, schema_id in enumerate(kept)} if classes == "labelled" else {v: v for v in kept}
    top = max(new_id.values(), default=0)
    schema_ignore = manifest.ignore_label
    lut = np.zeros(256, dtype=np.uint8)  # any value not listed (a class this export drops) becomes background
    for schema_id, exported in new_id.items():
        lut[schema_id] = exported
    if schema_ignore is not None:
        lut[schema_ignore] = top + 1
    labels = {"background": 0, **{by_id[s]: new_id[s] for s in kept}}
    ignore_voxels = 0

    def build(tmp: Path) -> None:
        nonlocal ignore_voxels
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for done, case in enumerate(cases, start=1):
            _link_or_copy(case.image, tmp / "imagesTr" / f"{case.case_id}_0000.nii.gz", link)
            img: Any = nib.load(str(case.label))
            values = np.asarray(img.dataobj)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise DatasetError(f"{case.label}: label values outside 0..255")
            if schema_ignore is not None:
                ignore_voxels += int(np.count_nonzero(values == schema_ignore))
            save_atomic(clean_image(lut[values.astype(np.int64)], img.affine), tmp / "labelsTr" / f"{case.case_id}.nii.gz")
            logger.info("exported %s (%d/%d)", case.case_id, done, len(cases))
            if progress:
                progress(done, len(cases), case.case_id)
        if ignore_voxels:
            labels["ignore"] = top + 1  # nnU-Net: declared only when used (it switches its loss to sparse mode)
        schema_ref = manifest.schema_ref
        atomic.write_json(
            tmp / "dataset.json",
            {
                "name": folder_name,
                "description": f"{dataset.name}: fedimg prepared dataset exported for nnU-Net v2",
                "channel_names": {"0": dataset.modality},
                "labels": labels,
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
                "fedimg": {
                    "source_dataset": dataset.name,
                    "schema": {"name": schema_ref.name, "version": schema_ref.version} if schema_ref else None,
                    "classes": classes,
                    "schema_ids": {by_id[s]: s for s in kept},
                    "unlabelled_classes_learned_as_background": [by_id[s] for s in kept if s not in labelled],
                    "ignore": {"schema_value": schema_ignore, "exported_value": top + 1} if ignore_voxels else None,
                },
            },
        )

    raw.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".tmp", dir=raw))
    try:
        os.chmod(tmp, atomic.default_mode(directory=True))
        build(tmp)
        try:
            os.rename(tmp, target)  # fails on a folder that appeared meanwhile (not empty): never replaced
        except OSError:
            raise DatasetError(f"{target}: appeared while exporting; refusing to overwrite it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote nnU-Net raw dataset %s (%d cases)", target, len(cases))
    return NnunetExport(folder=target, cases=len(cases), labels=labels, schema_ids={by_id[s]: s for s in kept}, ignore_voxels=ignore_voxels,
                        left_out=left_out)  # fmt: skip
