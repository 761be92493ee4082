"""FedSR evaluation metrics: segmentation and registration quality per structure and case, and their summary.

The FedSR paper (shared/notes/fedsr-method.md, "Data and evaluation") scores the segmentation
of brain structures with Dice, Jaccard, HD95, ASD and AVD, and the registration of the atlas
with the Dice of the warped atlas labels and the NCC between the warped atlas image and the
target image. This module computes them for one case (`segmentation_case_metrics`,
`registration_case_metrics`) and summarises cases (`summarise`). No FL imports.

Segmentation, per structure (`SEGMENTATION_METRICS`), built on `pipelines.metrics.case_metrics`
(Dice from `pipelines.evaluation.dice_per_class`, HD95 and ASSD from MONAI's
``compute_hausdorff_distance`` with ``percentile=95`` and ``compute_average_surface_distance``
with ``symmetric=True``, both in mm with the grid's spacing):

* ``dice``: 2|P∩R| / (|P| + |R|), a fraction in [0, 1] (the paper's tables print percent).
* ``jaccard``: |P∩R| / |P∪R|, derived from Dice by the identity J = D / (2 - D), which holds
  exactly for binary masks, so both obey one empty-mask rule.
* ``hd95_mm``: 95th-percentile symmetric Hausdorff distance in mm.
* ``asd_mm``: average symmetric surface distance in mm (the paper's ASD; ``assd`` in
  `pipelines.metrics`).
* ``avd_ml``: absolute volume difference |V_pred - V_ref| in ml.
* ``avd_percent``: absolute volume difference relative to the reference volume, in percent,
  100 |V_pred - V_ref| / V_ref (the MRBrainS convention). The paper's tables report only Dice,
  HD95 and NCC; its text defines AVD as an absolute volume difference "averaged over all
  voxels", i.e. normalised. A paper-like table should use ``avd_percent``: unlike ml, it
  compares structures of different sizes (white matter is a hundred times the pallidum), so
  its mean over structures is not the white matter's alone.

Registration (`registration_case_metrics`):

* per structure ``dice`` of the warped atlas label against the target's reference label (the
  same `dice_per_class` as the segmentation, so the same maps give the same Dice), and
  ``dice_mean``, its NaN-excluded mean over structures (the paper's R-Dice);
* ``ncc``: global normalised cross-correlation (Pearson's r over all voxels) of the warped
  atlas image and the target image, in [-1, 1];
* ``ncc_foreground``: the same over the voxels any scored structure covers in either label map
  (the brain, where the labels are a brain parcellation);
* ``local_ncc``: MONAI's ``LocalNormalizedCrossCorrelationLoss`` negated, the mean over all
  cubic windows (``kernel_size`` voxels a side, 9 by default as in the training loss) of the
  *squared* local correlation, in [0, 1]: an image and its negative score 1, and windows where
  either image is flat score 0. The paper's NCC (about 0.38 after registration, where a global
  NCC of aligned brain MRIs is near 0.9) is most likely this local kind, as in VoxelMorph and
  the JRS methods it compares with; ``local_ncc`` is the number to set against it.

Empty-mask and NaN rules (those of `pipelines.metrics`, one rule per situation):

===========================  ==========  =====================  ======================
metric                       both empty  only reference empty   only prediction empty
===========================  ==========  =====================  ======================
dice, jaccard                NaN         0                      0
hd95_mm, asd_mm              NaN         NaN                    NaN
avd_ml                       NaN         V_pred                 V_ref
avd_percent                  NaN         NaN                    100
===========================  ==========  =====================  ======================

A structure absent from both maps has nothing to score: every metric is NaN and left out of
means. Distances to an empty mask do not exist: NaN, not a worst-case constant (see
`pipelines.metrics`); the miss still counts in Dice, Jaccard and AVD, and each mean comes with
its count ``n``. A global NCC of a constant image (zero variance) is NaN. Voxels whose reference
is the ignore label (255) are background in both maps. Results are Python floats; NaN is valid
for `json.dumps` but not strict JSON: `pipelines.metrics.nan_to_none` turns it into null, and
`summarise` reads None as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
import torch
from monai.losses.image_dissimilarity import LocalNormalizedCrossCorrelationLoss

from pipelines.evaluation import IGNORE_LABEL, dice_per_class
from pipelines.metrics import case_metrics

__all__ = [
    "REGISTRATION_IMAGE_METRICS",
    "SEGMENTATION_METRICS",
    "MetricStats",
    "Summary",
    "global_ncc",
    "local_ncc",
    "registration_case_metrics",
    "segmentation_case_metrics",
    "summarise",
]

SEGMENTATION_METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "avd_ml", "avd_percent")
REGISTRATION_IMAGE_METRICS = ("dice_mean", "ncc", "ncc_foreground", "local_ncc")
_NAN = float("nan")


class MetricStats(TypedDict):
    """One metric over cases: NaN-excluded mean, sample standard deviation (ddof 1) and the count of cases behind them."""

    mean: float
    sd: float
    n: int


class Summary(TypedDict):
    """`summarise`'s result: per structure and metric, per metric over structures, and case-level numbers."""

    structures: dict[str, dict[str, MetricStats]]
    mean_over_structures: dict[str, MetricStats]
    case: dict[str, MetricStats]


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else _NAN


