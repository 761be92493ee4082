"""A prepared dataset's labelled cases as 2D (image, label) slice pairs on the factory's slice
geometry, cached on disk; and the few-shot choice of target slices."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimg_core import atomic
from pipelines import transforms as _transforms
from pipelines.adaptation.volumes.geometry import _CHAIN_OPTIONS, _KEYS, square_labels
from pipelines.factory import slices as _slices
from pipelines.factory.slices import SliceSettings, foreground_keep, intensity_to_unit, slice_bins, square_slices
from preprocessing.dataset import DatasetSchemaError, PreparedDataset, check_schema, load_dataset
from preprocessing.schema import LabelSchema, ModalityRule

# Bump when the output of `labelled_slices` changes in a way its arguments do not show (it
# is part of the disk cache key, with `pipelines.factory.slices.SLICES_VERSION`).
VOLUMES_VERSION = 1
_CACHE_SUBDIR = "adaptation-slices"


@dataclass
class LabelledSlices:
    """2D training pairs of a prepared dataset (see `labelled_slices`).

    Per slice (N of them) and per case (the cases kept, in dataset order):

    Args:
        images: ``(N, 1, S, S)`` float32 in [-1, 1].
        labels: ``(N, S, S)`` int64 schema ids (or ``ignore_label``).
        bins: ``(N,)`` slice-position bins.
        case_index: ``(N,)`` index into the per-case lists.
        slice_index: ``(N,)`` position of the slice in its resampled volume (0 = most inferior).
        depth: per case, the slices of the resampled volume, before any ``min_foreground`` filtering.
        case_ids: per case, its id.
        labeled_classes: per case, the schema ids it labels ([] for a case without label).
        has_label: per case, whether it has a label file.
        ignore_label: the schema's label for unknown voxels.
        num_classes: the schema's number of classes.
        settings: the slice settings they were cut with.
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
        """Every schema id some kept case labels, ascending."""
        return sorted({c for cs in self.labeled_classes for c in cs})

    def foreground(self) -> torch.Tensor:
        """Which slices show a foreground class.

        Returns:
            ``(N,)`` bool: the slice shows at least one pixel of a foreground class (not
            background, not the ignore label).
        """
        lab = self.labels
        fg = (lab > 0) & (lab < self.num_classes)
        return fg.flatten(1).any(1)


_MEMORY: dict[str, dict[str, torch.Tensor]] = {}  # the last dataset only


def clear_memory_cache() -> None:
    """Forget the in-process copy of the last `labelled_slices` result."""
    _MEMORY.clear()


