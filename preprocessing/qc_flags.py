"""The QC flags `site-agent prepare` records per case (``qc_flags`` in manifest.json).

Flags describe what a reviewer should look at (an empty label, few slices, strong anisotropy,
CT values that are not Hounsfield units, an "image" that looks like a label map); the flags of
`SUSPECT_IMAGE_FLAGS` make ``site-agent dataset add`` refuse the dataset unless told otherwise.
"""

from __future__ import annotations

import numpy as np

from preprocessing.schema import LabelSchema

__all__ = ["LABEL_LIKE_MAX_VALUES", "SUSPECT_IMAGE_FLAGS", "case_flags", "looks_like_label"]


def case_flags(
    image_data: np.ndarray, label_data: np.ndarray | None, spacing: list[float], modality: str, schema: LabelSchema, labeled: list[int],
    planar: bool = False, value_range: tuple[float, float] | None = None,
) -> tuple[list[str], dict[str, int]]:  # fmt: skip
    """The QC flags of one converted case, and its label's voxel count per class.

    Args:
        image_data: the image volume.
        label_data: the label volume in schema ids (None: unlabelled).
        spacing: voxel spacing in mm.
        modality: the dataset's modality.
        schema: the federation's label schema.
        labeled: the class ids the site labels.
        planar: a 2D image (a radiograph) with a singleton third axis: its two in-plane axes are checked.
        value_range: the image's (min, max) when the caller has it (None: computed here).

    Returns:
        (flags, class name -> voxel count; ``ignore`` for ignore-label voxels).
    """
    flags = []
    voxels: dict[str, int] = {}
    if label_data is None:
        flags.append("unlabeled")
    else:
        counts = np.bincount(label_data.ravel(), minlength=256)
        names = {v: k for k, v in schema.classes.items()}
        voxels = {names[i]: int(counts[i]) for i in range(1, schema.num_classes) if counts[i] > 0}
        if counts[schema.ignore_label]:
            voxels["ignore"] = int(counts[schema.ignore_label])
            flags.append("ignore_voxels")
        # a class whose empty mask is a full label (``empty_mask_dice: one``) is never missing, nor makes a label empty
        expected = [c for c in labeled if c not in schema.empty_mask_one]
        if not any(counts[i] for i in range(1, schema.num_classes)):
            if expected or not labeled:
                flags.append("label_empty")
        else:
            lesions = {l for ls in schema.groups.values() for l in ls}
            flags += [f"missing_{names[c]}" for c in expected if counts[c] == 0 and names[c] not in lesions]
    axes = 2 if planar else 3  # a radiograph's third axis is its singleton, not a slice count
    if min(image_data.shape[:axes]) < 16:
        flags.append("small_image" if planar else "few_slices")
    if max(spacing[:axes]) / min(spacing[:axes]) > 4:
        flags.append("anisotropic")
    if modality == "CT":
        lo, hi = value_range if value_range is not None else (float(image_data.min()), float(image_data.max()))
        if hi < 100 or lo > -500:
            flags.append("ct_values_not_hu")
    if looks_like_label(image_data):
        flags.append("looks_like_label")
    return flags, voxels


# QC flags saying a case's "image" is probably not an image: `site-agent dataset add`
# refuses datasets with such cases unless told otherwise.
SUSPECT_IMAGE_FLAGS = ("looks_like_label", "ct_values_not_hu")


LABEL_LIKE_MAX_VALUES = 32


def looks_like_label(data: np.ndarray, max_values: int = LABEL_LIKE_MAX_VALUES) -> bool:
    """Whether a volume looks like a label map (or a blank): a few non-negative integer values.

    A scan has hundreds of distinct intensities (noise alone gives that); a label map has
    one per class. Checked on at most ~1M voxels spread over the volume.

    Args:
        data: the volume.
        max_values: at most this many distinct values counts as label-like.

    Returns:
        True when the volume has at most `max_values` distinct values, all non-negative
        integers.
    """
    step = max(1, round((data.size / 1e6) ** (1 / 3)))
    sample = np.asarray(data[::step, ::step, ::step])
    values = np.unique(sample)
    if values.size > max_values or (values.size and values[0] < 0):
        return False
    return bool(np.all(values == np.round(values)))
