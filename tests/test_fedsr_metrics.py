"""FedSR evaluation metrics (pipelines.fedsr.metrics): segmentation and registration per structure, NCC, summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipelines.fedsr.metrics import (
    REGISTRATION_IMAGE_METRICS,
    SEGMENTATION_METRICS,
    global_ncc,
    local_ncc,
    registration_case_metrics,
    segmentation_case_metrics,
    summarise,
)
from pipelines.metrics import nan_to_none

SPACING = (2.0, 1.0, 1.0)  # anisotropic: axis 0 is coarse
SHAPE = (24, 40, 40)


def _sphere(center_mm: tuple[float, float, float], radius_mm: float, shape: tuple[int, ...] = SHAPE, spacing: tuple[float, ...] = SPACING) -> np.ndarray:
    """A ball in physical space (an ellipsoid in voxels on an anisotropic grid)."""
    squared = np.zeros(shape)
    for g, c in zip(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), center_mm):
        squared += (g - c) ** 2
    return squared <= radius_mm**2


@pytest.fixture(scope="module")
def ball() -> np.ndarray:
    return _sphere((24.0, 20.0, 20.0), 10.0).astype(np.int64)


def test_identical_maps_score_perfectly(ball: np.ndarray) -> None:
    label = ball.copy()
    label[_sphere((24.0, 20.0, 20.0), 4.0)] = 2  # an inner structure
    out = segmentation_case_metrics(label, torch.from_numpy(label), {"outer": 1, "inner": 2}, SPACING)
    assert set(out) == {"outer", "inner"}
    for row in out.values():
        assert set(row) == set(SEGMENTATION_METRICS)
        assert row == {"dice": 1.0, "jaccard": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "avd_ml": 0.0, "avd_percent": 0.0}
        assert all(type(v) is float for v in row.values())


@pytest.mark.parametrize(("axis", "shift"), [(0, 2), (1, 3)])
def test_shifted_sphere_distances_in_mm(ball: np.ndarray, axis: int, shift: int) -> None:
    moved = np.roll(ball, shift, axis=axis)
    row = segmentation_case_metrics(moved, ball, {"ball": 1}, SPACING)["ball"]
    shift_mm = shift * SPACING[axis]  # 4 mm along the coarse axis, 3 mm along a fine one
    # the poles are shift_mm apart, the equator 0: the 95th percentile is near the top, the mean near half
    assert 0.85 * shift_mm <= row["hd95_mm"] <= shift_mm + 1e-6
    assert 0.3 * shift_mm <= row["asd_mm"] <= 0.6 * shift_mm
    a, b = ball.astype(bool), moved.astype(bool)
    assert row["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert row["jaccard"] == pytest.approx((a & b).sum() / (a | b).sum())
    assert row["jaccard"] == pytest.approx(row["dice"] / (2 - row["dice"]))
    assert row["avd_ml"] == 0.0  # a shift keeps the volume


def test_volume_difference_is_voxel_count_times_voxel_volume(ball: np.ndarray) -> None:
    grown = (ball.astype(bool) | _sphere((24.0, 20.0, 20.0), 12.0)).astype(np.int64)
    row = segmentation_case_metrics(grown, ball, {"ball": 1}, SPACING)["ball"]
    extra = int(grown.sum() - ball.sum())
    assert extra > 0
    voxel_ml = 2.0 * 1.0 * 1.0 / 1000.0
    assert row["avd_ml"] == pytest.approx(extra * voxel_ml)
    assert row["avd_percent"] == pytest.approx(100.0 * extra / ball.sum())
    # absolute: under-segmenting by the same amount scores the same
    assert segmentation_case_metrics(ball, grown, {"ball": 1}, SPACING)["ball"]["avd_ml"] == pytest.approx(row["avd_ml"])


def test_absent_structures(ball: np.ndarray) -> None:
    empty = np.zeros_like(ball)
    classes = {"ball": 1, "missing": 7}
    both_absent = segmentation_case_metrics(ball, ball, classes, SPACING)["missing"]
    assert all(math.isnan(v) for v in both_absent.values())
    missed = segmentation_case_metrics(empty, ball, classes, SPACING)["ball"]  # only the prediction empty
    assert missed["dice"] == 0.0 and missed["jaccard"] == 0.0
    assert math.isnan(missed["hd95_mm"]) and math.isnan(missed["asd_mm"])
    assert missed["avd_ml"] == pytest.approx(ball.sum() * 0.002) and missed["avd_percent"] == 100.0
    spurious = segmentation_case_metrics(ball, empty, classes, SPACING)["ball"]  # only the reference empty
    assert spurious["dice"] == 0.0 and spurious["jaccard"] == 0.0
    assert math.isnan(spurious["hd95_mm"]) and math.isnan(spurious["asd_mm"]) and math.isnan(spurious["avd_percent"])
    assert spurious["avd_ml"] == pytest.approx(ball.sum() * 0.002)


def test_segmentation_input_errors(ball: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        segmentation_case_metrics(ball, ball[:-1], {"ball": 1}, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_case_metrics(ball, ball, {"ball": 1}, (1.0, 1.0))


def test_global_ncc_extremes_and_noise() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, 16))
    assert global_ncc(image, image) == pytest.approx(1.0)
    assert global_ncc(image, 3.0 * image + 5.0) == pytest.approx(1.0)  # invariant to affine intensity
    assert global_ncc(image, -image) == pytest.approx(-1.0)
    assert abs(global_ncc(image, rng.normal(size=image.shape))) < 0.1  # 4096 voxels: sd of r about 0.016
    assert math.isnan(global_ncc(image, np.ones_like(image)))  # a constant image has no correlation
    mask = np.zeros(image.shape, bool)
    mask[4:12] = True
    other = image.copy()
    other[~mask] = rng.normal(size=int((~mask).sum()))  # equal inside the mask only
    assert global_ncc(image, other, mask) == pytest.approx(1.0) and global_ncc(image, other) < 0.9


def test_local_ncc_is_squared_and_bounded() -> None:
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(size=(16, 16, 16)))
    assert local_ncc(image, image) == pytest.approx(1.0, abs=1e-4)
    assert local_ncc(image, -image) == pytest.approx(1.0, abs=1e-4)  # squared: the sign is lost
    noise = local_ncc(image, torch.from_numpy(rng.normal(size=(16, 16, 16))))
    assert 0.0 <= noise < 0.05
    with pytest.raises(ValueError, match="odd"):
        local_ncc(image, image, kernel_size=4)
    with pytest.raises(ValueError, match="2D or 3D"):
        local_ncc(image[None], image[None])


def test_registration_metrics(ball: np.ndarray) -> None:
    moved = np.roll(ball, 2, axis=1)
    moved[_sphere((24.0, 20.0, 22.0), 4.0)] = 2
    reference = ball.copy()
    reference[_sphere((24.0, 20.0, 20.0), 4.0)] = 2
    classes = {"outer": 1, "inner": 2, "missing": 9}
    image = reference.astype(np.float32) + np.random.default_rng(2).normal(scale=0.1, size=reference.shape).astype(np.float32)
    out = registration_case_metrics(moved, reference, image, image, classes)
    assert set(out) == {"structures", *REGISTRATION_IMAGE_METRICS}
    segmentation = segmentation_case_metrics(moved, reference, classes, SPACING)
    structures = out["structures"]
    assert isinstance(structures, dict)
    for name in ("outer", "inner"):
        assert structures[name]["dice"] == segmentation[name]["dice"]  # the same maps, the same Dice
    assert math.isnan(structures["missing"]["dice"])
    assert out["dice_mean"] == pytest.approx((segmentation["outer"]["dice"] + segmentation["inner"]["dice"]) / 2)
    assert out["ncc"] == pytest.approx(1.0) and out["ncc_foreground"] == pytest.approx(1.0)
    assert out["local_ncc"] == pytest.approx(1.0, abs=1e-3)
    json.dumps(nan_to_none(out), allow_nan=False)
    negative = registration_case_metrics(moved, reference, image, -image, classes)
    assert negative["ncc"] == pytest.approx(-1.0) and negative["ncc_foreground"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shape"):
        registration_case_metrics(moved, reference, image[:-1], image[:-1], classes)


def test_summarise_segmentation_with_nan() -> None:
    nan = float("nan")
    cases: list[dict[str, object]] = [
        {"a": {"dice": 0.8, "hd95_mm": 2.0}, "b": {"dice": 0.6, "hd95_mm": nan}},
        {"a": {"dice": 0.6, "hd95_mm": 4.0}, "b": {"dice": nan, "hd95_mm": nan}},
        {"a": {"dice": 1.0, "hd95_mm": None}, "b": {"dice": 0.4, "hd95_mm": 1.0}},  # None: JSON null, read as NaN
    ]
    out = summarise(cases)
    a_dice = out["structures"]["a"]["dice"]
    assert a_dice["n"] == 3 and a_dice["mean"] == pytest.approx(0.8) and a_dice["sd"] == pytest.approx(0.2)  # sample sd
    b_dice = out["structures"]["b"]["dice"]
    assert b_dice["n"] == 2 and b_dice["mean"] == pytest.approx(0.5) and b_dice["sd"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    assert out["structures"]["a"]["hd95_mm"]["n"] == 2 and out["structures"]["a"]["hd95_mm"]["mean"] == pytest.approx(3.0)
    b_hd = out["structures"]["b"]["hd95_mm"]
    assert b_hd["n"] == 1 and b_hd["mean"] == 1.0 and math.isnan(b_hd["sd"])
    # over structures: each case's NaN-excluded mean (0.7, 0.6, 0.7), then over cases
    over = out["mean_over_structures"]["dice"]
    assert over["n"] == 3 and over["mean"] == pytest.approx(2.0 / 3.0) and over["sd"] == pytest.approx(np.std([0.7, 0.6, 0.7], ddof=1))
    over_hd = out["mean_over_structures"]["hd95_mm"]  # per case 2.0, 4.0, 1.0
    assert over_hd["n"] == 3 and over_hd["mean"] == pytest.approx(7.0 / 3.0)
    assert out["case"] == {}
    json.dumps(nan_to_none(out), allow_nan=False)


def test_summarise_registration_and_empty() -> None:
    cases = [
        {"structures": {"a": {"dice": 0.8}}, "dice_mean": 0.8, "ncc": 0.9, "ncc_foreground": 0.8, "local_ncc": 0.3},
        {"structures": {"a": {"dice": 0.6}}, "dice_mean": 0.6, "ncc": 0.7, "ncc_foreground": 0.6, "local_ncc": 0.5},
    ]
    out = summarise(cases)
    assert out["structures"]["a"]["dice"]["mean"] == pytest.approx(0.7)
    assert out["mean_over_structures"]["dice"]["mean"] == pytest.approx(0.7)
    assert set(out["case"]) == set(REGISTRATION_IMAGE_METRICS)
    assert out["case"]["local_ncc"]["mean"] == pytest.approx(0.4) and out["case"]["ncc"]["n"] == 2
    assert summarise([]) == {"structures": {}, "mean_over_structures": {}, "case": {}}
    with pytest.raises(TypeError, match="number"):
        summarise([{"a": {"dice": "high"}}])
