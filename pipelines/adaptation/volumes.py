"""Geometry and I/O for 2D segmentation on the data factory's axial slices (domain adaptation).

Three things, all on exactly the slice geometry of `pipelines.factory.slices` (the GAN's):

* `labelled_slices` -- a prepared dataset's labelled cases as 2D training pairs: images
  identical to `dataset_slices` (same settings, same chain, same pad/resize) and the schema
  labels of the same slices (resampled nearest, padded with background 0, resized nearest).
  `few_shot_selection` picks the few target slices a few-shot experiment may use.
* `predict_volume_2d` -- whole-volume inference with a 2D model: every axial slice through
  the same chain, probabilities mapped back (resize, un-pad, then MONAI's inverse of the
  Orientation/Spacing steps) onto the input's own voxel grid, argmax there.
  `predict_dicom_series` does the same for a DICOM series (converted exactly as
  `site-agent prepare` converts it).
* `write_label_nifti` / `write_dicom_seg` -- the result as a NIfTI label map on the
  reference grid, or as a DICOM SEG of the source series; atomic writes, nothing partial.

Slice geometry (per case)::

    NIfTI -> pipelines.transforms.deterministic_transforms(keys=("image", "label"))
      (RAS+, resampled to the settings' spacing: image bilinear, label nearest)
    -> image: intensity_to_unit, slices along the last axis, pad to a square with -1,
       resize to size x size (bilinear, anti-aliased)          = `dataset_slices`
    -> label: slices along the last axis, pad with 0 (background), resize to size x size
       with nearest neighbour ("nearest-exact": sampling at pixel centres, the same
       alignment as the image's bilinear resize with align_corners=False)

Labels are schema ids. Voxels a site marked as unknown carry the schema's ignore label
(`LabelledSlices.ignore_label`, 255 by default), which the losses of `pipelines.losses`
(``ignore_index``) and `pipelines.evaluation.dice_per_class` leave out; classes a case does
not label are 0 in its label map (partial labels): `LabelledSlices.labeled_classes` says
which classes each case labels, for the marginal loss. No Fed-BioMed import.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Resize, SpatialPad

from pipelines import transforms as _transforms
from pipelines.factory import slices as _slices
from pipelines.factory.slices import SliceSettings, foreground_keep, intensity_to_unit, slice_bins, square_slices
from fedimg_core import atomic
from preprocessing.dataset import DatasetSchemaError, check_schema, load_dataset
from preprocessing.nifti import save_atomic
from preprocessing.schema import LabelSchema


# Bump when the output of `labelled_slices` changes in a way its arguments do not show (it
# is part of the disk cache key, with `pipelines.factory.slices.SLICES_VERSION`).
VOLUMES_VERSION = 1
_CACHE_SUBDIR = "adaptation-slices"
_KEYS = ("image", "label")
_IMAGE_KEYS = ("image",)
# The factory's chain options: the images must be those of `dataset_slices`, bit for bit.
_CHAIN_OPTIONS = _slices._CHAIN_OPTIONS
GRID_TOLERANCE_MM = 0.01  # a label and a DICOM series are the same grid within this

PredictFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]


# ----------------------------------------------------------------------------- 2D geometry


def pad_widths(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The symmetric padding that squares an ``X x Y`` slice: ``((before_x, after_x),
    (before_y, after_y))``, as MONAI's `SpatialPad` (method="symmetric") computes it."""
    side = max(width, height)
    pad = SpatialPad(spatial_size=(side, side), method="symmetric").compute_pad_width((width, height))
    return (tuple(pad[1]), tuple(pad[2]))  # type: ignore[return-value]


def square_labels(stack: torch.Tensor, size: int) -> torch.Tensor:
    """Label slices ``(N, X, Y)`` (integer) -> ``(N, size, size)`` int64 on the geometry of
    `square_slices`: padded symmetrically with 0 (background), resized with nearest
    neighbour at pixel centres ("nearest-exact"), so only input values occur."""
    if stack.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=torch.long)
    side = max(stack.shape[1], stack.shape[2])
    x = torch.as_tensor(stack).float()  # label ids (<= 255) are exact in float32
    if stack.shape[1] != stack.shape[2]:
        x = SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant", value=0.0)(x)
    x = Resize(spatial_size=(size, size), mode="nearest-exact", anti_aliasing=False)(x)
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.round().long().contiguous()


