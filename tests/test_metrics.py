"""Clinical segmentation metrics (`pipelines.metrics`) against hand-computed cases, and the
label schema's NSD tolerances (``surface_tolerance_mm``)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import yaml
from scipy import ndimage

from pipelines.evaluation import dice_per_class
from pipelines.metrics import METRICS, case_metrics, nan_to_none, summarise_metrics
from preprocessing.schema import DEFAULT_SCHEMA, DEFAULT_SURFACE_TOLERANCE_MM, SchemaError, load_schema, parse_schema

NAN_METRICS = dict.fromkeys(METRICS, math.nan)


def ball(shape, radius_mm, spacing):
    """A ball of `radius_mm` (in mm, so an ellipsoid of voxels on an anisotropic grid) centred in `shape`."""
    axes = [(np.arange(n) - n // 2) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    return (sum(g**2 for g in grid) <= radius_mm**2).astype(np.uint8)


def cube(shape, lo, hi, value=1):
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def reference_surface(pred, ref, spacing, tolerance):
    """HD95, ASSD and NSD written out with scipy (boundary = mask minus its erosion; Euclidean
    distance transform in mm), independently of MONAI."""
    pb, rb = pred ^ ndimage.binary_erosion(pred), ref ^ ndimage.binary_erosion(ref)
    d_pr = ndimage.distance_transform_edt(~rb, sampling=spacing)[pb]
    d_rp = ndimage.distance_transform_edt(~pb, sampling=spacing)[rb]
    both = np.concatenate([d_pr, d_rp])
    return max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)), both.mean(), float((both <= tolerance).mean())


def assert_metrics(got, expected):
    assert set(got) == set(METRICS)
    for k, v in expected.items():
        assert math.isnan(got[k]) if math.isnan(v) else got[k] == pytest.approx(v, abs=1e-6), (k, got[k], v)


# --- hand-computed cases ------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
def test_identical_masks_score_perfectly(spacing):
    ref = ball((40, 40, 16), 9.0, spacing)
    n = int(ref.sum())
    got = case_metrics(ref, ref, [1], spacing)[1]
    ml = n * float(np.prod(spacing)) / 1000
    assert_metrics(got, {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "rvd": 0.0, "volume_ref_ml": ml, "volume_pred_ml": ml})


@pytest.mark.parametrize(
    "spacing, axis, shift",
    [
        ((1.0, 1.0, 1.0), 0, 2),  # d = 2 mm
        ((0.5, 1.0, 2.0), 2, 2),  # along the 2 mm axis: d = 4 mm (2 if spacing were ignored, 1 if its order were reversed)
        ((0.5, 1.0, 2.0), 0, 2),  # along the 0.5 mm axis: d = 1 mm
    ],
)
def test_a_translated_ball_is_within_the_shift_and_distances_are_in_mm(spacing, axis, shift):
    """A pure translation by d: every boundary point of one ball is within d of the other's
    (HD95 <= d); the pole points are exactly d away, and for a sphere the distance of a point at
    angle t from the shift is about d |cos t|, so HD95 is about 0.95 d and ASSD about d / 2 when
    the surface is sampled evenly. Boundary voxels sample it evenly only on an isotropic grid (each
    counts once), so on the anisotropic one ASSD leans towards d where the poles face the coarse
    axis, towards 0 where they face the fine one; the scipy computation pins the exact values."""
    shape = (80, 40, 20) if spacing[0] == 0.5 else (48, 48, 48)
    ref = ball(shape, 8.0, spacing)
    pred = np.roll(ref, shift, axis=axis)
    d = shift * spacing[axis]
    got = case_metrics(pred, ref, [1], spacing, {1: d})[1]
    assert 0.9 * d <= got["hd95"] <= d + 1e-5
    assert (0.45 * d <= got["assd"] <= 0.55 * d) if spacing == (1.0, 1.0, 1.0) else (0.2 * d <= got["assd"] <= 0.7 * d)
    assert got["nsd"] == 1.0 and got["rvd"] == 0.0 and got["volume_pred_ml"] == got["volume_ref_ml"]
    hd95, assd, nsd = reference_surface(pred.astype(bool), ref.astype(bool), spacing, d)
    assert got["hd95"] == pytest.approx(hd95, rel=1e-5) and got["assd"] == pytest.approx(assd, rel=1e-5) and got["nsd"] == pytest.approx(nsd)
    # below the shift some boundary is out of tolerance; the closest pairs (0 mm) are not
    below = case_metrics(pred, ref, [1], spacing, {1: 0.5 * d})[1]["nsd"]
    assert 0.0 < below < 1.0 and below == pytest.approx(reference_surface(pred.astype(bool), ref.astype(bool), spacing, 0.5 * d)[2])


def test_a_cube_shifted_one_slice_has_hand_counted_distances():
    """A 6-voxel cube shifted one voxel along z at spacing (1, 1, 2) mm. Of its 152 boundary
    voxels 100 lie on the other cube's boundary (the 4 side rings at z = 1..4 and the ring at
    z = 5: 5 x 20), 12 are 1 mm away (the top face's inner voxels next to the ring), 40 are
    2 mm away (the 4 central top-face voxels and the 36 of the bottom face). The same holds the
    other way (mirror image)."""
    spacing = (1.0, 1.0, 2.0)
    ref = cube((10, 10, 12), (2, 2, 2), (8, 8, 8))
    pred = np.roll(ref, 1, axis=2)
    at = {t: case_metrics(pred, ref, [1], spacing, {1: t})[1] for t in (0.5, 1.5, 2.0)}
    assert at[0.5]["nsd"] == pytest.approx(100 / 152)
    assert at[1.5]["nsd"] == pytest.approx(112 / 152)
    assert at[2.0]["nsd"] == 1.0
    got = at[2.0]
    assert got["hd95"] == pytest.approx(2.0)  # the 95th percentile of 100 x 0, 12 x 1, 40 x 2 mm
    assert got["assd"] == pytest.approx((12 * 1 + 40 * 2) / 152)
    assert got["dice"] == pytest.approx(2 * 180 / (216 + 216)) and got["rvd"] == 0.0
    assert case_metrics(pred, ref, [1], spacing)[1]["nsd"] == 1.0  # no tolerance given: 2.0 mm


def test_relative_volume_difference_and_volumes():
    spacing = (1.0, 1.0, 2.0)
    ref = cube((12, 12, 12), (2, 2, 2), (6, 6, 6))  # 64 voxels of 2 mm^3
    double = cube((12, 12, 12), (2, 2, 2), (6, 6, 10))
    half = cube((12, 12, 12), (2, 2, 2), (6, 6, 4))
    got = case_metrics(double, ref, [1], spacing)[1]
    assert got["rvd"] == 1.0 and got["volume_ref_ml"] == pytest.approx(0.128) and got["volume_pred_ml"] == pytest.approx(0.256)
    assert case_metrics(half, ref, [1], spacing)[1]["rvd"] == -0.5


# --- empty masks ----------------------------------------------------------------------------


def test_empty_mask_rules():
    spacing = (1.0, 1.0, 1.0)
    empty = np.zeros((10, 10, 10), np.uint8)
    organ = cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI "all 0, this may result in nan/inf" warnings: empties never reach it
        both = case_metrics(empty, empty, [1], spacing)[1]
        only_pred = case_metrics(organ, empty, [1], spacing)[1]  # reference empty: a false positive
        only_ref = case_metrics(empty, organ, [1], spacing)[1]  # prediction empty: a miss
    assert_metrics(both, NAN_METRICS)
    nan = math.nan
    assert_metrics(only_pred, {"dice": 0.0, "nsd": 0.0, "hd95": nan, "assd": nan, "rvd": nan, "volume_ref_ml": 0.0, "volume_pred_ml": 0.027})
    assert_metrics(only_ref, {"dice": 0.0, "nsd": 0.0, "hd95": nan, "assd": nan, "rvd": -1.0, "volume_ref_ml": 0.027, "volume_pred_ml": 0.0})


def test_dice_is_dice_per_class_for_every_class():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, (12, 12, 8)).astype(np.uint8)
    pred = rng.integers(0, 4, (12, 12, 8)).astype(np.uint8)
    ref[0] = 255
    pred[pred == 3] = 0  # class 3: a miss; class 5: absent from both
    got = case_metrics(pred, ref, [1, 2, 3, 5], (1.0, 1.0, 1.0))
    want = dice_per_class(pred, ref, [1, 2, 3, 5])
    for c in (1, 2, 3):
        assert got[c]["dice"] == want[c]
    assert math.isnan(want[5]) and all(math.isnan(v) for v in got[5].values())


def test_ignored_voxels_are_background_in_both_maps():
    """The prediction paints the organ into a slab the reference ignores: scored as if the slab
    were background in both, so the model is perfect on what was labelled."""
    spacing = (1.0, 1.0, 3.0)
    pred = cube((12, 12, 12), (2, 2, 2), (9, 9, 9))
    ref = pred.copy()
    ref[:, :, 6:] = np.where(ref[:, :, 6:] == 1, 255, 0)  # the organ's top is not labelled
    got = case_metrics(pred, ref, [1], spacing)[1]
    ml = 7 * 7 * 4 * 3 / 1000
    assert_metrics(got, {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "rvd": 0.0, "volume_ref_ml": ml, "volume_pred_ml": ml})
    cut = np.where(ref == 255, 0, pred)
    assert case_metrics(cut, np.where(ref == 255, 0, ref), [1], spacing) == {1: got}
    # an ignored voxel set to another class in the reference changes nothing either
    assert case_metrics(pred, ref, [1], spacing, ignore_label=255) == {1: got}


def test_2d_maps_and_anisotropic_pixels():
    ref = cube((20, 20), (5, 5), (15, 15))
    pred = np.roll(ref, 1, axis=1)
    got = case_metrics(pred, ref, [1], (1.0, 3.0), {1: 3.0})[1]
    assert got["hd95"] == pytest.approx(3.0) and got["nsd"] == 1.0 and got["volume_ref_ml"] == pytest.approx(100 * 3 / 1000)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"pred": np.zeros((4, 4, 4)), "spacing": (1, 1, 1)}, "prediction shape"),
        ({"spacing": (1, 1)}, "spacing must be 3 positive numbers"),
        ({"spacing": (1, 0, 1)}, "spacing must be 3 positive numbers"),
        ({"spacing": (1, 1, 1), "tolerances_mm": {1: -1.0}}, "NSD tolerances"),
        ({"spacing": (1, 1, 1), "tolerances_mm": {1: math.inf}}, "NSD tolerances"),
    ],
)
def test_bad_arguments_are_refused(kwargs, words):
    args = {"pred": np.zeros((4, 4, 5)), "ref": np.zeros((4, 4, 5)), "classes": [1], **kwargs}
    with pytest.raises(ValueError, match=words):
        case_metrics(**args)


# --- summaries and JSON ----------------------------------------------------------------------


def test_summary_excludes_nan_and_counts_the_cases():
    nan = math.nan
    cases = [
        {1: {**NAN_METRICS, "dice": 0.8, "hd95": 2.0}, 2: dict(NAN_METRICS)},
        {1: {**NAN_METRICS, "dice": 0.0, "hd95": nan}},  # a miss: no distance
        {1: {**NAN_METRICS, "dice": 0.6, "hd95": 6.0}},
        {},
    ]
    s = summarise_metrics(cases, [1, 2])
    assert s[1]["dice"] == {"mean": pytest.approx(1.4 / 3), "median": 0.6, "n": 3}
    assert s[1]["hd95"] == {"mean": 4.0, "median": 4.0, "n": 2}
    assert s[2]["dice"]["n"] == 0 and math.isnan(s[2]["dice"]["mean"]) and math.isnan(s[2]["dice"]["median"])
    text = json.dumps(nan_to_none(s), allow_nan=False)
    assert json.loads(text)["2"]["hd95"] == {"mean": None, "median": None, "n": 0}


def test_nan_to_none():
    assert nan_to_none({"a": [1.0, math.nan, (math.inf, 2)], "b": None, "c": "x", "d": 3}) == {"a": [1.0, None, [None, 2]], "b": None, "c": "x", "d": 3}


# --- the label schema's NSD tolerances ------------------------------------------------------

RAW = yaml.safe_load(DEFAULT_SCHEMA.read_text())


def _schema(**changes):
    raw = copy.deepcopy(RAW)
    raw.update(changes)
    return raw


def test_schema_tolerances_default_and_declared():
    plain = parse_schema({k: v for k, v in RAW.items() if k != "surface_tolerance_mm"}, "old.yaml")  # a schema from before the key
    assert plain.surface_tolerance_mm == {} and plain.surface_tolerance("liver") == DEFAULT_SURFACE_TOLERANCE_MM == 2.0
    s = parse_schema(_schema(surface_tolerance_mm={"liver": 5, "kidney": 3.5}), "s.yaml")
    assert s.surface_tolerance("liver") == 5.0 and s.surface_tolerance("kidney") == 3.5 and s.surface_tolerance("spleen") == 2.0
    assert isinstance(s.surface_tolerance_mm["liver"], float)


@pytest.mark.parametrize(
    "value, key, words",
    [
        ({"liver": -1}, "surface_tolerance_mm.liver", "must be > 0 and <= 50 (got -1)"),
        ({"liver": 0}, "surface_tolerance_mm.liver", "(got 0)"),
        ({"liver": "5mm"}, "surface_tolerance_mm.liver", "must be a number"),
        ({"liver": 80}, "surface_tolerance_mm.liver", "(got 80)"),
        ({"livr": 5}, "surface_tolerance_mm.livr", "not a foreground class; did you mean 'liver'?"),
        ({"background": 1}, "surface_tolerance_mm.background", "not a foreground class"),
        ([5, 3], "surface_tolerance_mm", ""),
    ],
)
def test_a_bad_schema_tolerance_names_the_file_and_the_key(tmp_path, value, key, words):
    path = tmp_path / "my-schema.yaml"
    path.write_text(yaml.safe_dump(_schema(surface_tolerance_mm=value)))
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(info.value).startswith(f"{path}: {key}: ") and words in str(info.value), str(info.value)
    assert info.value.key == key


def test_a_schema_file_with_tolerances_travels_through_a_spec(tmp_path):
    """The key survives what carries a schema to the sites and back (``schema_definition`` in the
    plan's arguments, the resolved spec) and is read again from there."""
    from coordinator import spec as spec_mod
    from pipelines.plan_args import parse_plan_args

    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(_schema(name="my-federation", surface_tolerance_mm={"liver": 5.0})))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: t\nplan: marginal\nsites: {tags: [x]}\nrounds: 1\nplan_args: {schema: fed.yaml}\n")
    spec = spec_mod.load(spec_file)
    raw = spec.model_args["schema_definition"]
    assert raw["surface_tolerance_mm"] == {"liver": 5.0}
    settings = parse_plan_args({k: v for k, v in spec.model_args.items() if k != "schema_definition"}, parse_schema(raw, "sent"))
    assert settings.schema.surface_tolerance("liver") == 5.0
    again = spec_mod.validate(spec.resolved_raw(), "resolved", base_dir=None)  # what `submit` sends and a run directory keeps
    assert again.model_args == spec.model_args


def test_the_shipped_schema_declares_the_flare_2023_tolerances():
    """abdominal-ct.yaml: the per-organ NSD tolerances of the FLARE 2023 evaluation (liver and
    pancreas 5 mm, kidneys and spleen 3 mm, tumours 2 mm)."""
    s = load_schema()
    assert {c: s.surface_tolerance(c) for c in s.classes if c != "background"} == {
        "kidney": 3.0, "kidney_tumor": 2.0, "liver": 5.0, "liver_tumor": 2.0, "pancreas": 5.0, "pancreas_tumor": 2.0, "spleen": 3.0,
    }  # fmt: skip
