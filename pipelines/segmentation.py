"""Data and metrics for supervised segmentation on prepared datasets (MONAI, no FL)."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabel, SpatialPad

from pipelines.transforms import default_schema, deterministic_transforms


def segmentation_transforms() -> Compose:
    """Deterministic preprocessing: load -> channel first -> RAS -> CT normalisation -> integer label.

    The default schema's CT rule (the ConDistFL paper's clip to [-54, 258] HU, then
    (x - 100) / 50) on each case's native voxel grid (no resampling); see
    `pipelines.transforms.deterministic_transforms` for the schema-driven chain with resampling.
    Random patches and flips are applied per sample/batch at training time
    (`random_patch`, `random_flip_batch`), so preprocessed cases can be cached.
    """
    return deterministic_transforms(default_schema(), "CT", spacing=None, label_dtype=torch.long)


def dice_per_class(logits: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean Dice per foreground class over the batch (classes 1..C-1).

    Empty-mask rule (MONAI's ignore_empty=True): a class absent from the reference of a
    case is left out of that case's average; NaN if it is absent from every case.
    """
    pred = one_hot(torch.argmax(logits, dim=1, keepdim=True), num_classes=num_classes)
    ref = one_hot(label if label.dim() == logits.dim() else label.unsqueeze(1), num_classes=num_classes)
    per_case = compute_dice(y_pred=pred, y=ref, include_background=False, ignore_empty=True)  # (B, C-1), NaN = absent
    return torch.nanmean(per_case, dim=0)  # MONAI's own reductions turn all-NaN into 0; keep NaN


def preprocess_case(image_path: str, label_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic preprocessing of one prepared case: (1, X, Y, Z) float image, long label."""
    out = segmentation_transforms()({"image": image_path, "label": label_path})
    return out["image"].as_tensor().float(), out["label"].as_tensor().long()


def random_flip_batch(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None):
    """Flip image and label together along each spatial axis with probability 0.5.

    Applied per batch inside the training step, so cached cases stay deterministic and
    evaluation never sees augmented data.
    """
    dims = [d for d in range(2, image.dim()) if torch.rand((), generator=generator) < 0.5]
    if dims:
        image, label = torch.flip(image, dims), torch.flip(label, dims)
    return image, label


def random_patch(image: torch.Tensor, label: torch.Tensor, roi_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed-size patch, centred on foreground or background with equal odds.

    Cases of a real dataset differ in shape; fixed-size patches let them share a batch.
    Volumes smaller than `roi_size` are padded first.
    """
    pad = SpatialPad(spatial_size=list(roi_size))
    image, label = pad(image), pad(label)
    crop = RandCropByPosNegLabel(spatial_size=list(roi_size), pos=1, neg=1, num_samples=1)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # follows torch's seed (the plan's random_seed)
    crop.set_random_state(seed)
    img = crop(image, label=label)[0]
    crop.set_random_state(seed)
    lab = crop(label, label=label)[0]
    return torch.as_tensor(img).float(), torch.as_tensor(lab).long()
