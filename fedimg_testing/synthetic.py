"""Synthetic volumes for demos and tests: blobs ("organs") of known class in noise, and
`write_synthetic_dataset`, which writes them as a prepared dataset.

Nothing here imports an FL engine. The generator is deterministic for a given seed so a
site's demo data and a test's expectations can be reproduced exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from preprocessing.dataset import PreparedDataset, write_dataset


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic CT-like case: image, label and voxel spacing."""

    image: np.ndarray  # float32, (X, Y, Z), CT-like Hounsfield units
    label: np.ndarray  # uint8, (X, Y, Z), 0 = background, 1..num_classes-1 = structures
    spacing: tuple[float, float, float]


# Mean intensity (HU-like) of each foreground class; background is soft tissue around 0.
_CLASS_MEANS = (0.0, 60.0, 150.0, 220.0, 100.0, 30.0, 250.0, 180.0)


def make_case(
    seed: int,
    shape: tuple[int, int, int] = (32, 32, 32),
    num_classes: int = 3,
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    noise_std: float = 20.0,
    intensity_shift: float = 0.0,
) -> SyntheticCase:
    """One synthetic case: an ellipsoid per foreground class at a random place and size.

    `intensity_shift` moves every intensity, which lets tests and demos give sites
    slightly different "scanners".
    """
    if num_classes < 2 or num_classes > len(_CLASS_MEANS):
        raise ValueError(f"num_classes must be in [2, {len(_CLASS_MEANS)}], got {num_classes}")
    if any(s < 8 for s in shape):
        raise ValueError(f"every dimension of shape must be >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    for cls in range(1, num_classes):
        radii = rng.uniform(0.12, 0.22, size=3) * np.asarray(shape)
        centre = rng.uniform(0.3, 0.7, size=3) * np.asarray(shape)
        dist = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
        label[dist <= 1.0] = cls  # later classes overwrite earlier ones where they overlap
    image = np.full(shape, -20.0, dtype=np.float32)
    for cls in range(1, num_classes):
        image[label == cls] = _CLASS_MEANS[cls]
    image += rng.normal(0.0, noise_std, size=shape).astype(np.float32) + intensity_shift
    return SyntheticCase(image=image.astype(np.float32), label=label, spacing=spacing)


CLASS_NAMES = ("background", "organ_a", "organ_b", "organ_c", "organ_d", "organ_e", "organ_f", "organ_g")


def write_synthetic_dataset(
    root: str | os.PathLike,
    seed: int,
    n_cases: int = 4,
    shape: tuple[int, int, int] = (32, 32, 32),
    num_classes: int = 3,
    intensity_shift: float = 0.0,
    name: str = "synthetic",
) -> PreparedDataset:
    """Write a prepared dataset of synthetic cases (`make_case`) to ``root``.

    Args:
        root: the dataset folder to create.
        seed: seeds every case (case ``i`` uses ``seed * 1000 + i``).
        n_cases: how many cases.
        shape: the volume shape.
        num_classes: classes including background (at most len(CLASS_NAMES)).
        intensity_shift: added to every image (a scanner-like domain shift).
        name: the dataset's name.

    Returns:
        The dataset as loaded back.
    """

    def cases():
        for i in range(n_cases):
            case = make_case(seed * 1000 + i, shape=shape, num_classes=num_classes, intensity_shift=intensity_shift)
            yield case.image, case.label, np.diag([*case.spacing, 1.0])

    labels = {CLASS_NAMES[c]: c for c in range(num_classes)}
    return write_dataset(root, name=name, modality="CT", labels=labels, cases=cases())