def _case_labeled_classes(dataset: PreparedDataset, manifest: dict[str, Any], schema: LabelSchema, where: str) -> list[list[int]]:
    """Schema ids each case labels: the case's ``labeled_classes`` in manifest.json (written by
    `site-agent prepare`), else the dataset's, else every class of dataset.json's labels."""
    by_id = {c.get("case_id"): c for c in manifest.get("cases", []) if isinstance(c, dict)}
    default = dataset.labeled_classes
    if default is None:
        default = sorted(v for v in dataset.labels.values() if v != 0)
    out: list[list[int]] = []
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
    path: str | os.PathLike[str],
    schema: LabelSchema,
    settings: SliceSettings = SliceSettings(),
    cache_dir: str | os.PathLike[str] | None = None,
    only_labelled: bool = True,
) -> LabelledSlices:
    """Axial (image, label) slice pairs of the prepared dataset at ``path``.

    ``images`` are exactly what `pipelines.factory.slices.dataset_slices` gives for the same
    ``settings`` (float16-rounded values, ``min_foreground`` applied the same way), case by
    case; ``labels`` are the schema labels of the same slices (see the module docstring).

    Caching as `dataset_slices`: with ``cache_dir`` the tensors are kept in
    ``<cache_dir>/adaptation-slices/<sha256>.pt`` (atomic write); the key covers
    manifest.json's bytes (with every image's and label's sha256), the settings, the chain's
    fingerprint, the schema (name, version, classes, ignore label), ``only_labelled`` and
    the versions of this module and of the factory slices. The last result is also kept in
    memory.

    Args:
        path: the prepared dataset folder.
        schema: the federation's label schema (the dataset must have been prepared with it).
        settings: the factory's slice settings.
        cache_dir: where to keep the tensors between calls (None: memory only).
        only_labelled: True (default): cases without a label file are skipped; False: every
            case is kept (then ``images`` equal `dataset_slices`'s whole output), a case
            without a label gets ``ignore_label`` everywhere and ``labeled_classes == []``.

    Returns:
        The slice pairs.

    Raises:
        preprocessing.dataset.DatasetError: a broken dataset.
        DatasetSchemaError: it was prepared with another schema, or labels classes the schema lacks.
        ValueError: naming the file, when a label holds values that are neither schema ids nor
            the ignore label, when the schema has no rule for the modality, or (naming the
            dataset) when ``only_labelled`` and no case has a label.
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


def _compute_labelled(
    dataset: PreparedDataset, keep_cases: list[int], schema: LabelSchema, modality: str, rule: ModalityRule, settings: SliceSettings, fingerprint: str
) -> dict[str, torch.Tensor]:
    chain = _transforms.deterministic_transforms(schema, modality, spacing=settings.spacing, keys=_KEYS, **_CHAIN_OPTIONS)
    ran = getattr(chain, "fingerprint", None)  # set on the Compose by deterministic_transforms
    if ran != fingerprint:  # the cache key must describe the chain that ran
        raise RuntimeError(f"transform fingerprint mismatch: {ran} != {fingerprint}")
    size = settings.size
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "labels", "bins", "case_index", "slice_index")}
    depths: list[int] = []
    for j, i in enumerate(keep_cases):
        case = dataset.cases[i]
        item: dict[str, str] = {"image": str(case.image)}
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
    """The few labelled target slices a few-shot experiment may train on.

    Eligible volumes are the labelled cases with at least one *foreground* slice (a pixel of
    a class in 1..num_classes-1; the ignore label does not count). ``n_volumes`` of them
    are used: the first ones in dataset order, or, with ``seed``, a seeded random choice
    (``numpy.random.default_rng(seed)``; the same seed gives the same volumes).

    Per volume, among its foreground slices ordered by position:

    * ``"middle"``: the middle one (index ``m // 2`` of ``m``; the upper middle when ``m`` is
      even), i.e. the slice through the middle of the labelled structures;
    * ``"random"``: one of them at random (seeded by ``seed``, 0 when None);
    * an integer ``k``: ``k`` slices evenly spread, the ``floor((j + 0.5) * m / k)``-th for
      ``j < k`` (``k = 1`` is the middle; every foreground slice when ``k >= m``).

    Deterministic (the same arguments give the same slices).

    Args:
        slices: a target dataset's slices (`labelled_slices`).
        n_volumes: how many labelled volumes to take slices from.
        per_volume: ``"middle"``, ``"random"`` or a positive number of slices per volume.
        seed: None: the first eligible volumes in dataset order; else a seeded random choice.

    Returns:
        Indices into ``slices``, sorted, int64.

    Raises:
        ValueError: a bad argument, or fewer than ``n_volumes`` volumes are eligible.
    """
    if isinstance(n_volumes, bool) or not isinstance(n_volumes, int) or n_volumes < 1:
        raise ValueError(f"n_volumes must be a positive integer, got {n_volumes!r}")
    if per_volume in ("middle", "random"):
        k = 1
    elif isinstance(per_volume, int) and not isinstance(per_volume, bool) and per_volume >= 1:
        k = per_volume
    else:
        raise ValueError(f"per_volume must be 'middle', 'random' or a positive integer, got {per_volume!r}")
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
    slice_rng = np.random.default_rng([0 if seed is None else seed, 1])  # apart from the volumes' draw
    for c in chosen:
        idx = torch.nonzero(fg & (slices.case_index == c)).flatten()
        idx = idx[torch.argsort(slices.slice_index[idx], stable=True)]
        m = len(idx)
        if per_volume == "random":
            picked.append(int(idx[int(slice_rng.integers(m))]))
        elif k >= m:
            picked.extend(idx.tolist())
        else:
            picked.extend(int(idx[int((j + 0.5) * m / k)]) for j in range(k))
    return torch.tensor(sorted(picked), dtype=torch.long)