def unsquare(maps: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Inverse geometry of `square_slices` for dense maps ``(N, size, size)`` (e.g. one class'
    probabilities of every slice): resized to the padded square (bilinear, align_corners
    False), then the symmetric padding cropped: ``(N, width, height)`` float32."""
    side = max(width, height)
    x = Resize(spatial_size=(side, side), mode="bilinear", align_corners=False, anti_aliasing=False)(maps.float())
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    (bx, _), (by, _) = pad_widths(width, height)
    return x[:, bx : bx + width, by : by + height]


# ------------------------------------------------------------------------- labelled slices


@dataclass
class LabelledSlices:
    """2D training pairs of a prepared dataset (see `labelled_slices`).

    Per slice: ``images`` (N, 1, S, S) float32 in [-1, 1], ``labels`` (N, S, S) int64 schema
    ids (or ``ignore_label``), ``bins`` (N,) slice-position bins, ``case_index`` (N,) index
    into the per-case lists below, ``slice_index`` (N,) position of the slice in its
    resampled volume (0 = most inferior). Per case (the cases kept, in dataset order):
    ``case_ids``, ``depth`` (slices of the resampled volume, before any ``min_foreground``
    filtering), ``labeled_classes`` (schema ids the case labels; [] for a case without
    label) and ``has_label``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    bins: torch.Tensor
    case_index: torch.Tensor
    slice_index: torch.Tensor
    depth: torch.Tensor
    case_ids: list[str]
    labeled_classes: list[list[int]]
    has_label: list[bool]
    ignore_label: int
    num_classes: int
    settings: SliceSettings = field(default_factory=SliceSettings)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def dataset_labeled_classes(self) -> list[int]:
        """Every schema id some kept case labels."""
        return sorted({c for cs in self.labeled_classes for c in cs})

    def foreground(self) -> torch.Tensor:
        """(N,) bool: the slice shows at least one pixel of a foreground class (not background,
        not the ignore label)."""
        lab = self.labels
        fg = (lab > 0) & (lab < self.num_classes)
        return fg.flatten(1).any(1)


_MEMORY: dict[str, dict[str, torch.Tensor]] = {}  # the last dataset only


def clear_memory_cache() -> None:
    """Forget the in-process copy of the last `labelled_slices` result."""
    _MEMORY.clear()


def _case_labeled_classes(dataset, manifest: dict, schema: LabelSchema, where: str) -> list[list[int]]:
    """Schema ids each case labels: the case's ``labeled_classes`` in manifest.json (written by
    `site-agent prepare`), else the dataset's, else every class of dataset.json's labels."""
    by_id = {c.get("case_id"): c for c in manifest.get("cases", []) if isinstance(c, dict)}
    default = dataset.labeled_classes
    if default is None:
        default = sorted(v for v in dataset.labels.values() if v != 0)
    out = []
    for case in dataset.cases:
        if case.label is None:
            out.append([])
            continue
        own = by_id.get(case.case_id, {}).get("labeled_classes")
        classes = own if isinstance(own, list) else default
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 < c < schema.num_classes]
        if bad:
            raise DatasetSchemaError(
                f"{where}: case {case.case_id}: labelled classes {bad} are not foreground classes of schema "
                f"{schema.name} {schema.version} (1..{schema.num_classes - 1})"
            )
        out.append(sorted(int(c) for c in classes))
    return out


def _check_label_values(label: torch.Tensor, schema: LabelSchema, path: Path) -> None:
    values = torch.unique(label)
    bad = values[(values < 0) | ((values >= schema.num_classes) & (values != schema.ignore_label))]
    if bad.numel():
        raise ValueError(
            f"{path}: label values {bad[:8].tolist()} are neither schema ids (0..{schema.num_classes - 1}) nor the "
            f"ignore label {schema.ignore_label} of schema {schema.name} {schema.version}"
        )


def _labelled_cache_key(manifest: bytes, settings: SliceSettings, fingerprint: str, schema: LabelSchema, only_labelled: bool) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(manifest).digest())  # every image's and label's sha256 is in there
    doc = {
        "settings": settings.key(),
        "transforms": fingerprint,
        "schema": [schema.name, schema.version, sorted(schema.classes.items()), schema.ignore_label],
        "only_labelled": bool(only_labelled),
        "slices_version": _slices.SLICES_VERSION,
        "volumes_version": VOLUMES_VERSION,
    }
    h.update(json.dumps(doc, sort_keys=True).encode())
    return h.hexdigest()


_TENSORS = ("images", "labels", "bins", "case_index", "slice_index", "depth")


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    return _slices.read_tensor_cache(path, _TENSORS, ("images", "labels", "bins", "case_index", "slice_index"), "labelled-slice")


