"""`coordinator atlas publish`: FedSR's one labelled image, as a versioned registry artifact (kind ``atlas``).

The atlas (an image and its labels in the federation schema's class ids) goes to every site
of a FedSR run, so it must be an image that may be shared: a public atlas, or a consented
image; `publish_atlas` records where it comes from and on what basis it is shared. The
registry refuses anything but a consistent atlas (`pipelines.fedsr.atlas.validate_atlas_files`).
A spec names the version and its sha256 (``plan_args.atlas``), which each site checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator import registry as R
from coordinator.plans import resolve_schema
from fedimg_core.errors import UserError
from pipelines.fedsr.atlas import ATLAS_FILE, KIND, AtlasError, atlas_files, validate_atlas_files
from preprocessing.schema import parse_schema

__all__ = ["KIND", "atlas_spec_entry", "publish_atlas", "publish_atlas_arrays"]


def _validate(files: Any) -> None:
    try:
        validate_atlas_files(files)
    except AtlasError as exc:
        raise ValueError(str(exc)) from None


R.register_validator(KIND, _validate)


def publish_atlas_arrays(home: Path, name: str, image: Any, label: Any, affine: Any, schema: Any, modality: str, source: str, sharing: str) -> dict:
    """Publish an atlas from arrays (what `publish_atlas` does after reading the files).

    Args:
        home: the coordinator's home (its registry).
        name: the atlas's registry name (each publish adds a version).
        image: (X, Y, Z) intensities.
        label: (X, Y, Z) schema class ids.
        affine: (4, 4) RAS+ voxel-to-world in mm.
        schema: a built-in schema name, a schema file or mapping (as ``plan_args.schema``).
        modality: the image's modality (``MR``, ``CT``).
        source: where the atlas comes from.
        sharing: why it may go to every site.

    Returns:
        The registry record (``path``: its folder), plus ``spec``: the ``plan_args.atlas`` entry.

    Raises:
        UserError: the atlas, the schema or the registry refused it (naming the problem).
    """
    from coordinator.plans import PlanArgsError

    try:
        raw, where = resolve_schema(schema, Path.cwd())
        files = atlas_files(image, label, affine, parse_schema(raw, where), modality, source, sharing)
    except (AtlasError, PlanArgsError) as exc:
        raise UserError(f"atlas {name}: {exc}") from None
    registry = R.Registry(Path(home))
    record = registry.publish(KIND, name, files, meta={"schema": raw.get("name"), "modality": modality, "source": source, "sharing": sharing})
    record["path"] = str(registry.path(KIND, name, record["version"]))
    record["spec"] = atlas_spec_entry(record)
    return record


def publish_atlas(home: Path, name: str, image_path: Path, label_path: Path, schema: Any, modality: str, source: str, sharing: str) -> dict:
    """Publish an atlas from two NIfTI files (image and labels on the same grid).

    Args:
        home: the coordinator's home (its registry).
        name: the atlas's registry name.
        image_path: the atlas image (NIfTI).
        label_path: its labels (NIfTI), in the schema's class ids.
        schema: a built-in schema name, a schema file or mapping.
        modality: the image's modality.
        source: where the atlas comes from.
        sharing: why it may go to every site.

    Returns:
        The registry record, with ``spec`` (the ``plan_args.atlas`` entry).

    Raises:
        UserError: a file cannot be read, the grids differ, or the atlas is refused.
    """
    import nibabel as nib
    import numpy as np

    loaded = []
    for path in (image_path, label_path):
        try:
            img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+, as prepared cases are
            loaded.append((np.asarray(img.dataobj), np.asarray(img.affine)))
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            raise UserError(f"{path}: cannot read as NIfTI ({' '.join(str(exc).split())})") from None
    (image, image_affine), (label, label_affine) = loaded
    if image.shape != label.shape or not np.allclose(image_affine, label_affine, atol=1e-3):
        raise UserError(f"{label_path}: not on the grid of {image_path} (shape {label.shape} vs {image.shape}, or another affine)")
    if not np.all(np.equal(np.mod(label, 1), 0)):
        raise UserError(f"{label_path}: labels must be whole numbers (class ids)")
    return publish_atlas_arrays(home, name, image.astype("float32"), label.astype("uint8"), image_affine, schema, modality, source, sharing)


def atlas_spec_entry(record: dict) -> dict[str, str]:
    """The ``plan_args.atlas`` entry that names a published atlas version.

    Args:
        record: the registry record of the version.

    Returns:
        ``{"name", "version", "sha256"}`` (the sha256 of ``atlas.safetensors``).
    """
    return {"name": record["name"], "version": record["version"], "sha256": record["files"][ATLAS_FILE]["sha256"]}
