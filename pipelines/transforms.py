"""Training-time preprocessing driven by the federation label schema (MONAI).

One deterministic chain per (schema, modality, spacing), run once per case and cached:

    load (NIfTI) -> channel first -> RAS+ orientation -> resample to the federation spacing
    (image bilinear, labels nearest) -> intensity rule of the modality -> integer label

* **CT** (``ct_window``): clip to the schema window, then ``(x - centre) / scale``; the
  ConDistFL paper's [-54, 258] HU, (x - 100) / 50 is the default schema's rule.
* **MR** (``zscore``): per-case z-score over the non-zero voxels (see `intensity_transform`).
* Labels are schema ids; the ignore label (255) survives nearest-neighbour resampling as is.

Random augmentation (patches, flips) is applied after the cached part, per sample or batch.
This module imports no Fed-BioMed code; the schema module is plain Python.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
from monai.data.dataset import PersistentDataset
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.intensity.dictionary import NormalizeIntensityd, ScaleIntensityRanged
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, Spacingd
from monai.transforms.traits import RandomizableTrait
from monai.transforms.transform import Transform
from monai.transforms.utility.dictionary import EnsureChannelFirstd, EnsureTyped, Identityd

from preprocessing.schema import LabelSchema, ModalityRule, load_schema

# MONAI 1.6's LoadImage instantiates every reader it knows, including the GPU DICOM reader,
# which warns on each construction on a CPU-only machine; we read NIfTI with nibabel only.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

# Bump whenever the chain built by `deterministic_transforms` changes in a way its arguments
# do not show (a new step, another interpolation, another dtype): it is part of the cache key.
TRANSFORMS_VERSION = 1

# nibabel's RAS+ convention: axis codes name the direction each axis *increases* towards.
# Passed explicitly: MONAI 1.6 deprecates this default of Orientation(d) in favour of
# labels=None, which reads the tensor's "space" metadata instead.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

_SCHEMA_SPACING = "schema"

__all__ = [
    "RAS_LABELS",
    "TRANSFORMS_VERSION",
    "cached_dataset",
    "default_schema",
    "deterministic_transforms",
    "intensity_transform",
    "transforms_fingerprint",
]


@functools.lru_cache(maxsize=1)
def default_schema() -> LabelSchema:
    """The default federation schema (preprocessing/schemas/abdominal-ct.yaml), read once per process."""
    return load_schema()


def intensity_transform(rule: ModalityRule, key: str = "image", zscore_nonzero: bool = True) -> Transform:
    """The MONAI dict transform for one modality rule of the schema.

    * ``ct_window``: clip to ``rule.clip``, then ``(x - rule.centre) / rule.scale``. Done by one
      ScaleIntensityRanged whose output range is the window mapped by the same affine formula,
      so in-window values get exactly ``(x - centre) / scale`` (up to float32 rounding).
    * ``zscore``: per-case ``(x - mean) / std``, per channel. With ``zscore_nonzero=True``
      (the default) mean and std are taken over the non-zero voxels only and zero voxels stay
      0. MR background (air, and the zero padding around the field of view) is ~0, so
      statistics over all voxels would depend on how much air a scanner's field of view
      holds, i.e. on the site, not on the anatomy; body-only statistics do not (nnU-Net
      does the same for MR). Exact zeros inside the body are rare in MR, whose noise floor is
      not zero. A case with no non-zero voxel is left unchanged.
    * ``none``: identity.

    Args:
        rule: the schema's rule for the case's modality.
        key: the image key.
        zscore_nonzero: z-score statistics over the non-zero voxels only.

    Returns:
        The transform.

    Raises:
        ValueError: an unknown normalisation, or ``ct_window`` without a clip window.
    """
    if rule.normalisation == "ct_window":
        if rule.clip is None:
            raise ValueError("ct_window normalisation needs a clip window")
        lo, hi = rule.clip
        return ScaleIntensityRanged(
            keys=key,
            a_min=lo,
            a_max=hi,
            b_min=(lo - rule.centre) / rule.scale,
            b_max=(hi - rule.centre) / rule.scale,
            clip=True,
        )
    if rule.normalisation == "zscore":
        return NormalizeIntensityd(keys=key, nonzero=zscore_nonzero, channel_wise=True)
    if rule.normalisation == "none":
        return Identityd(keys=key)
    raise ValueError(f"unknown normalisation {rule.normalisation!r} (ct_window, zscore or none)")


def _modality_rule(schema: LabelSchema, modality: str) -> ModalityRule:
    try:
        return schema.modalities[modality]
    except KeyError:
        raise ValueError(
            f"schema {schema.name} {schema.version} ({schema.source}) has no rule for modality {modality!r}; it has {sorted(schema.modalities)}"
        ) from None


def _resolve_spacing(schema: LabelSchema, spacing: Sequence[float] | str | None) -> tuple[float, ...] | None:
    if isinstance(spacing, str):
        if spacing != _SCHEMA_SPACING:
            raise ValueError(f"spacing must be 'schema', None or three numbers in mm, got {spacing!r}")
        return tuple(float(s) for s in schema.target_spacing)
    if spacing is None:
        return None
    out = tuple(float(s) for s in spacing)
    if len(out) != 3 or not all(s > 0 for s in out):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return out


def transforms_fingerprint(
    schema: LabelSchema,
    modality: str,
    spacing: Sequence[float] | None | str = _SCHEMA_SPACING,
    keys: Sequence[str] = ("image", "label"),
    **options: Any,
) -> str:
    """A readable, filesystem-safe name for the chain `deterministic_transforms` builds.

    ``<schema>-<version>-<modality>-<16 hex>``, the hex a sha256 of everything the output
    depends on: schema name and version, the modality's rule, the resolved spacing, the keys,
    the other options, `TRANSFORMS_VERSION` and MONAI's version (resampling numerics and the
    cache file format may change with it).

    Args:
        schema: the federation schema.
        modality: the case's modality (a rule of the schema).
        spacing: as for `deterministic_transforms`.
        keys: the image key, then the label keys.
        options: the chain's other arguments.

    Returns:
        The name.

    Raises:
        ValueError: no rule for the modality, or a bad spacing.
    """
    rule = _modality_rule(schema, modality)
    doc = {
        "schema": [schema.name, schema.version],
        "modality": modality,
        "rule": dataclasses.asdict(rule),
        "spacing": _resolve_spacing(schema, spacing),
        "keys": list(keys),
        "options": {k: str(v) for k, v in sorted(options.items())},
        "transforms_version": TRANSFORMS_VERSION,
        "monai": monai.__version__,
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return f"{schema.name}-{schema.version}-{modality}-{digest}"


def deterministic_transforms(
    schema: LabelSchema | None,
    modality: str,
    spacing: Sequence[float] | None | str = _SCHEMA_SPACING,
    keys: Sequence[str] = ("image", "label"),
    image_mode: str | int = "bilinear",
    label_dtype: torch.dtype = torch.long,
    zscore_nonzero: bool = True,
) -> Compose:
    """The cacheable preprocessing of one prepared case (a dict of NIfTI paths).

    ``keys[0]`` is the image, the other keys are label maps. A missing label key is fine
    (inference): every step skips keys absent from the dict.

    * ``schema``: the federation schema (None: the default one); gives the modality rule
      and, with ``spacing="schema"`` (the default), the target spacing.
    * ``spacing``: ``"schema"``, three numbers in mm, or None to keep each case's native
      voxel grid (no resampling).
    * ``image_mode``: image interpolation, ``"bilinear"`` or a spline order (e.g. 3); labels
      always use nearest neighbour, so only values of the input (incl. the ignore label) occur.
    * ``label_dtype``: long by default (what losses and indexing expect); uint8 holds every
      schema id and the ignore label and makes cached labels 8x smaller.

    The returned Compose has a ``fingerprint`` attribute (see `transforms_fingerprint`),
    which `cached_dataset` uses as its cache folder name.

    Args:
        schema: as above.
        modality: the case's modality (a rule of the schema).
        spacing: as above.
        keys: the image key, then the label keys.
        image_mode: as above.
        label_dtype: as above.
        zscore_nonzero: see `intensity_transform`.

    Returns:
        The chain, with its ``fingerprint``.

    Raises:
        ValueError: no keys, no rule for the modality, or a bad spacing.
    """
    schema = schema if schema is not None else default_schema()
    keys = list(keys)
    if not keys:
        raise ValueError("keys must name at least the image")
    image_key, label_keys = keys[0], keys[1:]
    rule = _modality_rule(schema, modality)
    pixdim = _resolve_spacing(schema, spacing)
    steps: list[Transform] = [
        # Nibabel reader pinned: prepared datasets are NIfTI with RAS+ affines; the reader
        # order of LoadImage otherwise depends on which optional packages are installed.
        LoadImaged(keys=keys, image_only=True, reader="NibabelReader", allow_missing_keys=True),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=True),
    ]
    if pixdim is not None:
        steps.append(
            Spacingd(
                keys=keys,
                pixdim=pixdim,
                mode=[image_mode] + ["nearest"] * len(label_keys),  # type: ignore[arg-type]  # MONAI takes spline orders (ints) too
                padding_mode=["border"] + ["zeros"] * len(label_keys),
                allow_missing_keys=True,
            )
        )
    steps.append(intensity_transform(rule, key=image_key, zscore_nonzero=zscore_nonzero))
    steps.append(EnsureTyped(keys=image_key, dtype=torch.float32))
    if label_keys:
        steps.append(EnsureTyped(keys=label_keys, dtype=label_dtype, allow_missing_keys=True))
    chain = Compose(steps)
    # an attribute, not a Compose subclass: MONAI's flatten() inlines only exact Compose instances
    chain.fingerprint = transforms_fingerprint(  # type: ignore[attr-defined]
        schema, modality, spacing, keys, image_mode=image_mode, label_dtype=label_dtype, zscore_nonzero=zscore_nonzero
    )
    return chain


def _item_hash(item: Any) -> bytes:
    """Cache key of one data item: its content plus size and mtime of every file it names,
    so a case rewritten in place (same path, new content) is recomputed."""

    def stamp(value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            try:
                st = path.stat()
            except (OSError, ValueError):
                return str(value)
            return [str(value), st.st_size, st.st_mtime_ns] if path.is_file() else str(value)
        if isinstance(value, dict):
            return {str(k): stamp(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [stamp(v) for v in value]
        return value

    return hashlib.sha256(json.dumps(stamp(item), sort_keys=True, default=str).encode()).hexdigest().encode()


def _fingerprint_of(transform: Callable[..., Any]) -> str | None:
    fp: str | None = getattr(transform, "fingerprint", None)
    if fp is not None:
        return fp
    # Compose([deterministic_transforms(...), <random steps>]): accepted when the cached part
    # (everything before the first random step) is exactly that first chain.
    if isinstance(transform, Compose) and transform.transforms:
        first = transform.transforms[0]
        first_fp: str | None = getattr(first, "fingerprint", None)
        if first_fp is not None and isinstance(first, Compose):
            # MONAI's Compose.flatten has no annotations
            if _first_random(transform.flatten().transforms) == len(first.flatten().transforms):  # type: ignore[no-untyped-call]
                return first_fp
    return None


def _first_random(steps: Sequence[Any]) -> int:
    """Index of the first step PersistentDataset will not cache (random, or not a MONAI Transform)."""
    return next((i for i, t in enumerate(steps) if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)), len(steps))


def cached_dataset(
    items: list[dict[str, Any]],
    transform: Callable[..., Any],
    cache_dir: str | os.PathLike[str],
    fingerprint: str | None = None,
) -> PersistentDataset:
    """A MONAI PersistentDataset whose deterministic part is computed once and kept on disk.

    Each item's result is a ``.pt`` file named by the hash of the item (its paths plus each
    file's size and mtime) inside ``cache_dir/<fingerprint>``. MONAI's key covers only the
    item, not the transforms, so the transform chain must be part of the folder name: a
    chain with different schema, modality rule, spacing or `TRANSFORMS_VERSION` gets another
    folder instead of silently reading stale results. ``fingerprint`` defaults to the
    ``fingerprint`` attribute that `deterministic_transforms` sets (also found when that
    chain is the first element of a Compose followed by random steps); any other transform
    needs an explicit one.

    Old folders are not deleted; remove ``cache_dir`` to reclaim space.

    Items come back as plain tensors with or without a cache hit; each volume's affine is in
    ``<key>_affine`` (a float64 4x4 tensor). MONAI 1.6 quirks this avoids: with its default
    ``track_meta=False`` a miss returns MetaTensors and a hit plain tensors; with
    ``track_meta=True`` the cached MetaTensor's metadata fails ``torch.load(weights_only=True)``,
    the file is taken as corrupt, deleted and recomputed on every access (a warning only).

    Args:
        items: the cases, dicts of file paths.
        transform: the chain (its deterministic head is cached).
        cache_dir: the cache root.
        fingerprint: the chain's folder name (default: as above).

    Returns:
        The dataset.

    Raises:
        ValueError: no fingerprint can be found, or it is not a plain folder name.
    """
    fingerprint = fingerprint if fingerprint is not None else _fingerprint_of(transform)
    if not fingerprint:
        raise ValueError(
            "cached_dataset needs a fingerprint naming the transform chain (the cache key must change "
            "when the chain does); build it with deterministic_transforms or pass fingerprint="
        )
    if not all(c.isalnum() or c in "-_." for c in fingerprint) or fingerprint.startswith("."):
        raise ValueError(f"fingerprint must be a plain folder name, got {fingerprint!r}")
    chain = transform.flatten() if isinstance(transform, Compose) else Compose([transform])  # type: ignore[no-untyped-call]  # MONAI's flatten has no annotations
    # A nested Compose counts as "random" for PersistentDataset (Compose is Randomizable), which
    # would cache nothing: flatten, then strip metadata so hit and miss return the same types.
    steps = list(chain.transforms)
    steps.insert(_first_random(steps), _StripMeta())
    return PersistentDataset(
        data=items,
        transform=Compose(steps),
        cache_dir=Path(cache_dir) / fingerprint,
        hash_func=_item_hash,
    )


class _StripMeta(Transform):
    """MetaTensor -> plain tensor, keeping each affine as ``<key>_affine`` (float64)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key, value in data.items():
            if isinstance(value, MetaTensor):
                out[key] = value.as_tensor()
                out[f"{key}_affine"] = torch.as_tensor(value.affine, dtype=torch.float64).clone()
        return out
