"""Clinical segmentation metrics of one case, per class: overlap, boundary distances in mm and volumes.

Dice says how much two masks overlap; clinical readers also ask how far a contour strays
(boundary distances, in mm) and how wrong a measured volume is. `case_metrics` scores one
case (a predicted and a reference label map on the same voxel grid, and that grid's spacing
in mm); `summarise_metrics` averages cases per class. No FL imports.

Per class:

* ``dice``: `pipelines.evaluation.dice_per_class` itself (same values, same rule).
* ``hd95``: 95th-percentile Hausdorff distance in mm (MONAI ``compute_hausdorff_distance``,
  ``percentile=95``): the larger of the two directed 95th percentiles of the distances from
  one mask's boundary voxels to the other's boundary.
* ``assd``: average symmetric surface distance in mm (MONAI
  ``compute_average_surface_distance``, ``symmetric=True``): the mean, over the boundary voxels
  of both masks, of the distance to the other mask's boundary.
* ``nsd``: normalised surface Dice at the class's tolerance in mm (MONAI
  ``compute_surface_dice``): the share of the boundary voxels of both masks lying within the
  tolerance of the other mask's boundary.
* ``rvd``: relative volume difference ``(V_pred - V_ref) / V_ref``, signed (> 0: the model
  over-segments).
* ``volume_ref_ml``, ``volume_pred_ml``: the volumes in ml (voxels x voxel volume).

A boundary voxel is a mask voxel with a face neighbour outside the mask (MONAI's edges);
distances are between voxel centres with each axis scaled by its spacing, so anisotropic
grids are measured in mm. Each boundary voxel counts once (MONAI's default; DeepMind's
surface-distance library weighs surface elements by their area instead), so on an anisotropic
grid the parts of a surface facing the coarse axis, which have more boundary voxels per mm²,
weigh more in HD95, ASSD and NSD than their area.

Empty-mask rules (one rule per situation, applied to every metric):

==============================  ==========  =====================  ======================
metric                          both empty  only reference empty   only prediction empty
==============================  ==========  =====================  ======================
dice, nsd                       NaN         0                      0
hd95, assd                      NaN         NaN                    NaN
rvd                             NaN         NaN                    -1
volume_ref_ml, volume_pred_ml   NaN         measured (ref 0)       measured (pred 0)
==============================  ==========  =====================  ======================

* Both empty (the class is absent and not predicted): nothing to score, as in the Dice rule
  of `pipelines.evaluation`; every metric is NaN and left out of means. (FLARE's evaluation
  scores 1 here, which would fill means with cases that say nothing about the model.)
* Exactly one empty: the overlap metrics score the error as 0 and RVD a miss as -1; RVD of
  an empty reference divides by zero (NaN). Distances to an empty boundary do not exist:
  MONAI and DeepMind's surface-distance library return infinity, and the Metrics Reloaded
  reference implementation (Maier-Hein et al., Nat. Methods 2024) returns NaN and leaves a
  worst case to the aggregation. We report NaN rather than a worst-case constant: the usual
  one (the image diagonal, BraTS) depends on the field of view, so means would not compare
  across datasets and one missed lesion would swamp them. The error still counts, in Dice,
  NSD and RVD, and every mean comes with its count ``n``: ``n`` of hd95 falls short of ``n``
  of dice by exactly the cases where one mask is empty.
* Ignore label: voxels whose reference is the ignore label (255) are set to background in
  both maps before anything is measured, as Dice leaves them out of both. A structure cut by
  an ignored region gets a boundary along the cut in both masks; where both reach the cut,
  those boundaries coincide (distance 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict

import numpy as np
import torch
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.metrics.surface_dice import compute_surface_dice
from monai.metrics.surface_distance import compute_average_surface_distance

from fedimg_core.label_schema import DEFAULT_SURFACE_TOLERANCE_MM
from pipelines.evaluation import IGNORE_LABEL, dice_per_class

__all__ = ["DEFAULT_SURFACE_TOLERANCE_MM", "METRICS", "MetricSummary", "case_metrics", "nan_to_none", "summarise_metrics"]

METRICS = ("dice", "hd95", "assd", "nsd", "rvd", "volume_ref_ml", "volume_pred_ml")
_NAN = float("nan")


class MetricSummary(TypedDict):
    """One metric of one class over cases: NaN-excluded mean and median, and the count of cases behind them."""

    mean: float
    median: float
    n: int


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their union's bounding box plus one voxel (within the array):
    distances do not change, and a voxel on the array's border stays on it (MONAI crops so too)."""
    where = np.nonzero(a | b)
    box = tuple(slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n)) for i, n in zip(where, a.shape))
    return a[box], b[box]


