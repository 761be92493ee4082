"""The schema's per-class empty-mask rule (``empty_mask_dice``): Dice, clinical metrics and QC flags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evaluation import dice_per_class
from pipelines.metrics import case_metrics
from preprocessing.qc_flags import case_flags
from preprocessing.schema import SchemaError, load_schema, parse_schema

PTX = 4


def test_the_chest_schema_scores_an_empty_pneumothorax_as_right():
    schema = load_schema("chest-xr")
    assert schema.empty_mask_one == frozenset({PTX})
    assert load_schema("abdominal-ct").empty_mask_one == frozenset()
    ref = np.zeros((8, 8, 1), np.uint8)
    ref[1:4, 1:4] = 1  # left lung only
    pred = ref.copy()
    d = dice_per_class(pred, ref, [1, 2, PTX], 255, schema.empty_mask_one)
    assert d[1] == 1.0 and math.isnan(d[2]) and d[PTX] == 1.0  # right lung absent from both: not scored; pneumothorax: right
    pred[6, 6] = PTX  # a pneumothorax where there is none: wrong, whatever the rule
    assert dice_per_class(pred, ref, [PTX], 255, schema.empty_mask_one)[PTX] == 0.0
    assert math.isnan(dice_per_class(ref, ref, [PTX], 255)[PTX])  # without the rule: not scored
    rows = case_metrics(ref, ref, [2, PTX], (0.5, 0.5, 1.0), empty_scores_one=schema.empty_mask_one)
    assert rows[PTX]["dice"] == 1.0 and rows[PTX]["nsd"] == 1.0 and rows[PTX]["volume_pred_ml"] == 0.0 and math.isnan(rows[PTX]["hd95"])
    assert math.isnan(rows[2]["dice"])


def test_an_empty_mask_of_such_a_class_is_a_full_label_in_qc():
    schema = load_schema("chest-xr")
    image = np.random.default_rng(0).random((32, 32, 1)).astype(np.float32)
    empty = np.zeros((32, 32, 1), np.uint8)
    flags, _ = case_flags(image, empty, [0.2, 0.2, 1.0], "DX", schema, [PTX], planar=True)
    assert flags == []  # a pneumothorax site's image without one: labelled, nothing missing
    lungs = empty.copy()
    lungs[2:10, 2:10] = 1
    flags, _ = case_flags(image, lungs, [0.2, 0.2, 1.0], "DX", schema, [1, 2, PTX], planar=True)
    assert flags == ["missing_right_lung"]  # the pneumothorax is never "missing"
    flags, _ = case_flags(image, empty, [0.2, 0.2, 1.0], "DX", schema, [1, PTX], planar=True)
    assert flags == ["label_empty"]  # a lung site's empty mask still is


def test_the_rule_is_checked_at_the_boundary():
    raw = {"format": "fedimg-label-schema", "name": "x", "version": "1.0.0", "classes": {"background": 0, "lesion": 1}}
    assert parse_schema({**raw, "empty_mask_dice": {"lesion": "skip"}}, "s.yaml").empty_mask_one == frozenset()
    with pytest.raises(SchemaError, match="s.yaml: empty_mask_dice.lesoin: not a foreground class.*lesion"):
        parse_schema({**raw, "empty_mask_dice": {"lesoin": "one"}}, "s.yaml")
    with pytest.raises(SchemaError, match="empty_mask_dice.lesion"):
        parse_schema({**raw, "empty_mask_dice": {"lesion": "zero"}}, "s.yaml")


def test_surface_distances_of_a_radiograph_are_taken_in_its_plane():
    """(X, Y, 1) as prepared: the same HD95/ASSD/NSD as the 2D masks, not those of a one-voxel-thick 3D shape."""
    ref = np.zeros((40, 40), np.uint8)
    ref[10:30, 10:30] = 1
    pred = np.zeros_like(ref)
    pred[12:32, 10:30] = 1  # shifted two pixels
    flat = case_metrics(pred, ref, [1], (0.5, 0.5))[1]
    planar = case_metrics(pred[:, :, None], ref[:, :, None], [1], (0.5, 0.5, 1.0))[1]
    for key in ("dice", "hd95", "assd", "nsd"):
        assert planar[key] == pytest.approx(flat[key]), key
    assert planar["hd95"] == pytest.approx(1.0)  # two pixels of 0.5 mm
