"""2D axial slices of a prepared 3D dataset (images only): what the data factory trains on, cached on disk.

The per-case chain and the slice layout: docs/design/data-factory.md. No Fed-BioMed import.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypedDict

import torch
from monai.transforms.croppad.array import SpatialPad
from monai.transforms.spatial.array import Resize

from fedimg_core import atomic
from pipelines import transforms as _transforms
from preprocessing.dataset import load_dataset
from preprocessing.schema import LabelSchema, ModalityRule

log = logging.getLogger(__name__)

BACKGROUND = -1.0  # value of padding (and of air / outside the body) after `intensity_to_unit`
FOREGROUND_LEVEL = -0.95  # a voxel above this counts as foreground for `min_foreground`

# Bump when the output of `dataset_slices` changes in a way its arguments do not show: it
# is part of the disk cache key.
SLICES_VERSION = 1
_CACHE_SUBDIR = "factory-slices"


class _ChainOptions(TypedDict):
    image_mode: str
    label_dtype: torch.dtype
    zscore_nonzero: bool


# Image-only chain; explicit options so the cache key (`transforms_fingerprint`) is
# computed without building the chain, and matches the chain's own fingerprint.
_CHAIN_OPTIONS: _ChainOptions = {"image_mode": "bilinear", "label_dtype": torch.long, "zscore_nonzero": True}
_IMAGE_KEYS = ("image",)


@dataclass(frozen=True)
class SliceSettings:
    """How a dataset becomes 2D training slices.

    * ``size``: output slices are ``(1, size, size)``.
    * ``n_bins``: slice-position bin = ``slice_index * n_bins // depth`` (0: every bin is 0).
    * ``spacing``: resampling before slicing, as in `pipelines.transforms`: ``"schema"``
      (the schema's target spacing), None (each case's native grid) or three numbers in mm.
    * ``min_foreground``: drop slices whose fraction of voxels above ``FOREGROUND_LEVEL``
      (-0.95 after `intensity_to_unit`), measured on the slice before padding and
      resizing, is below this; 0 keeps every slice.
    """

    size: int = 64
    n_bins: int = 29
    spacing: str | None | tuple[float, float, float] = "schema"
    min_foreground: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 4:
            raise ValueError(f"size must be an integer >= 4, got {self.size!r}")
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or self.n_bins < 0:
            raise ValueError(f"n_bins must be a non-negative integer, got {self.n_bins!r}")
        if not 0.0 <= float(self.min_foreground) <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground!r}")
        if self.spacing is not None and not isinstance(self.spacing, str):
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    def key(self) -> dict[str, Any]:
        """The settings as JSON-serialisable values (part of the slice cache's key)."""
        return {
            "size": self.size,
            "n_bins": self.n_bins,
            "spacing": self.spacing if self.spacing is None or isinstance(self.spacing, str) else list(self.spacing),
            "min_foreground": float(self.min_foreground),
        }


# ------------------------------------------------------------------------------ intensity


def intensity_to_unit(image: torch.Tensor, rule: ModalityRule) -> torch.Tensor:
    """Map a schema-normalised volume (output of `pipelines.transforms`) to [-1, 1] (float32).

    * ``ct_window``: the schema window ``[lo, hi]`` HU, which the schema chain turned into
      ``[(lo - centre) / scale, (hi - centre) / scale]``, maps linearly onto [-1, 1]; values
      outside are clipped. The window ends map to exactly -1 and 1; air is -1.
    * ``zscore``: clip to [-3, 3] standard deviations, then divide by 3. Voxels that are
      exactly 0 are set to -1: the schema chain z-scores MR over the non-zero voxels and
      leaves the zero background (air, padding around the field of view) at 0, which
      would otherwise become mid-grey, unlike the -1 padding of non-square slices.
    * ``none``: per-volume 0.5 and 99.5 percentiles map linearly to [-1, 1], clipped; a
      volume whose percentiles coincide becomes all -1.

    Args:
        image: a schema-normalised volume (any shape).
        rule: the modality's intensity rule of the schema.

    Returns:
        The volume in [-1, 1], float32, same shape.

    Raises:
        ValueError: ``ct_window`` without a clip window, or an unknown normalisation.
    """
    x = torch.as_tensor(image).float()
    if rule.normalisation == "ct_window":
        if rule.clip is None:
            raise ValueError("ct_window normalisation needs a clip window")
        lo = torch.tensor((rule.clip[0] - rule.centre) / rule.scale, dtype=torch.float32)
        hi = torch.tensor((rule.clip[1] - rule.centre) / rule.scale, dtype=torch.float32)
        # (x - lo) / (hi - lo) is exactly 0 at lo and exactly 1 at hi in float arithmetic.
        return ((x - lo) / (hi - lo) * 2.0 - 1.0).clamp_(-1.0, 1.0)
    if rule.normalisation == "zscore":
        out = x.clamp(-3.0, 3.0) / 3.0
        return out.masked_fill_(x == 0, BACKGROUND)
    if rule.normalisation == "none":
        flat = x.flatten()
        if flat.numel() == 0:
            return x.clone()
        if flat.numel() > 16_000_000:  # torch.quantile's input limit; a strided sample is plenty
            flat = flat[:: -(-flat.numel() // 16_000_000)]
        quantiles: list[float] = torch.quantile(flat, torch.tensor([0.005, 0.995], dtype=flat.dtype)).tolist()
        p_lo, p_hi = quantiles
        if not p_hi > p_lo:
            return torch.full_like(x, BACKGROUND)
        return ((x - p_lo) / (p_hi - p_lo) * 2.0 - 1.0).clamp_(-1.0, 1.0)
    raise ValueError(f"unknown normalisation {rule.normalisation!r} (ct_window, zscore or none)")


# ------------------------------------------------------------------------------- slicing


def slice_bins(depth: int, n_bins: int) -> torch.Tensor:
    """Bin of each slice index of a volume: ``index * n_bins // depth``.

    Args:
        depth: number of slices.
        n_bins: number of bins (0: every bin is 0).

    Returns:
        (depth,) long bins.
    """
    if n_bins <= 0:
        return torch.zeros(depth, dtype=torch.long)
    return torch.arange(depth, dtype=torch.long) * n_bins // max(depth, 1)


def volume_slices(image: torch.Tensor, rule: ModalityRule, settings: SliceSettings = SliceSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices of one schema-normalised volume ``(1, X, Y, Z)``.

    Returns ``(slices, bins)``: ``(N, 1, size, size)`` float32 in [-1, 1] and ``(N,)`` long,
    N = Z, or fewer when ``settings.min_foreground`` drops nearly empty slices (bins are
    those of the kept slices' positions in the whole volume).

    Each slice (X x Y) is padded symmetrically to a square with -1 (MONAI `SpatialPad`), so
    the aspect ratio is kept, then resized with MONAI `Resize` (bilinear, with its Gaussian
    anti-aliasing when downsampling). The resize runs on ``x + 1`` so that the zero border
    the anti-aliasing filter assumes is the -1 background, not mid-grey: padded borders
    stay exactly -1, and content touching the frame is darkened only in the outermost
    output row/column when downsampling (the outside of the frame counts as background).

    Args:
        image: (1, X, Y, Z) schema-normalised volume (tensor or MetaTensor).
        rule: the modality's intensity rule (`intensity_to_unit`).
        settings: slice size, bins and foreground threshold.

    Returns:
        ``(slices, bins)`` as above.

    Raises:
        ValueError: not a single-channel 3D volume.
    """
    image = torch.as_tensor(image)
    if hasattr(image, "as_tensor"):
        image = image.as_tensor()
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a single-channel volume (1, X, Y, Z), got shape {tuple(image.shape)}")
    unit = intensity_to_unit(image[0], rule)  # (X, Y, Z)
    depth = unit.shape[-1]
    bins = slice_bins(depth, settings.n_bins)
    stack = unit.permute(2, 0, 1).contiguous()  # (Z, X, Y): slices as channels, one 2D resize for all
    if settings.min_foreground > 0 and depth:
        keep = foreground_keep(stack, settings.min_foreground)
        stack, bins = stack[keep], bins[keep]
    return square_slices(stack, settings.size), bins


def foreground_keep(stack: torch.Tensor, min_foreground: float) -> torch.Tensor:
    """Which slices of a stack `volume_slices` keeps for ``min_foreground``.

    Args:
        stack: (N, X, Y) slices in [-1, 1].
        min_foreground: the smallest kept fraction of voxels above ``FOREGROUND_LEVEL``.

    Returns:
        (N,) bool mask, True where the fraction is at least ``min_foreground``.
    """
    fraction = (stack > FOREGROUND_LEVEL).flatten(1).float().mean(1)
    return fraction >= min_foreground


def square_slices(stack: torch.Tensor, size: int) -> torch.Tensor:
    """Square slices: padded to a square with -1, then resized, exactly as described in `volume_slices`.

    Args:
        stack: (N, X, Y) slices in [-1, 1].
        size: the output side.

    Returns:
        (N, 1, size, size) float32 slices in [-1, 1].
    """
    if stack.shape[0] == 0:
        return torch.zeros((0, 1, size, size), dtype=torch.float32)
    side = max(stack.shape[1], stack.shape[2])
    # Pad/resize x + 1 (background 0): SpatialPad's constant and the anti-aliasing filter's
    # zero padding then both mean "background".
    shifted = stack + 1.0
    if stack.shape[1] != stack.shape[2]:
        shifted = SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant", value=0.0)(shifted)
    resized = Resize(spatial_size=(size, size), mode="bilinear", align_corners=False, anti_aliasing=True)(shifted)
    resized = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
    return (resized.float() - 1.0).clamp_(-1.0, 1.0).unsqueeze(1).contiguous()


# ------------------------------------------------------------------------------- dataset

_MEMORY: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one entry: the last dataset


def clear_memory_cache() -> None:
    """Forget the in-process copy of the last dataset's slices."""
    _MEMORY.clear()


def _modality_rule(path: str | os.PathLike[str], schema: LabelSchema, modality: str) -> ModalityRule:
    rule = schema.modalities.get(modality)
    if rule is None:
        raise ValueError(
            f"dataset {path}: modality {modality!r} has no intensity rule in schema {schema.name} {schema.version} "
            f"(it has {', '.join(sorted(schema.modalities)) or 'none'})"
        )
    return rule


def _cache_key(manifest: bytes, settings: SliceSettings, fingerprint: str, schema: LabelSchema) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(manifest).digest())
    doc = {
        "settings": settings.key(),
        "transforms": fingerprint,
        "schema": [schema.name, schema.version],
        "slices_version": SLICES_VERSION,
    }
    h.update(json.dumps(doc, sort_keys=True).encode())
    return h.hexdigest()


def _chain_fingerprint(schema: LabelSchema, modality: str, spacing: str | None | tuple[float, float, float]) -> str:
    return _transforms.transforms_fingerprint(schema, modality, spacing, _IMAGE_KEYS, **_CHAIN_OPTIONS)


def _quantise(images: torch.Tensor) -> torch.Tensor:
    """Stored as float16 (exact at -1, 0, 1; steps <= 2**-11 in [-1, 1])."""
    return images.to(torch.float16)


def read_tensor_cache(path: Path, keys: Sequence[str], aligned: Sequence[str], what: str) -> dict[str, torch.Tensor] | None:
    """Read tensors from a cache file written with torch.save (weights only).

    Args:
        path: the cache file.
        keys: the tensors to read.
        aligned: keys whose first dimension must agree.
        what: what the cache holds, for the log message.

    Returns:
        ``{key: tensor}``, or None when the file is missing or damaged (logged; the caller
        recomputes and overwrites it).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not all(isinstance(data.get(k), torch.Tensor) for k in keys):
            raise ValueError("unexpected content")
        if len({data[k].shape[0] for k in aligned}) > 1:
            raise ValueError("inconsistent lengths")
        return {k: data[k] for k in keys}
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file is recomputed and overwritten
        log.warning("%s: unreadable %s cache (%s); recomputing", path, what, exc)
        return None


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    data = read_tensor_cache(path, ("images", "bins"), ("images", "bins"), "slice")
    return None if data is None else (data["images"].to(torch.float16), data["bins"].to(torch.long))


def dataset_slices(
    path: str | os.PathLike[str],
    schema: LabelSchema,
    settings: SliceSettings = SliceSettings(),
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices of every case of the prepared dataset at ``path``: ``(images, bins)``.

    ``images`` is ``(N, 1, size, size)`` float32 in [-1, 1] (values rounded to float16, the
    precision of the cache, whether or not a cache is used), ``bins`` ``(N,)`` long; cases
    are concatenated in dataset order. Labels are ignored (and may be absent).

    The dataset is not checked against the schema's classes (labels are not used).

    Caching: with ``cache_dir``, the result is kept in
    ``<cache_dir>/factory-slices/<sha256>.pt`` ({"images": float16, "bins": int64}),
    written atomically; the key covers manifest.json's bytes (which hold every file's
    sha256), the settings, the transform chain's fingerprint (schema rule, spacing, MONAI
    version), the schema name and version and `SLICES_VERSION`. A file that cannot be read
    is recomputed. The last result is also kept in memory (one dataset at a time).

    Args:
        path: the prepared dataset.
        schema: the federation's label schema (intensity rule, spacing).
        settings: how the volumes become slices.
        cache_dir: where the slice cache lives, or None for no disk cache.

    Returns:
        ``(images, bins)`` as above.

    Raises:
        ValueError: naming the dataset and modality when the schema has no intensity rule
            for the dataset's modality.
        preprocessing.dataset.DatasetError: a broken dataset.
    """
    root = Path(path)
    dataset = load_dataset(root)
    modality = dataset.modality
    rule = _modality_rule(root, schema, modality)
    fingerprint = _chain_fingerprint(schema, modality, settings.spacing)
    key = _cache_key((root / "manifest.json").read_bytes(), settings, fingerprint, schema)

    hit = _MEMORY.get(key)
    if hit is not None:
        return hit[0].float(), hit[1].clone()

    cache_file = Path(cache_dir) / _CACHE_SUBDIR / f"{key}.pt" if cache_dir is not None else None
    cached = _read_cache(cache_file) if cache_file is not None else None
    if cached is None:
        chain = _transforms.deterministic_transforms(schema, modality, spacing=settings.spacing, keys=_IMAGE_KEYS, **_CHAIN_OPTIONS)
        # set by deterministic_transforms on the Compose (an attribute Compose's type does not declare)
        ran = getattr(chain, "fingerprint", None)
        if ran != fingerprint:  # the cache key must describe the chain that ran
            raise RuntimeError(f"transform fingerprint mismatch: {ran} != {fingerprint}")
        parts, part_bins = [], []
        for case in dataset.cases:
            out = chain({"image": str(case.image)})
            images, bins = volume_slices(out["image"], rule, settings)
            parts.append(images)
            part_bins.append(bins)
        images = _quantise(torch.cat(parts)) if parts else torch.zeros((0, 1, settings.size, settings.size), dtype=torch.float16)
        bins = torch.cat(part_bins) if part_bins else torch.zeros(0, dtype=torch.long)
        cached = (images.contiguous(), bins.contiguous())
        if cache_file is not None:
            buffer = io.BytesIO()
            torch.save({"images": cached[0], "bins": cached[1]}, buffer)
            atomic.write_bytes(cache_file, buffer.getvalue())
    _MEMORY.clear()
    _MEMORY[key] = cached
    return cached[0].float(), cached[1].clone()


__all__: Sequence[str] = (
    "BACKGROUND",
    "FOREGROUND_LEVEL",
    "SliceSettings",
    "clear_memory_cache",
    "dataset_slices",
    "foreground_keep",
    "intensity_to_unit",
    "slice_bins",
    "square_slices",
    "volume_slices",
)
