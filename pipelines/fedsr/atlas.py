"""The FedSR atlas: one labelled image shared by the federation, as a registry artifact.

An atlas is two files (what the registry stores as kind ``atlas``):

    atlas.safetensors  tensors only (nothing runs when read): ``image`` (X, Y, Z) float32,
                       ``label`` (X, Y, Z) uint8 in the federation schema's class ids,
                       ``affine`` (4, 4) float64, RAS+ voxel-to-world in mm
    atlas.json         what it is: format, the schema (name, version, classes), the source
                       and the basis on which it may be shared (a public atlas or a consented
                       image), and the sha256 of ``atlas.safetensors``

A site reads it from ``<models dir>/registry/atlas/<name>/<version>/`` (pulled with
``site-agent atlas pull``) and checks the sha256 the spec names before using it, then prepares
it exactly like its own cases (`pipelines.transforms.deterministic_transforms`: orientation,
the schema's spacing, the modality's intensity rule), padded or cropped to the plan's volume.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocessing.schema import LabelSchema

__all__ = [
    "ATLAS_FILE",
    "ATLAS_FORMAT",
    "ATLAS_RECORD",
    "Atlas",
    "AtlasError",
    "atlas_files",
    "atlas_folder",
    "load_atlas",
    "prepared_atlas",
    "validate_atlas_files",
]

ATLAS_FORMAT = "fedimg-atlas"
ATLAS_FILE = "atlas.safetensors"
ATLAS_RECORD = "atlas.json"
KIND = "atlas"
MAX_ATLAS_VOXELS = 512**3
_META_KEYS = ("format", "schema", "classes", "modality", "source", "sharing", "sha256", "shape", "spacing_mm")


class AtlasError(ValueError):
    """An atlas that cannot be built, verified or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Atlas:
    """A verified atlas as read from its files.

    Args:
        image: (X, Y, Z) float32.
        label: (X, Y, Z) uint8, schema class ids.
        affine: (4, 4) RAS+ voxel-to-world in mm.
        meta: ``atlas.json``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any]


def atlas_files(image: np.ndarray, label: np.ndarray, affine: np.ndarray, schema: LabelSchema, modality: str, source: str, sharing: str) -> dict[str, bytes]:
    """The files of an atlas artifact.

    Args:
        image: (X, Y, Z) intensities.
        label: (X, Y, Z) schema class ids.
        affine: (4, 4) RAS+ voxel-to-world in mm.
        schema: the federation's label schema (every label value must be one of its classes).
        modality: the image's modality (a rule of the schema, e.g. ``MR``).
        source: where the atlas comes from (e.g. "VoxelMorph public atlas").
        sharing: why it may go to every site (e.g. "public, CC-BY 4.0", "consented for research sharing").

    Returns:
        ``{"atlas.safetensors": ..., "atlas.json": ...}``.

    Raises:
        AtlasError: shapes, labels, modality or texts that do not fit.
    """
    from safetensors.numpy import save as save_arrays  # deferred: only publishing needs it

    image = np.asarray(image, dtype=np.float32)
    label_values = np.asarray(label)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3 or label_values.shape != image.shape:
        raise AtlasError(f"atlas image {image.shape} and label {label_values.shape} must be the same 3D shape")
    if image.size > MAX_ATLAS_VOXELS:
        raise AtlasError(f"atlas of {image.size} voxels; at most {MAX_ATLAS_VOXELS}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise AtlasError("atlas affine must be a finite, invertible 4 x 4 matrix")
    if not np.all(np.isfinite(image)):
        raise AtlasError("atlas image has non-finite values")
    found = sorted(int(v) for v in np.unique(label_values))
    unknown = [v for v in found if not 0 <= v < schema.num_classes]
    if unknown:
        raise AtlasError(f"atlas labels {unknown} are not classes of schema {schema.name} (0..{schema.num_classes - 1})")
    if modality not in schema.modalities:
        raise AtlasError(f"modality {modality!r} has no rule in schema {schema.name} ({', '.join(schema.modalities)})")
    for what, text in (("source", source), ("sharing", sharing)):
        if not isinstance(text, str) or not text.strip() or len(text) > 500:
            raise AtlasError(f"{what}: say it in 1-500 characters")
    weights = save_arrays({"image": image, "label": label_values.astype(np.uint8), "affine": affine}, metadata={"format": ATLAS_FORMAT})
    spacing = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    meta = {
        "format": ATLAS_FORMAT,
        "schema": {"name": schema.name, "version": schema.version},
        "classes": {name: idx for name, idx in schema.classes.items() if idx in found},
        "modality": modality,
        "source": source.strip(),
        "sharing": sharing.strip(),
        "sha256": hashlib.sha256(weights).hexdigest(),
        "shape": list(image.shape),
        "spacing_mm": spacing,
    }
    return {ATLAS_FILE: weights, ATLAS_RECORD: (json.dumps(meta, indent=2) + "\n").encode()}


def _read(files: Mapping[str, bytes], where: str) -> Atlas:
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_arrays

    if set(files) != {ATLAS_FILE, ATLAS_RECORD}:
        raise AtlasError(f"{where}: an atlas is exactly {ATLAS_FILE} and {ATLAS_RECORD} (got {', '.join(sorted(files))})")
    try:
        meta = json.loads(files[ATLAS_RECORD].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AtlasError(f"{where}/{ATLAS_RECORD}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ATLAS_FORMAT or sorted(meta) != sorted(_META_KEYS):
        raise AtlasError(f"{where}/{ATLAS_RECORD}: not a {ATLAS_FORMAT} record (keys: {', '.join(_META_KEYS)})")
    if hashlib.sha256(files[ATLAS_FILE]).hexdigest() != meta["sha256"]:
        raise AtlasError(f"{where}/{ATLAS_FILE}: its sha256 is not the one {ATLAS_RECORD} records (changed after publishing)")
    try:
        arrays = load_arrays(files[ATLAS_FILE])
    except (SafetensorError, ValueError) as exc:
        raise AtlasError(f"{where}/{ATLAS_FILE}: not a safetensors file ({exc})") from None
    if sorted(arrays) != ["affine", "image", "label"]:
        raise AtlasError(f"{where}/{ATLAS_FILE}: holds {', '.join(sorted(arrays))}; expected affine, image, label")
    image, label, affine = arrays["image"], arrays["label"], arrays["affine"]
    if image.ndim != 3 or label.shape != image.shape or affine.shape != (4, 4) or image.dtype != np.float32 or label.dtype != np.uint8:
        raise AtlasError(f"{where}/{ATLAS_FILE}: image float32 (X, Y, Z), label uint8 of the same shape and a 4 x 4 affine are needed")
    if list(image.shape) != meta["shape"]:
        raise AtlasError(f"{where}: shape {list(image.shape)} differs from the record's {meta['shape']}")
    return Atlas(image=image, label=label, affine=affine, meta=meta)


def validate_atlas_files(files: Mapping[str, bytes]) -> None:
    """The registry's check of an ``atlas`` artifact before it is published.

    Args:
        files: file name -> content.

    Raises:
        AtlasError: anything that is not a readable, consistent atlas.
    """
    _read(files, "atlas")


def atlas_folder(models_dir: str | os.PathLike[str], name: str, version: str) -> Path:
    """Where a site keeps a pulled atlas version: ``<models dir>/registry/atlas/<name>/<version>``.

    Args:
        models_dir: the site's models directory (``<work_dir>/models``).
        name: the atlas's registry name.
        version: ``vNNNN``.

    Returns:
        The folder.
    """
    return Path(models_dir) / "registry" / KIND / name / version


def load_atlas(folder: str | os.PathLike[str], sha256: str | None = None) -> Atlas:
    """Read and verify an atlas folder (the content's sha256 against `sha256`, when given).

    Args:
        folder: the atlas version's folder.
        sha256: the sha256 of ``atlas.safetensors`` the spec names (None: the record's only).

    Returns:
        The atlas.

    Raises:
        AtlasError: missing, changed or unreadable files, or another content than `sha256`.
    """
    folder = Path(folder)
    files = {}
    for name in (ATLAS_FILE, ATLAS_RECORD):
        path = folder / name
        if not path.is_file():
            raise AtlasError(f"{path}: not found (pull the atlas to this site: site-agent atlas pull NAME@VERSION)")
        files[name] = path.read_bytes()
    atlas = _read(files, str(folder))
    if sha256 is not None and atlas.meta["sha256"] != sha256:
        raise AtlasError(f"{folder}: content sha256 {atlas.meta['sha256'][:12]}... is not the {sha256[:12]}... the spec names")
    return atlas


def prepared_atlas(atlas: Atlas, schema: LabelSchema, spacing: Sequence[float] | str | None, volume_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The atlas prepared like a site's cases, at the plan's volume size.

    Args:
        atlas: the verified atlas.
        schema: the federation schema (its intensity rule for the atlas's modality, its spacing).
        spacing: ``"schema"``, mm per axis, or None (native grid), as the plan resamples cases.
        volume_size: the plan's (X, Y, Z) volume.

    Returns:
        (image (1, 1, X, Y, Z) float32, label (1, 1, X, Y, Z) int64).

    Raises:
        AtlasError: the atlas was made for another schema.
    """
    import nibabel as nib
    from monai.transforms.croppad.dictionary import ResizeWithPadOrCropd

    from pipelines.transforms import deterministic_transforms

    if atlas.meta["schema"]["name"] != schema.name or str(atlas.meta["schema"]["version"]).split(".")[0] != schema.version.split(".")[0]:
        raise AtlasError(
            f"atlas of schema {atlas.meta['schema']['name']} {atlas.meta['schema']['version']}; this federation uses {schema.name} {schema.version}"
        )
    chain = deterministic_transforms(schema, atlas.meta["modality"], spacing=spacing)
    with tempfile.TemporaryDirectory(prefix="fedimg-atlas-") as tmp:
        image_path, label_path = Path(tmp) / "image.nii.gz", Path(tmp) / "label.nii.gz"
        nib.save(nib.Nifti1Image(atlas.image, atlas.affine), image_path)  # type: ignore[no-untyped-call]  # nibabel ships no types
        nib.save(nib.Nifti1Image(atlas.label, atlas.affine), label_path)  # type: ignore[no-untyped-call]
        item = chain({"image": str(image_path), "label": str(label_path)})
    item = ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=list(volume_size), mode="constant")(item)
    image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
    label = torch.as_tensor(np.asarray(item["label"]), dtype=torch.long)
    return image.unsqueeze(0), label.unsqueeze(0)
