"""Fed-BioMed dataset adapter for prepared datasets (the node registers them as 'custom').

Each sample is one whole preprocessed volume (schema-driven MONAI chain of
`pipelines.transforms`): training steps draw their patches from it, validation slides a
window over all of it. The deterministic preprocessing runs once: on disk in
``$FEDIMG_CACHE_DIR`` (the site's work folder, set by the site agent) and in memory for the
life of the node process. Reading failures leave as `pipelines.site_errors.SiteError`
(their text, which names the site's files, stays in the site's log).

Test-only reference labels (classes the site does not train on, ``labelsRef/``) are read
on demand through the same chain (`PreparedSegmentationDataset.reference_label`), for
scoring test cases only; items never carry them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from fedbiomed.common.dataset import CustomDataset

from pipelines.factory.slices import SliceSettings, dataset_slices
from pipelines.site_errors import site_boundary
from pipelines.transforms import cached_dataset, deterministic_transforms
from preprocessing.dataset import DatasetSchemaError, check_schema, load_dataset
from preprocessing.schema import LabelSchema

__all__ = ["PreparedSegmentationDataset", "PreparedSliceDataset", "checked_dataset"]

_Volumes = list[tuple[torch.Tensor, torch.Tensor]]  # (image, label) per case
_CACHE: dict[tuple[str, str, str], _Volumes] = {}
_REFERENCE_CACHE: dict[tuple[str, str, str, int], torch.Tensor] = {}  # (dataset key, item index) -> reference label
_CACHE_MAX_BYTES = 6 * 1024**3
_Spacing = str | Sequence[float] | None  # "schema", None (native grid) or mm per axis


def _chain_and_key(path: str, schema: LabelSchema, modality: str, spacing: _Spacing) -> tuple[Any, tuple[str, str, str]]:
    """The deterministic chain of a dataset's cases and its in-memory cache key (folder, manifest, chain)."""
    chain = deterministic_transforms(schema, modality, spacing=spacing, label_dtype=torch.uint8)
    manifest = Path(path) / "manifest.json"
    fingerprint: str = getattr(chain, "fingerprint")  # set by deterministic_transforms, on a plain Compose
    return chain, (str(Path(path).resolve()), hashlib.sha256(manifest.read_bytes()).hexdigest(), fingerprint)


def _plain(value: Any) -> torch.Tensor:
    return cast(torch.Tensor, value.as_tensor() if hasattr(value, "as_tensor") else value)


def _volumes(path: str, schema: LabelSchema, modality: str, spacing: _Spacing) -> _Volumes:
    prepared = load_dataset(path)
    chain, key = _chain_and_key(path, schema, modality, spacing)
    if key in _CACHE:
        return _CACHE[key]
    items = [{"image": str(c.image), "label": str(c.label)} for c in prepared.cases if c.label is not None]
    cache_dir = os.environ.get("FEDIMG_CACHE_DIR")
    # a PersistentDataset iterates through __getitem__, which its type does not say
    source = cast(Iterable[Mapping[str, Any]], cached_dataset(items, chain, cache_dir)) if cache_dir else [chain(item) for item in items]
    volumes: _Volumes = []
    for out in source:
        image, label = _plain(out["image"]), _plain(out["label"])
        volumes.append((image.float().contiguous(), label.to(torch.uint8).contiguous()))
    if sum(i.numel() * 4 + l.numel() for i, l in volumes) <= _CACHE_MAX_BYTES:
        _CACHE.clear()  # one dataset per node process in practice; never grow without bound
        _CACHE[key] = volumes
    return volumes


def checked_dataset(path: str, schema: LabelSchema | None) -> Any:
    """A site's prepared dataset, checked against the federation schema the plan set.

    Args:
        path: the dataset folder (the node's registry entry).
        schema: the federation schema (None: the plan set none, refused).

    Returns:
        The loaded `preprocessing.dataset.PreparedDataset`.

    Raises:
        DatasetSchemaError: no schema, or a dataset built with another schema.
    """
    if schema is None:
        raise DatasetSchemaError("the training plan did not set the federation schema")
    prepared = load_dataset(path)
    check_schema(json.loads((Path(path) / "manifest.json").read_text()), schema, f"dataset {prepared.name!r}")
    return prepared


