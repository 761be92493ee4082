"""Training patches and augmentation for segmentation (MONAI, no FL imports).

Balanced foreground/background patches, an nnU-Net-style random augmentation set and optional GIN, each
with its own random stream. The set and its rules: docs/design/augmentation.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import RandCropByPosNegLabeld, SpatialPadd
from monai.transforms.intensity.dictionary import (
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.transforms.spatial.dictionary import RandFlipd, RandZoomd

from pipelines.gin import GINAugmentation
from pipelines.plan_args import SegmentationSettings

IGNORE_LABEL = 255


def _augmentations(spatial_dims: int, mirror_axes: Sequence[int]) -> Compose:
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
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in mirror_axes],
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

    Args:
        roi_size: the patch size, ``spatial_dims`` positive integers.
        num_samples: patches per volume (half centred on foreground, half on background).
        spatial_dims: 3, or 2 for axial slices of the volume.
        augment: apply the random augmentation set.
        ignore_label: the label value that never counts as foreground.
        gin: GIN's keyword arguments, or None.
        mirror_axes: the axes the augmentation may flip (p 0.5 each), in the volume's RAS+ order
            (0: left-right, 1: posterior-anterior, 2: inferior-superior); None: every axis
            (nnU-Net's default). Leave out an axis across which the classes differ, such as 0
            when the anatomy is lateral (liver right, spleen left): a flipped patch teaches that
            side does not matter.

    Raises:
        ValueError: a bad ``spatial_dims``, ``roi_size``, ``num_samples`` or ``mirror_axes``.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        num_samples: int = 2,
        spatial_dims: int = 3,
        augment: bool = True,
        ignore_label: int = IGNORE_LABEL,
        gin: Mapping[str, Any] | None = None,
        mirror_axes: Sequence[int] | None = None,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(roi_size) != spatial_dims or not all(isinstance(v, int) and v >= 1 for v in roi_size):
            raise ValueError(f"roi_size must be {spatial_dims} positive integers, got {roi_size!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        axes = tuple(range(spatial_dims)) if mirror_axes is None else tuple(mirror_axes)
        if not all(isinstance(a, int) and 0 <= a < spatial_dims for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"mirror_axes must be distinct axes in 0..{spatial_dims - 1}, got {mirror_axes!r}")
        self.mirror_axes = axes
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
        self._augment = _augmentations(spatial_dims, axes) if augment else None
        self._gin = GINAugmentation(**gin) if gin is not None else None

    def _reseed(self) -> None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._crop.set_random_state(seed)
        if self._augment is not None:
            self._augment.set_random_state(seed + 1)
        if self._gin is not None:
            self._gin.set_random_state(seed + 2)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of one volume, augmented.

        Args:
            image: (C, X, Y, Z).
            label: (1, X, Y, Z), on the image's grid.

        Returns:
            ``(images (num_samples, C, *roi), labels (num_samples, 1, *roi))``, labels int64.

        Raises:
            ValueError: shapes that do not fit.
        """
        if image.dim() != 4 or label.dim() != 4 or label.shape[0] != 1 or image.shape[1:] != label.shape[1:]:
            raise ValueError(f"expected image (C, X, Y, Z) and label (1, X, Y, Z) on one grid, got {tuple(image.shape)} and {tuple(label.shape)}")
        self._reseed()
        label = label.long()
        fg = ((label > 0) & (label != self.ignore_label)).to(torch.uint8)
        lo = float(image.min())
        data: dict[Hashable, torch.Tensor] = {"image": image.float() - lo, "label": label, "fg": fg}  # pad value 0 == the image minimum
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


def sampler_for(settings: SegmentationSettings) -> PatchSampler:
    """The training patch sampler the segmentation plans' settings describe (patch size and count, augmentation,
    mirror axes, GIN, the schema's ignore label): one construction for the plans and the benchmarks that stand in for them.

    Args:
        settings: the validated plan settings (`pipelines.plan_args.parse_plan_args`).

    Returns:
        The sampler.
    """
    return PatchSampler(settings.roi_size, settings.patches_per_volume, settings.spatial_dims, augment=settings.augment,
                        ignore_label=settings.schema.ignore_label, gin=settings.gin, mirror_axes=settings.mirror_axes)  # fmt: skip


def patch_batch(sampler: PatchSampler, volumes: Iterable[torch.Tensor], labels: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of one step: ``sampler``'s patches of each (volume, label), concatenated.

    Args:
        sampler: draws the patches of one volume.
        volumes: the loader's batch of whole volumes, each (C, X, Y, Z).
        labels: their label maps, each (1, X, Y, Z).

    Returns:
        ``(images, labels)``: (B * num_samples, C, *roi) and (B * num_samples, 1, *roi), labels int64.
    """
    images, targets = [], []
    for volume, label in zip(volumes, labels):
        i, t = sampler(volume, label)
        images.append(i)
        targets.append(t)
    return torch.cat(images), torch.cat(targets)