def segmentation_case_metrics(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    class_ids: Mapping[str, int],
    spacing_mm: Sequence[float],
    ignore_label: int = IGNORE_LABEL,
) -> dict[str, dict[str, float]]:
    """Dice, Jaccard, HD95, ASD and AVD of each structure for one case, with the empty-mask rules above.

    Args:
        prediction: the predicted integer label map, (D, H, W) (2D maps work too).
        reference: the reference integer label map, same shape.
        class_ids: structure name -> label id, the structures to score (the schema's classes
            without background: a background entry is scored like any other and enters
            ``mean_over_structures`` in `summarise`).
        spacing_mm: the voxel size in mm along each axis of the maps.
        ignore_label: the reference value whose voxels are background in both maps.

    Returns:
        Structure name -> {metric: float} for every metric of `SEGMENTATION_METRICS`
        (NaN: not scorable).

    Raises:
        ValueError: shapes differ, or a spacing that is not one positive number per axis.
    """
    by_id = case_metrics(prediction, reference, class_ids.values(), spacing_mm, ignore_label=ignore_label)
    out: dict[str, dict[str, float]] = {}
    for name, class_id in class_ids.items():
        row = by_id[int(class_id)]
        dice = float(row["dice"])
        v_pred, v_ref = float(row["volume_pred_ml"]), float(row["volume_ref_ml"])
        out[name] = {
            "dice": dice,
            "jaccard": dice / (2.0 - dice) if not math.isnan(dice) else _NAN,
            "hd95_mm": float(row["hd95"]),
            "asd_mm": float(row["assd"]),
            "avd_ml": abs(v_pred - v_ref),  # NaN when both are empty (volumes NaN)
            "avd_percent": 100.0 * abs(float(row["rvd"])),  # rvd: NaN for an empty reference
        }
    return out