class PreparedSegmentationDataset(CustomDataset):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Labelled cases of a prepared dataset as whole preprocessed volumes.

    The plan sets `schema` (the federation's) and `spacing` before the node loads it;
    `self.path` is set by the node from its dataset registry (the plan never sees it).
    After loading, `labeled_classes` holds the schema ids this site labels and `case_ids`
    the id of each item (the labelled cases in manifest order), which the case split
    (`pipelines.plans.split_data`) reads; they never leave the site. `reference_classes`
    holds the schema ids of the site's test-only reference labels ([] when none), which
    `reference_label` reads per item for scoring test cases; `get_item` never returns them,
    so training and validation never see them.
    """

    schema: LabelSchema | None = None
    spacing: _Spacing = "schema"
    labeled_classes: list[int] = []
    reference_classes: list[int] = []
    case_ids: list[str] = []
    modality: str = "CT"
    path: str  # set by the node

    @site_boundary("data")
    def read(self) -> None:
        """Check the dataset against the federation schema and load its labelled cases (cached).

        Raises:
            SiteError: code ``dataset`` for a dataset that does not fit (the text stays in the site's log).
        """
        prepared = checked_dataset(self.path, self.schema)
        assert self.schema is not None  # checked_dataset refuses None
        where = f"dataset {prepared.name!r}"
        labeled = prepared.labeled_classes
        if labeled is None:
            labeled = sorted(v for v in prepared.labels.values() if v != 0)
        bad = [c for c in labeled if not 0 < c < self.schema.num_classes]
        if bad:
            raise DatasetSchemaError(f"{where}: labels {bad} are not classes of schema {self.schema.name}")
        self.labeled_classes = sorted(int(c) for c in labeled)
        if prepared.modality not in self.schema.modalities:
            raise DatasetSchemaError(
                f"{where}: modality {prepared.modality!r} has no rule in schema {self.schema.name} (modalities: {', '.join(self.schema.modalities)})"
            )
        self.modality = prepared.modality
        self._items = _volumes(self.path, self.schema, self.modality, self.spacing)
        # the same cases, in the same order, as _volumes reads them
        self.case_ids = [c.case_id for c in prepared.cases if c.label is not None]
        if len(self.case_ids) != len(self._items):  # a cache entry of another manifest: never split by the wrong ids
            raise DatasetSchemaError(f"{where}: {len(self._items)} volumes for {len(self.case_ids)} labelled cases")
        reference = sorted(int(c) for c in prepared.reference_classes or [])
        bad = [c for c in reference if not 0 < c < self.schema.num_classes]
        if bad:
            raise DatasetSchemaError(f"{where}: reference labels {bad} are not classes of schema {self.schema.name}")
        self.reference_classes = reference
        # the image is read with each reference label so both go through the very chain of the items
        self._reference_items = [
            {"image": str(c.image), "label": str(c.reference_label)} if c.reference_label is not None else None for c in prepared.cases if c.label is not None
        ]
        self._reference_chain: tuple[Any, tuple[str, str, str]] | None = None  # (chain, cache key), on first use
        self._images = [str(c.image) for c in prepared.cases if c.label is not None]

    def voxel_spacing(self, index: int) -> list[float]:
        """Item `index`'s voxel size in mm per axis, as scored: the dataset's spacing when it resamples, else the
        case's own (prepared images are RAS+, so their header's zooms are in the items' axis order).

        Args:
            index: the item.

        Returns:
            Three spacings in mm.
        """
        if self.spacing == "schema" and self.schema is not None:
            return [float(v) for v in self.schema.target_spacing]
        if self.spacing is not None and not isinstance(self.spacing, str):
            return [float(v) for v in self.spacing]
        import nibabel as nib  # header only

        return [float(v) for v in nib.load(self._images[index]).header.get_zooms()[:3]]  # type: ignore[attr-defined]  # a NIfTI header

    @site_boundary("data")
    def reference_label(self, index: int) -> torch.Tensor | None:
        """The test-only reference label of one case, on the grid of `get_item`'s label.

        Read through the same deterministic chain as the items (schema spacing, nearest
        neighbour), then kept in memory for the life of the node process (and on disk in
        ``$FEDIMG_CACHE_DIR`` when set, like the volumes). For scoring test cases only.

        Args:
            index: the case's position (as in `get_item`).

        Returns:
            The reference label in schema ids, ``(1, X, Y, Z)`` uint8, or None when the case has none.

        Raises:
            SiteError: code ``dataset`` when the file cannot be read or lands on another grid than the case's label.
        """
        item = self._reference_items[index]
        if item is None:
            return None
        assert self.schema is not None  # read() checked it
        if self._reference_chain is None:  # built once per dataset object, not per case (it hashes the manifest)
            self._reference_chain = _chain_and_key(self.path, self.schema, self.modality, self.spacing)
        chain, key = self._reference_chain
        cached = _REFERENCE_CACHE.get((*key, index))
        if cached is not None:
            return cached
        cache_dir = os.environ.get("FEDIMG_CACHE_DIR")
        out = cached_dataset([item], chain, cache_dir)[0] if cache_dir else chain(item)
        reference = _plain(out["label"]).to(torch.uint8).contiguous()
        expected = self._items[index][1].shape
        if reference.shape != expected:
            raise DatasetSchemaError(f"case {self.case_ids[index]}: reference label grid {tuple(reference.shape)} differs from its label's {tuple(expected)}")
        if any(k[:3] != key for k in _REFERENCE_CACHE):
            _REFERENCE_CACHE.clear()  # another dataset (or manifest): one per node process in practice
        _REFERENCE_CACHE[(*key, index)] = reference
        return reference

    def get_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One case.

        Args:
            index: the case's position.

        Returns:
            ``(image (C, X, Y, Z) float32, label (1, X, Y, Z) uint8)``.
        """
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)


class PreparedSliceDataset(CustomDataset):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Every case of a prepared dataset (labels not needed) as 2D axial slices in [-1, 1]
    with their slice-position bins (`pipelines.factory.slices`), for the data factory.

    The plan sets `schema`, `size`, `n_bins`, `spacing` and `min_foreground`; items are
    (image (1, size, size), bin)."""

    schema: LabelSchema | None = None
    size: int = 64
    n_bins: int = 29
    spacing: str | tuple[float, float, float] | None = "schema"  # as `SliceSettings` takes it
    min_foreground: float = 0.0
    path: str  # set by the node

    @site_boundary("data")
    def read(self) -> None:
        """Check the dataset against the federation schema and load its slices (cached).

        Raises:
            SiteError: code ``dataset`` for a dataset that does not fit or has no slice left.
        """
        prepared = checked_dataset(self.path, self.schema)
        assert self.schema is not None  # checked_dataset refuses None
        settings = SliceSettings(size=self.size, n_bins=self.n_bins, spacing=self.spacing, min_foreground=self.min_foreground)
        images, self.bins = dataset_slices(self.path, self.schema, settings, os.environ.get("FEDIMG_CACHE_DIR"))
        self.images = images.half()  # half the memory; items are float32
        if len(self.images) == 0:
            raise DatasetSchemaError(f"dataset {prepared.name!r}: no slices left (min_foreground {self.min_foreground})")
        digest = hashlib.sha256((Path(self.path) / "manifest.json").read_bytes())
        digest.update(repr((settings, self.schema.name, self.schema.version, self.schema.modalities, self.schema.target_spacing)).encode())
        self.fingerprint = digest.hexdigest()

    def get_item(self, index: int) -> tuple[torch.Tensor, Any]:
        """One slice.

        Args:
            index: the slice's position.

        Returns:
            ``(image (1, size, size) float32, slice-position bin)``.
        """
        return self.images[index].float(), self.bins[index]

    def __len__(self) -> int:
        return len(self.images)