def _surface(pred: np.ndarray, ref: np.ndarray, spacing: list[float], tolerance: float) -> tuple[float, float, float]:
    """HD95, ASSD and NSD (MONAI's functions) of two non-empty boolean masks.

    An axis of one voxel (a radiograph's plane, stored with a singleton third axis) is not a
    dimension: the masks' edges are found in the others (a 3D edge on a one-voxel-thick mask
    would be every voxel).
    """
    flat = [axis for axis, n in enumerate(pred.shape) if n == 1]
    if flat and pred.ndim - len(flat) >= 2:
        pred, ref = pred.squeeze(axis=tuple(flat)), ref.squeeze(axis=tuple(flat))
        spacing = [s for axis, s in enumerate(spacing) if axis not in flat]
    p, r = _crop(pred, ref)
    yp, yr = torch.from_numpy(np.ascontiguousarray(p))[None, None].float(), torch.from_numpy(np.ascontiguousarray(r))[None, None].float()
    with warnings.catch_warnings():  # MONAI 1.6 passes its own deprecated argument to get_mask_edges: not ours to fix
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(yp, yr, include_background=True, symmetric=True, spacing=spacing)
        nsd = compute_surface_dice(yp, yr, class_thresholds=[tolerance], include_background=True, spacing=spacing)
    return float(hd95[0, 0]), float(assd[0, 0]), float(nsd[0, 0])


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    classes: Iterable[int],
    spacing: Sequence[float],
    tolerances_mm: Mapping[int, float] | None = None,
    ignore_label: int = IGNORE_LABEL,
    empty_scores_one: Iterable[int] = (),
) -> dict[int, dict[str, float]]:
    """The clinical metrics of each class in `classes` for one case, with the empty-mask rules above.

    Args:
        pred: the predicted label map (2D or 3D).
        ref: the reference label map, same shape.
        classes: the classes to score.
        spacing: the voxel size in mm along each axis of the maps (the grid they were scored on).
        tolerances_mm: class id -> NSD tolerance in mm (`LabelSchema.surface_tolerance`); a class
            not in it, or None, uses `DEFAULT_SURFACE_TOLERANCE_MM` (2.0 mm).
        ignore_label: the reference value whose voxels are background in both maps.
        empty_scores_one: classes whose empty prediction on an empty reference is right (the schema's
            ``empty_mask_one``): Dice and NSD 1, volumes 0, the distances NaN.

    Returns:
        Class id -> {metric: value} for every metric of `METRICS` (NaN: not scorable).

    Raises:
        ValueError: shapes differ, a spacing that is not one positive number per axis, or a
            tolerance that is not a finite number >= 0.
    """
    p, r = _as_array(pred), _as_array(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} != reference shape {r.shape}")
    sp = [float(s) for s in spacing]
    if len(sp) != p.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {p.ndim} positive numbers in mm (one per axis of shape {p.shape}), got {list(spacing)}")
    classes = [int(c) for c in classes]
    tolerances = {c: float((tolerances_mm or {}).get(c, DEFAULT_SURFACE_TOLERANCE_MM)) for c in classes}
    bad = {c: t for c, t in tolerances.items() if not (math.isfinite(t) and t >= 0)}
    if bad:
        raise ValueError(f"NSD tolerances must be finite numbers >= 0 mm, got {bad}")
    one = {int(c) for c in empty_scores_one}
    dice = dice_per_class(p, r, classes, ignore_label, one)
    valid = r != ignore_label
    voxel_ml = float(np.prod(sp)) / 1000.0
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        pc, rc = (p == c) & valid, (r == c) & valid
        n_pred, n_ref = int(pc.sum()), int(rc.sum())
        row = dict.fromkeys(METRICS, _NAN)
        if n_pred or n_ref:
            row.update(dice=dice[c], volume_ref_ml=n_ref * voxel_ml, volume_pred_ml=n_pred * voxel_ml, nsd=0.0)
            if n_ref:
                row["rvd"] = (n_pred - n_ref) / n_ref
            if n_pred and n_ref:
                row["hd95"], row["assd"], row["nsd"] = _surface(pc, rc, sp, tolerances[c])
        elif c in one:  # nothing to find, and nothing found
            row.update(dice=1.0, nsd=1.0, volume_ref_ml=0.0, volume_pred_ml=0.0)
        out[c] = row
    return out


def summarise_metrics(
    per_case: Sequence[Mapping[int, Mapping[str, float]]],
    classes: Iterable[int],
    metrics: Sequence[str] = METRICS,
) -> dict[int, dict[str, MetricSummary]]:
    """Per class and metric: the NaN-excluded mean and median over cases, and n, the cases counted.

    Args:
        per_case: `case_metrics` of each case.
        classes: the classes to summarise.
        metrics: the metrics to summarise.

    Returns:
        Class id -> metric -> {mean, median, n}; mean and median are NaN where n is 0.
    """
    out: dict[int, dict[str, MetricSummary]] = {}
    for c in classes:
        out[c] = {}
        for m in metrics:
            vals = [float(v) for case in per_case if (v := case.get(c, {}).get(m)) is not None and not math.isnan(v)]
            out[c][m] = MetricSummary(
                mean=float(np.mean(vals)) if vals else _NAN,
                median=float(np.median(vals)) if vals else _NAN,
                n=len(vals),
            )
    return out


def nan_to_none(value: object) -> object:
    """`value` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by None: JSON's null.

    Args:
        value: metrics, a summary, or any JSON-like value.

    Returns:
        The same structure (tuples become lists), ready for `json.dumps` without NaN.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value
