"""The per-site table of trained and test-only classes (the ConDistFL paper's Table 5 shape): its cells, its two
averages over cells, and where the run report and the comparison page show it."""

from __future__ import annotations

import json

import pytest
from test_forgetting_scores import forgetting_metrics
from test_report import STATE, html_row, make_run
from test_report_splits import split_metrics

from coordinator import report
from coordinator.report.reading import Scored
from coordinator.report.site_classes import (
    SITE_CLASSES_TEXT,
    SITE_CLASSES_TITLE,
    column_layout,
    has_test_only,
    site_cells,
    site_classes_records,
    site_classes_table,
)


def test_cells_and_averages_follow_the_paper():
    """Excluding *: the mean over trained cells; including *: over every cell (a class two sites score counts twice)."""
    rows = {
        "s1": {"dice_left_lung": 0.9, "ref_dice_right_lung": 0.5, "ref_dice_heart": 0.1, "cases": 4.0, "ref_cases": 3.0},
        "s2": {"dice_right_lung": 0.8, "ref_dice_left_lung": 0.3, "cases": 2.0, "ref_cases": 2.0},
        "s3": {"dice_heart": 0.7, "dice_mean": 0.7, "case0_dice_heart": 0.7, "cases": 1.0},  # no reference labels
    }
    record = site_cells(Scored("global, test cases", rows, "test"))
    assert record["sites"]["s1"] == {"trained": {"left_lung": 0.9}, "test_only": {"right_lung": 0.5, "heart": 0.1}, "cases": 4, "test_only_cases": 3}
    assert record["sites"]["s3"]["test_only"] == {} and record["sites"]["s3"]["test_only_cases"] is None
    assert record["average_excluding"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert record["average_including"] == pytest.approx((0.9 + 0.5 + 0.1 + 0.8 + 0.3 + 0.7) / 6)
    assert has_test_only(record) and not has_test_only(site_cells(Scored("x", {"s3": rows["s3"]}))) and not has_test_only(None)
    empty = site_cells(Scored("no rows", {}))
    assert empty == {"sites": {}, "average_excluding": None, "average_including": None}


def test_a_site_own_label_wins_over_a_reference_of_the_same_class():
    record = site_cells(Scored("g", {"s": {"dice_heart": 0.6, "ref_dice_heart": 0.1, "ref_dice_left_lung": 0.4}}))
    assert record["sites"]["s"]["test_only"] == {"left_lung": 0.4} and record["average_including"] == pytest.approx(0.5)


def test_the_table_groups_columns_by_site_in_schema_order():
    schema = {"background": 0, "left_lung": 1, "right_lung": 2, "heart": 3}
    a = site_cells(Scored("a", {"s1": {"dice_heart": 0.7, "ref_dice_left_lung": 0.2, "cases": 3.0}, "s0": {"dice_right_lung": 0.9, "cases": 2.0}}))
    b = site_cells(Scored("b", {"s1": {"dice_heart": 0.5, "ref_dice_right_lung": 0.4, "ref_dice_left_lung": 0.1, "cases": 3.0}}))
    assert column_layout([a, b], schema) == [("s0", "right_lung", False), ("s1", "left_lung", True), ("s1", "right_lung", True), ("s1", "heart", False)]
    table = site_classes_table([("fedavg", a), ("condistfl", b)], schema, "caption", "method")
    assert table.columns == ["method", "excluding *", "including *", "right_lung", "left_lung*", "right_lung*", "heart"]
    assert table.groups == [("", 1), ("average Dice", 2), ("s0 (n=2)", 1), ("s1 (n=3)", 3)]
    assert table.rows[0] == ["fedavg", pytest.approx(0.8), pytest.approx(0.6), 0.9, 0.2, None, 0.7]
    assert table.rows[1] == ["condistfl", 0.5, pytest.approx(1.0 / 3), None, 0.1, 0.4, 0.5]


CELLS = ("0.300", "0.394", "0.300", "0.300", "0.520", "0.320", "0.400", "0.200", "0.720")  # averages, then site-a's and site-b's cells


def test_the_run_report_shows_the_table_for_a_run_with_test_only_labels(tmp_path):
    records = site_classes_records(forgetting_metrics())
    g = records["global"]
    # best global model (after round 1), test cases: site-a liver/kidney 0.3 (reference spleen 0.52, pancreas 0.32),
    # site-b liver 0.4, spleen 0.2 (reference pancreas 0.72)
    assert g["average_excluding"] == pytest.approx(0.3) and g["average_including"] == pytest.approx((1.2 + 0.52 + 0.32 + 0.72) / 7)
    out = report.write_report(make_run(tmp_path, metrics=forgetting_metrics(), state=STATE), log=lambda _m: None)
    html, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert SITE_CLASSES_TITLE in html and SITE_CLASSES_TEXT in md
    assert html.index(SITE_CLASSES_TITLE) < html.index("Forgetting")
    # site-a: liver, kidney, spleen*, pancreas* (schema order); site-b: liver, spleen, pancreas*
    row = html_row("best global model (after round 1, selected on validation)", *CELLS)
    assert row in html
    plain = report.write_report(make_run(tmp_path / "plain", metrics=split_metrics(), state=STATE), log=lambda _m: None)
    assert SITE_CLASSES_TITLE not in (plain / "index.html").read_text()


def test_the_comparison_has_one_row_per_method(tmp_path):
    with_ref = make_run(tmp_path, "with-ref", metrics=forgetting_metrics())
    without = make_run(tmp_path, "without", metrics=split_metrics())
    out = report.compare_runs([with_ref, without], tmp_path / "cmp", labels=["condistfl", "fedavg"])
    html = (out / "index.html").read_text()
    assert SITE_CLASSES_TITLE in html and "best global model, test cases" in html and "each site&#x27;s best local model" in html
    assert html_row("condistfl", *CELLS) in html
    runs_json = json.loads((out / "comparison.json").read_text())["runs"]
    assert runs_json[0]["site_classes"]["global"]["sites"]["site-b"]["test_only"] == {"pancreas": pytest.approx(0.72)}
    assert not has_test_only(runs_json[1]["site_classes"]["global"])
    assert SITE_CLASSES_TITLE not in (report.compare_runs([without], tmp_path / "cmp2") / "index.html").read_text()
