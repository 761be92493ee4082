"""Write synthetic demo cases as a prepared dataset (for the demo, the testbed and tests)."""

from __future__ import annotations

import os

import numpy as np

from pipelines.synthetic import make_case
from preprocessing.dataset import PreparedDataset, write_dataset

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
    def cases():
        for i in range(n_cases):
            case = make_case(seed * 1000 + i, shape=shape, num_classes=num_classes, intensity_shift=intensity_shift)
            yield case.image, case.label, np.diag([*case.spacing, 1.0])

    labels = {CLASS_NAMES[c]: c for c in range(num_classes)}
    return write_dataset(root, name=name, modality="CT", labels=labels, cases=cases())