def _images(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_array(a).astype(np.float64), _as_array(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} != {y.shape}")
    if x.ndim not in (2, 3):
        raise ValueError(f"images must be 2D or 3D (D, H, W) without batch or channel axes, got shape {x.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("images must be finite (no NaN or infinity)")
    return x, y


def global_ncc(
    image_a: np.ndarray | torch.Tensor,
    image_b: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Global normalised cross-correlation (Pearson's r) of two images, over all voxels or a mask.

    Args:
        image_a: an image, (D, H, W) or (H, W).
        image_b: an image of the same shape.
        mask: voxels to correlate over (boolean, same shape); None: all voxels.

    Returns:
        r in [-1, 1]: 1 for images equal up to a positive affine intensity map, -1 for a
        negative one; NaN where either image is constant over the voxels (or fewer than two).

    Raises:
        ValueError: shapes differ, the images are not 2D or 3D, or not finite.
    """
    x, y = _images(image_a, image_b)
    if mask is not None:
        m = _as_array(mask).astype(bool)
        if m.shape != x.shape:
            raise ValueError(f"mask shape {m.shape} != image shape {x.shape}")
        x, y = x[m], y[m]
    if x.size < 2:
        return _NAN
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denominator == 0.0:
        return _NAN
    return float(np.clip(float((dx * dy).sum()) / denominator, -1.0, 1.0))


def local_ncc(image_a: np.ndarray | torch.Tensor, image_b: np.ndarray | torch.Tensor, kernel_size: int = 9) -> float:
    """Local normalised cross-correlation: MONAI's ``LocalNormalizedCrossCorrelationLoss`` negated.

    Args:
        image_a: an image, (D, H, W) or (H, W).
        image_b: an image of the same shape.
        kernel_size: the side of the cubic (square) window in voxels, odd.

    Returns:
        The mean over windows of the squared local correlation, in [0, 1] (up to rounding):
        1 for images equal up to a local affine intensity map of either sign; flat windows
        score 0.

    Raises:
        ValueError: shapes differ, the images are not 2D or 3D or not finite, or an even or
            non-positive `kernel_size`.
    """
    x, y = _images(image_a, image_b)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number of voxels, got {kernel_size}")
    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=x.ndim, kernel_size=kernel_size)
    with torch.no_grad():
        value = loss(torch.from_numpy(x).float()[None, None], torch.from_numpy(y).float()[None, None])
    return -float(value)


def registration_case_metrics(
    warped_atlas_label: np.ndarray | torch.Tensor,
    reference_label: np.ndarray | torch.Tensor,
    warped_atlas_image: np.ndarray | torch.Tensor,
    target_image: np.ndarray | torch.Tensor,
    class_ids: Mapping[str, int],
    kernel_size: int = 9,
    ignore_label: int = IGNORE_LABEL,
) -> dict[str, float | dict[str, dict[str, float]]]:
    """Registration quality of one atlas-to-target case: Dice of the warped atlas labels and image NCC.

    No spacing is needed: Dice counts voxels and NCC compares intensities voxel by voxel
    (the local NCC window is in voxels).

    Args:
        warped_atlas_label: the atlas label map warped onto the target, (D, H, W), integer.
        reference_label: the target's reference label map, same shape.
        warped_atlas_image: the atlas image warped onto the target, same shape.
        target_image: the target image, same shape.
        class_ids: structure name -> label id, the structures to score.
        kernel_size: the local NCC window in voxels (odd).
        ignore_label: the reference value whose voxels are left out of Dice.

    Returns:
        ``{"structures": {name: {"dice": float}}, "dice_mean": float, "ncc": float,
        "ncc_foreground": float, "local_ncc": float}`` (see the module docstring; NaN: not
        scorable). `summarise` reads it as it is.

    Raises:
        ValueError: the label maps or the images differ in shape, or the labels and images do,
            images that are not 2D or 3D or not finite, or a bad `kernel_size`.
    """
    warped, ref = _as_array(warped_atlas_label), _as_array(reference_label)
    if warped.shape != ref.shape or tuple(_as_array(target_image).shape) != warped.shape:
        raise ValueError(f"label maps {warped.shape}, {ref.shape} and images {tuple(_as_array(target_image).shape)} must share one shape")
    ids = [int(c) for c in class_ids.values()]
    dice = dice_per_class(warped, ref, ids, ignore_label)
    structures = {name: {"dice": float(dice[int(c)])} for name, c in class_ids.items()}
    foreground = (np.isin(warped, ids) | np.isin(ref, ids)) & (ref != ignore_label)
    return {
        "structures": structures,
        "dice_mean": _nanmean([row["dice"] for row in structures.values()]),
        "ncc": global_ncc(warped_atlas_image, target_image),
        "ncc_foreground": global_ncc(warped_atlas_image, target_image, foreground),
        "local_ncc": local_ncc(warped_atlas_image, target_image, kernel_size),
    }


def _stats(values: Sequence[float]) -> MetricStats:
    kept = [v for v in values if not math.isnan(v)]
    return MetricStats(
        mean=float(np.mean(kept)) if kept else _NAN,
        sd=float(np.std(kept, ddof=1)) if len(kept) > 1 else _NAN,
        n=len(kept),
    )


def _value(v: object) -> float:
    """A metric value as a float: a number, or None (JSON null) read as NaN."""
    if v is None:
        return _NAN
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"a metric value must be a number or None, got {type(v).__name__} {v!r}")


def summarise(cases: Sequence[Mapping[str, object]]) -> Summary:
    """Per structure and metric, and over structures: NaN-excluded mean, sample sd and n over cases.

    A case is a `segmentation_case_metrics` result (structure -> metric -> value) or a
    `registration_case_metrics` result (its ``"structures"`` are the structure rows, its other
    entries case-level numbers). None (JSON null) counts as NaN.

    Args:
        cases: the metrics of each case, all of one kind.

    Returns:
        ``{"structures": {name: {metric: MetricStats}}, "mean_over_structures": {metric:
        MetricStats}, "case": {metric: MetricStats}}`` (a `Summary`). ``mean_over_structures``: each case's
        NaN-excluded mean over its structures (the paper's per-case average, e.g. mean Dice),
        then mean, sd and n of those over cases (a case with no scored structure is left out).
        ``case``: the case-level numbers of registration results (``dice_mean``, ``ncc``,
        ``ncc_foreground``, ``local_ncc``); empty for segmentation results. ``sd`` is NaN
        where ``n`` < 2, ``mean`` where ``n`` is 0.

    Raises:
        TypeError: a metric value that is neither a number nor None.
    """
    rows_per_case: list[Mapping[str, Mapping[str, object]]] = []
    scalars_per_case: list[dict[str, float]] = []
    for case in cases:
        if "structures" in case and isinstance(case["structures"], Mapping):
            rows_per_case.append(case["structures"])
            scalars_per_case.append({k: _value(v) for k, v in case.items() if k != "structures"})
        else:
            rows_per_case.append({k: v for k, v in case.items() if isinstance(v, Mapping)})
            scalars_per_case.append({})
    names = list(dict.fromkeys(name for rows in rows_per_case for name in rows))
    metrics = list(dict.fromkeys(m for rows in rows_per_case for row in rows.values() for m in row))
    scalar_names = list(dict.fromkeys(k for scalars in scalars_per_case for k in scalars))
    structures = {
        name: {
            m: _stats([_value(rows[name].get(m)) for rows in rows_per_case if name in rows])
            for m in metrics
            if any(m in rows.get(name, {}) for rows in rows_per_case)
        }
        for name in names
    }
    over_structures = {m: _stats([_nanmean([_value(row.get(m)) for row in rows.values() if m in row]) for rows in rows_per_case]) for m in metrics}
    case_level = {k: _stats([scalars.get(k, _NAN) for scalars in scalars_per_case]) for k in scalar_names}
    return Summary(structures=structures, mean_over_structures=over_structures, case=case_level)
