"""Training patches and augmentation for segmentation (MONAI, no FL imports).

Balanced foreground/background patches, an nnU-Net-style random augmentation set and optional GIN, each
with its own random stream. The set and its rules: docs/design/augmentation.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)

from pipelines.gin import GINAugmentation

IGNORE_LABEL = 255


def _augmentations(spatial_dims: int) -> Compose:
    keys = ["image", "label"]
    steps = [
        RandZoomd(
            keys=keys,
            prob=0.2,
            min_zoom=0.9,
            max_zoom=1.1,
            mode=("trilinear" if spatial_dims == 3 else "bilinear", "nearest"),
            keep_size=True,
            padding_mode="constant",
        ),  # fmt: skip
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)],
        RandGaussianNoised(keys="image", prob=0.15, mean=0.0, std=0.1),
        RandGaussianSmoothd(keys="image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.1),
        RandShiftIntensityd(keys="image", prob=0.15, offsets=0.1),
        RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.7, 1.5)),
    ]
    return Compose(steps)


class PatchSampler:
    """``(image (C, X, Y, Z), label (1, X, Y, Z)) -> (images (B, C, *roi), labels (B, 1, *roi))``.

    ``roi_size`` has ``spatial_dims`` entries. Volumes smaller than the patch are padded
    (image with its minimum, label with background). Labels come back as int64.
    ``gin``: keyword arguments for `GINAugmentation` (image only, after the augmentations);
    ``None`` leaves it off.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        num_samples: int = 2,
        spatial_dims: int = 3,
        augment: bool = True,
        ignore_label: int = IGNORE_LABEL,
        gin: Mapping[str, Any] | None = None,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(roi_size) != spatial_dims or not all(isinstance(v, int) and v >= 1 for v in roi_size):
            raise ValueError(f"roi_size must be {spatial_dims} positive integers, got {roi_size!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.spatial_dims = spatial_dims
        self.roi_size = tuple(roi_size)
        self.num_samples = num_samples
        self.ignore_label = int(ignore_label)
        crop_roi = list(roi_size) + ([1] if spatial_dims == 2 else [])
        self._pad = SpatialPadd(keys=["image", "label", "fg"], spatial_size=crop_roi, mode="constant")
        self._crop = RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="fg", spatial_size=crop_roi, pos=1, neg=1, num_samples=num_samples,
            allow_smaller=False,
        )  # fmt: skip
        self._augment = _augmentations(spatial_dims) if augment else None
        self._gin = GINAugmentation(**gin) if gin is not None else None

    def _reseed(self) -> None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._crop.set_random_state(seed)
        if self._augment is not None:
            self._augment.set_random_state(seed + 1)
        if self._gin is not None:
            self._gin.set_random_state(seed + 2)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or label.dim() != 4 or label.shape[0] != 1 or image.shape[1:] != label.shape[1:]:
            raise ValueError(f"expected image (C, X, Y, Z) and label (1, X, Y, Z) on one grid, got {tuple(image.shape)} and {tuple(label.shape)}")
        self._reseed()
        label = label.long()
        fg = ((label > 0) & (label != self.ignore_label)).to(torch.uint8)
        lo = float(image.min())
        data = {"image": image.float() - lo, "label": label, "fg": fg}  # pad value 0 == the image minimum
        data = self._pad(data)
        patches = self._crop(data)
        images, labels = [], []
        for p in patches:
            img, lab = torch.as_tensor(p["image"]) + lo, torch.as_tensor(p["label"])
            if self.spatial_dims == 2:
                img, lab = img[..., 0], lab[..., 0]
            if self._augment is not None:
                out = self._augment({"image": img, "label": lab.float()})
                img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
            if self._gin is not None:
                img = self._gin(img.float())
            images.append(img.float())
            labels.append(lab.round().long())
        return torch.stack(images), torch.stack(labels)


def patch_batch(sampler: PatchSampler, volumes, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of one step: ``sampler``'s patches of each (volume, label), concatenated."""
    images, targets = [], []
    for volume, label in zip(volumes, labels):
        i, t = sampler(volume, label)
        images.append(i)
        targets.append(t)
    return torch.cat(images), torch.cat(targets)
