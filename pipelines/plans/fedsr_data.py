"""The FedSR plan's site data: every case of a prepared dataset as a whole volume of one size.

FedSR trains on images only: the cases without labels are the site's training volumes; a
case with labels is an evaluation case, never trained on (its image is never shown to the
networks during training), scored with the personalised model after the last round. A site
without labels trains on everything and reports losses only.

Cases go through the same deterministic chain as every other plan's
(`pipelines.transforms.deterministic_transforms`: RAS, the schema's spacing, the modality's
intensity rule; cached in ``$FEDIMG_CACHE_DIR``), then are padded or cropped, centred, to the
plan's ``volume_size`` — the frame the atlas is prepared in too (`pipelines.fedsr.atlas`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from fedbiomed.common.dataset import CustomDataset
from monai.transforms.croppad.dictionary import ResizeWithPadOrCropd

from pipelines.plans.datasets import checked_dataset
from pipelines.site_errors import site_boundary
from pipelines.transforms import cached_dataset, deterministic_transforms
from preprocessing.dataset import DatasetSchemaError
from preprocessing.schema import LabelSchema

__all__ = ["EvaluationCase", "PreparedVolumeDataset"]

EvaluationCase = tuple[torch.Tensor, torch.Tensor, list[float]]  # image (1, X, Y, Z), label (1, X, Y, Z), spacing mm
# (dataset folder, manifest sha256, chain fingerprint, volume size) -> (training volumes, evaluation cases); one per node process
_VOLUMES: dict[tuple[str, str, str, tuple[int, ...]], tuple[list[torch.Tensor], list[EvaluationCase]]] = {}


def _plain(value: Any) -> torch.Tensor:
    return cast(torch.Tensor, value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(np.asarray(value)))


class PreparedVolumeDataset(CustomDataset):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """A prepared dataset's unlabelled cases as training volumes (labelled ones kept for scoring).

    The plan sets `schema`, `spacing` and `volume_size`; the node sets `path`. Items are
    ``(image (1, X, Y, Z) float32, tensor(0))``: no target, FedSR reads no label to train.
    """

    schema: LabelSchema | None = None
    spacing: str | Sequence[float] | None = "schema"
    volume_size: Sequence[int] = (32, 32, 32)
    path: str  # set by the node

    @site_boundary("data")
    def read(self) -> None:
        """Check the dataset against the federation schema and load its volumes (cached).

        Raises:
            SiteError: code ``dataset`` for a dataset that does not fit (the text stays in the site's log).
        """
        prepared = checked_dataset(self.path, self.schema)
        assert self.schema is not None  # checked_dataset refuses None
        where = f"dataset {prepared.name!r}"
        if prepared.modality not in self.schema.modalities:
            raise DatasetSchemaError(f"{where}: modality {prepared.modality!r} has no rule in schema {self.schema.name}")
        if not prepared.cases:
            raise DatasetSchemaError(f"{where}: no cases")
        chain = deterministic_transforms(self.schema, prepared.modality, spacing=self.spacing, label_dtype=torch.uint8)
        manifest = hashlib.sha256((Path(self.path) / "manifest.json").read_bytes()).hexdigest()
        key = (str(Path(self.path).resolve()), manifest, str(getattr(chain, "fingerprint")), tuple(self.volume_size))
        if key not in _VOLUMES:  # Fed-BioMed asks for the data every round: read and size the cases once per node process
            _VOLUMES.clear()
            _VOLUMES[key] = self._load(prepared, chain)
        self.training, self.evaluation = list(_VOLUMES[key][0]), list(_VOLUMES[key][1])
        if not self.training:  # every case labelled: train on their images (the labels still only score)
            self.training = [image for image, _, _ in self.evaluation]
            self.trains_on_evaluation_images = True
        else:
            self.trains_on_evaluation_images = False
        self.modality = prepared.modality

    def _load(self, prepared: Any, chain: Any) -> tuple[list[torch.Tensor], list[EvaluationCase]]:
        """Every case through the chain (cached on disk in ``$FEDIMG_CACHE_DIR``), padded or cropped to the volume."""
        items = [{"image": str(c.image), **({"label": str(c.label)} if c.label is not None else {})} for c in prepared.cases]
        cache_dir = os.environ.get("FEDIMG_CACHE_DIR")
        source = cast(Iterable[Mapping[str, Any]], cached_dataset(items, chain, cache_dir)) if cache_dir else [chain(item) for item in items]
        resize = ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=list(self.volume_size), mode="constant", allow_missing_keys=True)
        training: list[torch.Tensor] = []
        evaluation: list[EvaluationCase] = []
        spacing = self._spacing()
        for out in source:
            sized = resize(dict(out))  # type: ignore[arg-type]  # MONAI's Mapping[Hashable, ...]
            image = _plain(sized["image"]).float().contiguous()
            if "label" in sized:
                evaluation.append((image, _plain(sized["label"]).to(torch.uint8).contiguous(), spacing))
            else:
                training.append(image)
        return training, evaluation

    def _spacing(self) -> list[float]:
        if self.spacing == "schema" and self.schema is not None:
            return [float(v) for v in self.schema.target_spacing]
        if self.spacing is not None and not isinstance(self.spacing, str):
            return [float(v) for v in self.spacing]
        return [1.0, 1.0, 1.0]  # native grids: distances in voxels

    def get_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training volume.

        Args:
            index: the volume's position.

        Returns:
            ``(image (1, X, Y, Z) float32, tensor(0))``: Fed-BioMed needs a tensor target; it is never read.
        """
        return self.training[index], torch.zeros((), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.training)