def labelled_slices(
    path: str | os.PathLike,
    schema: LabelSchema,
    settings: SliceSettings = SliceSettings(),
    cache_dir: str | os.PathLike | None = None,
    only_labelled: bool = True,
) -> LabelledSlices:
    """Axial (image, label) slice pairs of the prepared dataset at ``path``.

    ``images`` are exactly what `pipelines.factory.slices.dataset_slices` gives for the same
    ``settings`` (float16-rounded values, ``min_foreground`` applied the same way), case by
    case; ``labels`` are the schema labels of the same slices (see the module docstring).

    * ``only_labelled=True`` (default): cases without a label file are skipped; ValueError
      naming the dataset when no case has one.
    * ``only_labelled=False``: every case is kept (then ``images`` equal `dataset_slices`'s
      whole output); a case without a label gets ``ignore_label`` everywhere and
      ``labeled_classes == []``.

    Raises `preprocessing.dataset.DatasetError` for a broken dataset,
    `DatasetSchemaError` when it was prepared with another schema or labels classes the
    schema lacks, ValueError naming the file when a label holds values that are neither
    schema ids nor the ignore label, or when the schema has no rule for the modality.

    Caching as `dataset_slices`: with ``cache_dir`` the tensors are kept in
    ``<cache_dir>/adaptation-slices/<sha256>.pt`` (atomic write); the key covers
    manifest.json's bytes (with every image's and label's sha256), the settings, the chain's
    fingerprint, the schema (name, version, classes, ignore label), ``only_labelled`` and
    the versions of this module and of the factory slices. The last result is also kept in
    memory.
    """
    root = Path(path)
    dataset = load_dataset(root)
    manifest_bytes = (root / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    where = f"dataset {root}"
    check_schema(manifest, schema, where)
    modality = dataset.modality
    rule = _slices._modality_rule(root, schema, modality)
    classes = _case_labeled_classes(dataset, manifest, schema, where)
    keep_cases = [i for i, c in enumerate(dataset.cases) if c.label is not None or not only_labelled]
    if not any(c.label is not None for c in dataset.cases) and only_labelled:
        raise ValueError(f"{where}: no case has a label (labelsTr/); labelled slices need at least one labelled case")
    fingerprint = _transforms.transforms_fingerprint(schema, modality, settings.spacing, _KEYS, **_CHAIN_OPTIONS)
    key = _labelled_cache_key(manifest_bytes, settings, fingerprint, schema, only_labelled)

    data = _MEMORY.get(key)
    cache_file = Path(cache_dir) / _CACHE_SUBDIR / f"{key}.pt" if cache_dir is not None else None
    if data is None and cache_file is not None:
        data = _read_cache(cache_file)
    if data is None:
        data = _compute_labelled(dataset, keep_cases, schema, modality, rule, settings, fingerprint)
        if cache_file is not None:
            buffer = io.BytesIO()
            torch.save(data, buffer)
            atomic.write_bytes(cache_file, buffer.getvalue())
    _MEMORY.clear()
    _MEMORY[key] = data
    return LabelledSlices(
        images=data["images"].float(),
        labels=data["labels"].long(),
        bins=data["bins"].long().clone(),
        case_index=data["case_index"].long().clone(),
        slice_index=data["slice_index"].long().clone(),
        depth=data["depth"].long().clone(),
        case_ids=[dataset.cases[i].case_id for i in keep_cases],
        labeled_classes=[list(classes[i]) for i in keep_cases],
        has_label=[dataset.cases[i].label is not None for i in keep_cases],
        ignore_label=int(schema.ignore_label),
        num_classes=int(schema.num_classes),
        settings=settings,
    )


def _compute_labelled(dataset, keep_cases, schema, modality, rule, settings: SliceSettings, fingerprint: str) -> dict[str, torch.Tensor]:
    chain = _transforms.deterministic_transforms(schema, modality, spacing=settings.spacing, keys=_KEYS, **_CHAIN_OPTIONS)
    if chain.fingerprint != fingerprint:  # the cache key must describe the chain that ran
        raise RuntimeError(f"transform fingerprint mismatch: {chain.fingerprint} != {fingerprint}")
    size = settings.size
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "labels", "bins", "case_index", "slice_index")}
    depths = []
    for j, i in enumerate(keep_cases):
        case = dataset.cases[i]
        item = {"image": str(case.image)}
        if case.label is not None:
            item["label"] = str(case.label)
        out = chain(item)
        image = out["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"{case.image}: expected a single-channel 3D image, got shape {tuple(image.shape)} after loading")
        if case.label is not None:
            label = out["label"]
            label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
            if tuple(label.shape) != tuple(image.shape):
                raise ValueError(
                    f"{case.label}: label grid {tuple(label.shape[1:])} differs from the image's {tuple(image.shape[1:])} "
                    f"after resampling ({case.image}); re-run `site-agent prepare`"
                )
            _check_label_values(label, schema, case.label)
            label = label[0].long()
        else:
            label = None
        # The image path of `volume_slices`, step by step, keeping the slice positions.
        unit = intensity_to_unit(image[0], rule)  # (X, Y, Z)
        depth = unit.shape[-1]
        stack = unit.permute(2, 0, 1).contiguous()
        index = torch.arange(depth, dtype=torch.long)
        if settings.min_foreground > 0 and depth:
            index = index[foreground_keep(stack, settings.min_foreground)]
        parts["images"].append(square_slices(stack[index], size))
        if case.label is not None:
            parts["labels"].append(square_labels(label.permute(2, 0, 1)[index], size).to(torch.uint8))
        else:  # nothing known, padding included
            parts["labels"].append(torch.full((len(index), size, size), schema.ignore_label, dtype=torch.uint8))
        parts["bins"].append(slice_bins(depth, settings.n_bins)[index])
        parts["case_index"].append(torch.full((len(index),), j, dtype=torch.long))
        parts["slice_index"].append(index)
        depths.append(depth)
    empty = {
        "images": torch.zeros((0, 1, size, size)),
        "labels": torch.zeros((0, size, size), dtype=torch.uint8),
    }
    data = {k: torch.cat(v) if v else empty.get(k, torch.zeros(0, dtype=torch.long)) for k, v in parts.items()}
    data["images"] = data["images"].to(torch.float16).contiguous()  # the precision of `dataset_slices`
    data["depth"] = torch.tensor(depths, dtype=torch.long)
    return data


def few_shot_selection(
    slices: LabelledSlices,
    n_volumes: int = 3,
    per_volume: str | int = "middle",
    seed: int | None = None,
) -> torch.Tensor:
    """Indices (into ``slices``, sorted, int64) of the few labelled target slices a few-shot
    experiment may train on.

    Eligible volumes are the labelled cases with at least one *foreground* slice (a pixel of
    a class in 1..num_classes-1; the ignore label does not count). ``n_volumes`` of them
    are used: the first ones in dataset order, or, with ``seed``, a seeded random choice
    (``numpy.random.default_rng(seed)``; the same seed gives the same volumes).

    Per volume, among its foreground slices ordered by position:

    * ``"middle"``: the middle one (index ``m // 2`` of ``m``; the upper middle when ``m`` is
      even), i.e. the slice through the middle of the labelled structures;
    * an integer ``k``: ``k`` slices evenly spread, the ``floor((j + 0.5) * m / k)``-th for
      ``j < k`` (``k = 1`` is the middle; every foreground slice when ``k >= m``).

    Deterministic. ValueError when fewer than ``n_volumes`` volumes are eligible.
    """
    if isinstance(n_volumes, bool) or not isinstance(n_volumes, int) or n_volumes < 1:
        raise ValueError(f"n_volumes must be a positive integer, got {n_volumes!r}")
    if per_volume == "middle":
        k = 1
    elif isinstance(per_volume, int) and not isinstance(per_volume, bool) and per_volume >= 1:
        k = per_volume
    else:
        raise ValueError(f"per_volume must be 'middle' or a positive integer, got {per_volume!r}")
    fg = slices.foreground()
    eligible = []
    for c, labelled in enumerate(slices.has_label):
        if labelled and bool((fg & (slices.case_index == c)).any()):
            eligible.append(c)
    if len(eligible) < n_volumes:
        raise ValueError(
            f"few-shot selection needs {n_volumes} labelled volumes with foreground, the dataset has {len(eligible)} "
            f"({', '.join(slices.case_ids[c] for c in eligible) or 'none'})"
        )
    if seed is not None:
        rng = np.random.default_rng(seed)
        chosen = sorted(int(c) for c in rng.choice(eligible, size=n_volumes, replace=False))
    else:
        chosen = eligible[:n_volumes]
    picked: list[int] = []
    for c in chosen:
        idx = torch.nonzero(fg & (slices.case_index == c)).flatten()
        idx = idx[torch.argsort(slices.slice_index[idx], stable=True)]
        m = len(idx)
        if k >= m:
            picked.extend(idx.tolist())
        else:
            picked.extend(int(idx[int((j + 0.5) * m / k)]) for j in range(k))
    return torch.tensor(sorted(picked), dtype=torch.long)


# ------------------------------------------------------------------------------- inference


@dataclass
class VolumePrediction:
    """A 2D model's segmentation of one volume, on the input's own voxel grid.

    ``label`` (X, Y, Z) uint8 (uint16 beyond 256 classes), the argmax of the probabilities;
    ``affine`` the input's 4x4 affine; ``probabilities`` (C, X, Y, Z) float32 when asked for;
    ``reference`` the input image (header source for `write_label_nifti`); ``sources``: for
    a DICOM series, its instance files in slice order (``label[:, :, k]`` is
    ``sources[k]``; ``label[i, j, k]`` is column i, row j).
    """

    label: np.ndarray
    affine: np.ndarray
    reference: nib.spatialimages.SpatialImage
    probabilities: np.ndarray | None = None
    sources: list[Path] | None = None

    def save_nifti(self, path: str | os.PathLike) -> str:
        return write_label_nifti(self.label, self.reference, path)


def _load_reference(image) -> nib.spatialimages.SpatialImage:
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise ValueError(f"{p}: no such file (expected a NIfTI image)")
        try:
            img = nib.load(str(p))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types
            raise ValueError(f"{p}: not a readable NIfTI image ({' '.join(str(exc).split())[:160]})") from None
        where = str(p)
    else:
        img, where = image, "image"
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{where}: expected a NIfTI image, got {type(img).__name__}")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
        raise ValueError(f"{where}: expected a 3D volume, got shape {tuple(shape)}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{where}: the affine (sform/qform) is missing or singular")
    return img


def _as_probabilities(out, n: int, size: int, where: str) -> torch.Tensor:
    p = torch.as_tensor(out).detach()
    if p.ndim != 4 or p.shape[0] != n or tuple(p.shape[2:]) != (size, size):
        raise ValueError(f"{where}: predict_fn returned shape {tuple(p.shape)}, expected ({n}, C, {size}, {size})")
    p = p.to("cpu", torch.float32)
    if not torch.isfinite(p).all():
        raise ValueError(f"{where}: predict_fn returned NaN or infinite probabilities")
    return p


def predict_volume_2d(
    image: str | os.PathLike | nib.spatialimages.SpatialImage,
    modality: str,
    schema: LabelSchema,
    settings: SliceSettings,
    predict_fn: PredictFn,
    batch: int = 16,
    return_probabilities: bool = False,
    channel_chunk: int = 4,
) -> VolumePrediction:
    """Segment a 3D NIfTI (path or nibabel image, any orientation and spacing) with a 2D model.

    ``predict_fn(slices, bins)`` gets ``(n, 1, S, S)`` float32 slices in [-1, 1] (``n <=
    batch``) and their ``(n,)`` int64 slice-position bins and returns ``(n, C, S, S)``
    probabilities (tensor or array; C = ``schema.num_classes``), e.g. a softmax. It is called
    under ``torch.no_grad()``; moving data to a device is its business.

    Steps: the chain of `labelled_slices` (RAS+, resampling to ``settings.spacing``, schema
    intensity, `intensity_to_unit`, pad/resize, float16 rounding) on *every* axial slice
    (``min_foreground`` is not applied), so a prepared case's slices are exactly its
    training slices; then per class channel (``channel_chunk`` at a time, to bound memory):
    resize back to the padded square (bilinear), crop the padding, stack the slices and
    apply MONAI's inverse of the chain (``Compose.inverse`` on a MetaTensor carrying the
    image's ``applied_operations``: Spacing's resampling back to the input grid with the
    image's bilinear interpolation, then Orientation's axis permutation/flips). The label
    is the argmax over classes on the input grid (ties: the lowest class id).

    Returns a `VolumePrediction` whose ``label`` has the input's exact shape and whose
    ``affine`` is the input's. ValueError naming the input for an unreadable or non-3D
    image or a predict_fn output of the wrong shape / channel count.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(channel_chunk, bool) or not isinstance(channel_chunk, int) or channel_chunk < 1:
        raise ValueError(f"channel_chunk must be a positive integer, got {channel_chunk!r}")
    reference = _load_reference(image)
    where = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    rule = schema.modalities.get(modality)
    if rule is None:
        raise ValueError(
            f"{where}: modality {modality!r} has no intensity rule in schema {schema.name} {schema.version} "
            f"(it has {', '.join(sorted(schema.modalities)) or 'none'})"
        )
    chain = _transforms.deterministic_transforms(schema, modality, spacing=settings.spacing, keys=_IMAGE_KEYS, **_CHAIN_OPTIONS)
    with tempfile.TemporaryDirectory(prefix="fedimg-predict-") as tmp:
        if isinstance(image, (str, os.PathLike)) and len(reference.shape) == 3:
            source = str(image)
        else:  # an in-memory image, or a 4D file with one volume: what the loader reads
            data = np.asanyarray(reference.dataobj)
            data = data[..., 0] if data.ndim == 4 else data
            source = str(Path(tmp) / "input.nii")
            nib.save(nib.Nifti1Image(np.asarray(data), reference.affine), source)
        loaded = chain({"image": source})["image"]
    if not isinstance(loaded, MetaTensor) or loaded.ndim != 4 or loaded.shape[0] != 1:
        raise ValueError(f"{where}: expected a single-channel 3D image after loading, got shape {tuple(loaded.shape)}")

    unit = intensity_to_unit(loaded.as_tensor()[0], rule)  # (X, Y, Z) RAS+, resampled
    width, height, depth = unit.shape
    stack = unit.permute(2, 0, 1).contiguous()
    bins = slice_bins(depth, settings.n_bins)
    size = settings.size
    # All slices at once, float16-rounded: bit for bit the training slices (`labelled_slices`,
    # `dataset_slices`; resizing in other batch sizes can differ in the last float bit).
    all_slices = square_slices(stack, size).to(torch.float16).float()
    outputs = []
    with torch.no_grad():
        for start in range(0, depth, batch):
            stop = min(start + batch, depth)
            outputs.append(_as_probabilities(predict_fn(all_slices[start:stop].clone(), bins[start:stop].clone()), stop - start, size, where))
    probs = torch.cat(outputs)  # (Z, C, S, S)
    n_classes = probs.shape[1]
    if n_classes != schema.num_classes:
        raise ValueError(
            f"{where}: predict_fn returned {n_classes} channels, schema {schema.name} {schema.version} has {schema.num_classes} classes"
        )
    del outputs, stack, unit, all_slices

    out_shape = tuple(int(s) for s in reference.shape[:3])
    best = torch.full(out_shape, -torch.inf)
    label = torch.zeros(out_shape, dtype=torch.long)
    full = np.empty((n_classes, *out_shape), dtype=np.float32) if return_probabilities else None
    for c0 in range(0, n_classes, channel_chunk):
        c1 = min(c0 + channel_chunk, n_classes)
        part = probs[:, c0:c1].reshape(depth * (c1 - c0), size, size)
        part = unsquare(part, width, height).reshape(depth, c1 - c0, width, height).permute(1, 2, 3, 0)
        meta_image = MetaTensor(
            part.contiguous(), meta=copy.deepcopy(dict(loaded.meta)), applied_operations=copy.deepcopy(loaded.applied_operations)
        )
        back = chain.inverse({"image": meta_image})["image"]
        back = back.as_tensor() if hasattr(back, "as_tensor") else torch.as_tensor(back)
        if tuple(back.shape[1:]) != out_shape:  # pragma: no cover - MONAI's inverse restores the input shape
            raise RuntimeError(f"{where}: inverse resampling gave shape {tuple(back.shape[1:])}, expected {out_shape}")
        back = back.float()
        for offset in range(c1 - c0):
            better = back[offset] > best
            best = torch.where(better, back[offset], best)
            label[better] = c0 + offset
        if full is not None:
            full[c0:c1] = back.numpy()
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    return VolumePrediction(
        label=label.numpy().astype(dtype),
        affine=np.array(reference.affine, dtype=np.float64, copy=True),
        reference=reference,
        probabilities=full,
    )


# ------------------------------------------------------------------------------ NIfTI out


def output_stem(source: str | os.PathLike) -> str:
    """The name an inference output of `source` takes (``<out>/<name>.nii.gz``): the last part
    of its absolute, normalised path, less ``.nii`` / ``.nii.gz``. Normalising first makes
    ``.`` inside a series folder name that folder (``Path('.').name`` is empty, which wrote the
    hidden file ``<out>/.nii.gz``); links are not followed, so the name is the one given.

    Args:
        source: a NIfTI file or DICOM series folder, as the user gave it.

    Returns:
        The output name, never empty.

    Raises:
        ValueError: nothing is left to name the output after (``/``, a file named ``.nii.gz``).
    """
    name = Path(os.path.normpath(os.path.abspath(source))).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")] if name.endswith(".nii") else name
    if not stem:
        raise ValueError(f"{source}: no name to give its output (rename the file or folder, or give its parent folder)")
    return stem


def write_label_nifti(label: np.ndarray, reference: nib.spatialimages.SpatialImage | str | os.PathLike, path: str | os.PathLike) -> str:
    """Write ``label`` (X, Y, Z) integer on the grid of ``reference`` as a NIfTI-1 label map at
    ``path`` (``.nii.gz`` or ``.nii``), atomically; returns the sha256 of the bytes written.

    uint8 when the values fit, else uint16 (ValueError above 65535, for negative or
    non-integer values, or a shape different from the reference's). The reference's affine
    and its qform/sform (matrices and codes) are copied; every free-text header field
    (descrip, aux_file, intent_name, db_name) is blank and no header extension is written,
    so nothing about the patient rides along. A reference with neither form coded (both
    codes 0) gets its affine written as qform and sform with code 1 (scanner), so every
    reader places the label where nibabel places the reference.
    """
    out = Path(path)
    if not out.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{out}: a NIfTI label map must be named *.nii.gz or *.nii")
    if isinstance(reference, (str, os.PathLike)):
        reference = _load_reference(reference)
    label = np.asarray(label)
    shape = tuple(int(s) for s in reference.shape[:3])
    if label.shape != shape:
        raise ValueError(f"{out}: label shape {label.shape} differs from the reference grid {shape}")
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
            raise ValueError(f"{out}: label values must be integers (got a non-integer float array)")
    elif label.dtype.kind not in "iub":
        raise ValueError(f"{out}: label values must be integers, got dtype {label.dtype}")
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"{out}: label values must be in [0, 65535], got [{lo}, {hi}]")
    dtype = np.uint8 if hi <= 255 else np.uint16
    img = nib.Nifti1Image(label.astype(dtype), np.asarray(reference.affine, dtype=np.float64))
    header = getattr(reference, "header", None)
    qform, qcode = header.get_qform(coded=True) if hasattr(header, "get_qform") else (None, 0)
    sform, scode = header.get_sform(coded=True) if hasattr(header, "get_sform") else (None, 0)
    if qform is None and sform is None:  # a reference without coded forms: the affine, code 1 (scanner)
        qform, qcode, sform, scode = reference.affine, 1, reference.affine, 1
    img.set_qform(qform if qform is not None else reference.affine, code=int(qcode))
    img.set_sform(sform if sform is not None else reference.affine, code=int(scode))
    hdr = img.header
    for key in ("descrip", "aux_file", "intent_name", "db_name"):
        hdr[key] = b""
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(dtype)
    return save_atomic(img, out)


# ------------------------------------------------------------------------------- DICOM


@dataclass
class SeriesGrid:
    """A DICOM series' voxel grid as `preprocessing.dicom.load_series` builds it: ``shape``
    (columns, rows, slices), ``affine`` RAS+, ``sources`` the instance files in slice order."""

    series: object  # preprocessing.dicom.Series
    shape: tuple[int, int, int]
    affine: np.ndarray
    sources: list[Path]
    order: list[int]


def series_grid(source_series: Sequence[str | os.PathLike]) -> SeriesGrid:
    """Read the headers of one DICOM series (a list of single-frame instance files) and
    return its voxel grid; ValueError naming a file for anything that is not one series
    with an exact geometry (see `preprocessing.dicom.series_geometry`)."""
    from preprocessing.dicom import SEG_SOP_CLASS, Series, SeriesError, read_header, series_geometry, slice_headers

    files = [Path(p) for p in source_series]
    if not files:
        raise ValueError("no DICOM files given for the source series")
    headers = []
    for f in files:
        try:
            ds = read_header(f)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types
            raise ValueError(f"{f}: not a readable DICOM file ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
        if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            raise ValueError(f"{f}: a DICOM SEG, not an image of the source series")
        if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{f}: multi-frame images are not supported as SEG sources (one file per slice expected)")
        try:
            headers.extend(slice_headers(f, ds))
        except SeriesError as exc:
            raise ValueError(str(exc)) from None
    uids = {h.series_uid for h in headers}
    if len(uids) != 1:
        raise ValueError(f"{files[0].parent}: the files belong to {len(uids)} series; give the instances of one series")
    series = Series(headers, "series_uid")
    try:
        geometry = series_geometry(series)
    except SeriesError as exc:
        raise ValueError(str(exc)) from None
    first = series.first
    return SeriesGrid(
        series=series,
        shape=(int(first.cols), int(first.rows), len(headers)),
        affine=np.asarray(geometry.affine_ras, dtype=np.float64),
        sources=[headers[o].path for o in geometry.order],
        order=list(geometry.order),
    )


def predict_dicom_series(
    source_series: Sequence[str | os.PathLike],
    schema: LabelSchema,
    settings: SliceSettings,
    predict_fn: PredictFn,
    modality: str | None = None,
    batch: int = 16,
    return_probabilities: bool = False,
) -> VolumePrediction:
    """`predict_volume_2d` on a DICOM series, converted exactly as `site-agent prepare` does
    (`preprocessing.dicom.load_series`: HU after rescale, RAS affine from the headers, no
    interpolation). The prediction is on the series' own grid: ``label[i, j, k]`` is column
    ``i``, row ``j`` of ``sources[k]`` (instances sorted along the slice normal), ready for
    `write_dicom_seg` with the same files. ``modality`` defaults to the series' Modality."""
    from preprocessing.dicom import SeriesError, load_series

    grid = series_grid(source_series)
    try:
        volume = load_series(grid.series)
    except SeriesError as exc:
        raise ValueError(str(exc)) from None
    image = nib.Nifti1Image(volume.array, volume.affine_ras)
    image.set_qform(volume.affine_ras, code=1)
    image.set_sform(volume.affine_ras, code=1)
    pred = predict_volume_2d(image, modality or volume.modality, schema, settings, predict_fn, batch, return_probabilities)
    pred.sources = list(grid.sources)
    return pred


def _label_on_series_grid(label, grid: SeriesGrid, where: str) -> np.ndarray:
    """A label given as an array on the series grid, or as an image (nibabel or
    `VolumePrediction`) of the same grid in any axis order/orientation (e.g. the canonical
    RAS+ NIfTI `site-agent prepare` writes): reoriented exactly (no interpolation)."""
    if isinstance(label, VolumePrediction):
        data, affine = label.label, label.affine
    elif isinstance(label, nib.spatialimages.SpatialImage):
        data, affine = np.asanyarray(label.dataobj), label.affine
    else:
        data, affine = np.asarray(label), None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if affine is not None:
        from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

        transform = ornt_transform(io_orientation(affine), io_orientation(grid.affine))
        shape = data.shape
        data = apply_orientation(data, transform)
        affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(transform, shape)
        if data.shape != grid.shape:
            raise ValueError(f"{where}: label grid {data.shape} (reoriented) does not match the DICOM series grid {grid.shape}")
        corners = np.array([[i, j, k, 1.0] for i in (0, grid.shape[0] - 1) for j in (0, grid.shape[1] - 1) for k in (0, grid.shape[2] - 1)])
        diff = float(np.max(np.linalg.norm((corners @ affine.T - corners @ grid.affine.T)[:, :3], axis=1)))
        if diff > GRID_TOLERANCE_MM:
            raise ValueError(
                f"{where}: the label's grid and the DICOM series' grid differ by up to {diff:.4f} mm "
                f"(tolerance {GRID_TOLERANCE_MM} mm); predict on this series (predict_dicom_series)"
            )
    elif data.shape != grid.shape:
        raise ValueError(
            f"{where}: label shape {data.shape} does not match the DICOM series grid {grid.shape} "
            "(columns, rows, slices sorted along the normal)"
        )
    return np.ascontiguousarray(data)


def write_dicom_seg(
    label,
    source_series: Sequence[str | os.PathLike],
    class_names: Mapping[int, str] | None,
    path: str | os.PathLike,
    schema: LabelSchema,
    *,
    algorithm_name: str = "fedimg 2D segmentation",
    algorithm_version: str = "1",
    series_number: int = 301,
    series_description: str | None = "fedimg segmentation",
) -> Path:
    """Write a label volume as a BINARY DICOM SEG of the series ``source_series`` (its instance
    files, any order), one segment per class of ``class_names`` (label value -> schema class
    name; None: every foreground class of ``schema``). Segments are AUTOMATIC, identified by
    ``algorithm_name``/``algorithm_version``, numbered 1..n in increasing label value;
    classes absent from the label are still described (empty segments).

    ``label``: an array on the series grid (``[column, row, slice]``, slices sorted along
    the normal, as `predict_dicom_series` and `preprocessing.dicom.load_series` give), or a
    nibabel image / `VolumePrediction` of the same grid in any orientation (e.g. on the
    prepared, canonical RAS+ NIfTI of this series), reoriented exactly; a grid that differs
    by more than 0.01 mm is refused. Label values other than 0 and those of
    ``class_names`` are refused (ValueError). Written atomically (`preprocessing.seg`).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = Path(path)
    grid = series_grid(source_series)
    data = _label_on_series_grid(label, grid, str(out))
    if data.dtype.kind not in "iub" and not (data.dtype.kind == "f" and np.all(data == np.round(data))):
        raise ValueError(f"{out}: label values must be integers, got dtype {data.dtype}")
    data = data.astype(np.int64)
    if class_names is None:
        class_names = {v: k for k, v in schema.classes.items() if v != 0}
    names = {int(v): str(n) for v, n in class_names.items() if int(v) != 0}
    unknown = sorted(set(np.unique(data).tolist()) - set(names) - {0})
    if unknown:
        raise ValueError(f"{out}: label values {unknown[:8]} have no class name (class_names has {sorted(names)})")
    values = sorted(names)
    lut = np.zeros(max([0, *values, int(data.max()) if data.size else 0]) + 1, dtype=np.int64)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    local = lut[data]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    from preprocessing.seg import write_seg

    write_seg(
        grid.sources,
        local,
        [names[v] for v in values],
        [names[v] for v in values],
        out,
        schema,
        series_number=series_number,
        manufacturer="FEDIMG",
        manufacturer_model_name="fedimg adaptation",
        software_versions="fedimg",
        series_description=series_description,
        algorithm=algorithm,
    )
    return out


__all__: Sequence[str] = (
    "LabelledSlices",
    "SeriesGrid",
    "VolumePrediction",
    "clear_memory_cache",
    "few_shot_selection",
    "labelled_slices",
    "pad_widths",
    "predict_dicom_series",
    "predict_volume_2d",
    "series_grid",
    "square_labels",
    "unsquare",
    "write_dicom_seg",
    "write_label_nifti",
)
