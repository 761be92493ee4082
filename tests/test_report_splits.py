"""The run report and the comparison on a run with validation and test cases (issue 19).

A hand-built run: 3 rounds, 2 sites, validation and test rows for every model. Validation and
test disagree on the best global model (validation: the model after round 1; test: after round
3); the run selected on validation, and the report must show that model on both splits.
"""

from __future__ import annotations

import json

import pytest
from test_report import SCHEMA, STATE, assert_png, fmt, html_row, make_run, val_row

from coordinator import report

VAL_CASES = {
    "site-a": {"liver": [0.6, 0.8], "kidney": [0.4, 0.6]},
    "site-b": {"liver": [0.7, 0.9], "spleen": [0.3, 0.5]},
}
TEST_CASES = {"site-a": {"liver": [0.5], "kidney": [0.5]}, "site-b": {"liver": [0.6], "spleen": [0.4]}}
# shift of every Dice by the global model's round (0: the initial model): validation prefers round 1, test round 3
VAL_SHIFT = {0: -0.3, 1: 0.1, 2: 0.0, 3: -0.1}
TEST_SHIFT = {0: -0.3, 1: -0.2, 2: 0.0, 3: 0.1}
# local models by the round they were trained in: site-a's best on validation is round 2, site-b's round 3
LOCAL_VAL_SHIFT = {1: 0.0, 2: 0.15, 3: 0.05}
LOCAL_TEST_SHIFT = {1: 0.0, 2: -0.1, 3: 0.2}
BEST_LOCAL = {"site-a": 2, "site-b": 3}

# The selected global model (after round 1) by hand. Validation: site-a liver 0.8, kidney 0.6 (mean
# 0.7); site-b liver 0.9, spleen 0.5 (0.7); per class across sites liver 0.85, kidney 0.6, spleen 0.5,
# selection score 0.65. Test: site-a liver 0.3, kidney 0.3; site-b liver 0.4, spleen 0.2; across
# sites liver 0.35, kidney 0.3, spleen 0.2, mean 0.85 / 3.
SELECTED_VAL = {"liver": 0.85, "kidney": 0.6, "spleen": 0.5}
SELECTED_TEST = {"liver": 0.35, "kidney": 0.3, "spleen": 0.2}


def split_metrics(rounds: int = 3) -> dict:
    records = []
    for r in range(1, rounds + 1):
        sites = {}
        for i, name in enumerate(VAL_CASES):
            row = {
                "name": name,
                "samples": 4,
                "train_s": 1.0,
                "train": {"loss_mean": 1.0 / r, "cases_training": 4.0, "cases_validation": 2.0, "cases_test": 1.0},
                "val_global": val_row(VAL_CASES[name], VAL_SHIFT[r - 1]),
                "test_global": val_row(TEST_CASES[name], TEST_SHIFT[r - 1]),
                "val_local": val_row(VAL_CASES[name], LOCAL_VAL_SHIFT[r]),
                "test_local": val_row(TEST_CASES[name], LOCAL_TEST_SHIFT[r]),
            }
            if r == rounds:
                row["val_final"] = val_row(VAL_CASES[name], VAL_SHIFT[r])
                row["test_final"] = val_row(TEST_CASES[name], TEST_SHIFT[r])
            sites[f"NODE_{i}"] = row
        records.append({"round": r, "wall_s": 5.0, "bytes": {"to_sites": 1_000_000, "from_sites": 1_000_000}, "sites": sites})
    return {
        "rounds": records,
        "classes": SCHEMA,
        "plan": "condistfl",
        "mode": "federated",
        "rounds_planned": rounds,
        "split": {"validation": 0.25, "test": 0.25, "seed": 7},
        "weights": "equal",
        "splits": {name: {"training": 4, "validation": 2, "test": 1} for name in VAL_CASES},
        "best_global": {"model_round": 1, "score": 0.65, "test_score": 0.85 / 3},
        "best_local": {"site-a": {"round": 2, "score": 0.75, "test_score": 0.4}, "site-b": {"round": 3, "score": 0.65, "test_score": 0.7}},
    }


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("runs"), metrics=split_metrics(), state=STATE)
    out = report.write_report(run_dir, log=lambda _m: None)
    for name in ("dice_global.png", "boxplots.png", "learning_curves.png"):
        assert_png(out / name)
    return (out / "index.html").read_text(), (out / "report.md").read_text()


def test_the_selected_global_model_is_the_validation_best_on_both_splits():
    m = split_metrics()
    val, test = report.global_rows(m, "validation"), report.global_rows(m, "test")
    # the model after round 1 (scored at the start of round 2), not the test-best final model
    assert val.label == "best global model (after round 1, selected on validation), validation cases"
    assert test.label == "best global model (after round 1, selected on validation), test cases"
    assert report.class_means(val) == pytest.approx(SELECTED_VAL)
    assert report.class_means(test) == pytest.approx(SELECTED_TEST)
    assert report.scored_mean(val) == pytest.approx(0.65)
    # without a recorded best: the final model (round 3's *_final rows)
    m.pop("best_global")
    assert report.class_means(report.global_rows(m, "test")) == pytest.approx({"liver": 0.65, "kidney": 0.6, "spleen": 0.5})
    with pytest.raises(ValueError, match="split"):
        report.global_rows(m, "training")


def test_local_rows_are_each_sites_best_round_on_both_splits():
    m = split_metrics()
    val, test = report.local_rows(m, "validation"), report.local_rows(m, "test")
    assert val.rounds == test.rounds == BEST_LOCAL
    assert report.row_mean(val.rows["site-a"]) == pytest.approx(0.75)  # round 2: 0.6 + 0.15
    assert report.row_mean(test.rows["site-a"]) == pytest.approx(0.4)  # round 2: -0.1
    assert report.row_mean(test.rows["site-b"]) == pytest.approx(0.7)  # round 3: +0.2
    # a site without a recorded best: its last local model
    m["best_local"].pop("site-a")
    assert report.local_rows(m, "test").rounds == {"site-a": 3, "site-b": 3}


def test_global_section_shows_test_then_validation_then_side_by_side(page):
    html, md = page
    test_caption = "best global model (after round 1, selected on validation), test cases (never used for training or selection)"
    val_caption = "best global model (after round 1, selected on validation), validation cases (selected the model)"
    side_caption = "global model: validation (selected the model) and test (never used for training or selection)"
    assert html.index(test_caption) < html.index(val_caption) < html.index(side_caption)
    # test table: site-a liver 0.3, kidney 0.3; columns liver, kidney, spleen, pancreas, stomach, mean
    assert html_row("site-a", "0.300", "0.300", "", "", "", "0.300") in html
    assert html_row("mean across sites", "0.350", "0.300", "0.200", "", "", fmt(0.85 / 3)) in html
    # validation table: the selection score 0.65
    assert html_row("mean across sites", "0.850", "0.600", "0.500", "", "", "0.650") in html
    # side by side: validation cases (n), validation Dice, test cases (n), test Dice; cases summed in the last row
    assert "<th>site</th><th>validation cases</th><th>validation Dice</th><th>test cases</th><th>test Dice</th>" in html
    assert html_row("site-b", "2", "0.700", "1", "0.300") in html
    assert html_row("mean across sites", "4", "0.650", "2", fmt(0.85 / 3)) in html
    assert "test cases were never used for training or selection" in html
    assert "No test split" not in html
    assert "| site-b | 2 | 0.700 | 1 | 0.300 |" in md


def test_local_section_shows_best_local_per_site_on_test_and_its_validation_score(page):
    html, _ = page
    assert "<th>site</th><th>round</th><th>validation cases</th><th>validation Dice</th><th>test cases</th><th>test Dice</th>" in html
    assert html_row("site-a", "2", "2", "0.750", "1", "0.400") in html
    assert html_row("site-b", "3", "2", "0.650", "1", "0.700") in html


def test_header_shows_split_weights_and_sizes(page):
    html, _ = page
    assert html_row("split (shares of each site&#x27;s cases)", "validation 0.25, test 0.25, split seed 7") in html
    assert html_row("aggregation weights", "equal") in html
    assert html_row("best global model", f"after round 1 (selection score on validation 0.650; on test {fmt(0.85 / 3)})") in html
    assert "cases per site and split" in html
    assert html_row("site-a", "4", "2", "1") in html


def test_figures_are_drawn_from_the_test_rows(tmp_path, monkeypatch):
    seen = {}
    dice_global, box_panels = report.run_report.plot_dice_global, report.run_report.federation_box_panels

    def spy_dice(glob, classes):
        seen["dice_global"] = glob
        return dice_global(glob, classes)

    def spy_panels(glob, local, schema):
        seen["boxes"] = (glob, local)
        panels = box_panels(glob, local, schema)
        seen["panels"] = dict(panels)
        return panels

    monkeypatch.setattr(report.run_report, "plot_dice_global", spy_dice)
    monkeypatch.setattr(report.run_report, "federation_box_panels", spy_panels)
    report.write_report(make_run(tmp_path, metrics=split_metrics(), state=STATE), log=lambda _m: None)
    assert seen["dice_global"].split == "test"
    assert [s.split for s in seen["boxes"]] == ["test", "test"]
    liver = dict(seen["panels"]["liver"])
    assert sorted(liver["global"]) == pytest.approx([0.3, 0.4])  # the selected model's test cases, pooled
    assert liver["local site-a"] == pytest.approx([0.4])  # site-a's best local model (round 2) on its test case


def test_learning_curves_show_validation_selection_and_test_apart():
    c = report.learning_curves(split_metrics())
    assert max(c.selection, key=lambda p: p[1])[0] == 1  # validation picks the model after round 1
    assert max(c.test_score, key=lambda p: p[1])[0] == 3  # test would have picked the final model
    assert [x for x, _ in c.test_score] == [0, 1, 2, 3]
    assert c.global_dice["site-a"][1] == (1, pytest.approx(0.7))  # per-site lines: validation


def test_compare_runs_uses_test_rows_and_falls_back_with_a_note(tmp_path):
    from test_report import make_metrics

    new = make_run(tmp_path, "new", metrics=split_metrics())
    old = make_run(tmp_path, "old", metrics=make_metrics(plan="fedavg"))
    out = report.compare_runs([new, old], tmp_path / "cmp", labels=["ConDistFL", "FedAvg"])
    table = json.loads((out / "comparison.json").read_text())
    n, o = table["runs"]
    assert n["split"] == "test" and o["split"] == "validation"
    assert n["global"]["dice"] == pytest.approx(SELECTED_TEST)
    assert n["global"]["mean"] == pytest.approx(0.85 / 3)
    assert n["global_validation"]["mean"] == pytest.approx(0.65)
    assert n["local"]["dice"] == pytest.approx({"liver": (0.4 + 0.8) / 2, "kidney": 0.4, "spleen": 0.6})
    page = (out / "index.html").read_text()
    assert "No test split in this run (FedAvg)" in page
    assert '<th colspan="6">global in-fed, test</th>' in page and "<th>global mean</th>" in page
    row = html_row("ConDistFL", "0.350", "0.300", "0.200", "", "", fmt(0.85 / 3))
    assert row[: -len("</tr>")] in page
    assert "<th>FedAvg *</th>" in page.replace(' scope="row"', "")


def test_seed_summary_gives_mean_sd_and_n_per_method():
    def record(method: str, score: float | None, split: str = "test") -> dict:
        return {"method": method, "split": split, "global": {"mean": score}}

    records = [
        record("fedavg seed 0", 0.2),
        record("fedavg seed 1", 0.4),
        record("fedavg seed 2", 0.6),
        record("condistfl seed 0", 0.5),
        record("condistfl seed 1", 0.7, split="validation"),  # no test split: left out, counted
        record("other", 0.9),
    ]
    method_of = {
        "fedavg seed 0": "fedavg",
        "fedavg seed 1": "fedavg",
        "fedavg seed 2": "fedavg",
        "condistfl seed 0": "condistfl",
        "condistfl seed 1": "condistfl",
    }
    out = report.seed_summary(records, method_of)
    assert set(out) == {"fedavg", "condistfl"}
    assert out["fedavg"]["n"] == 3 and out["fedavg"]["mean"] == pytest.approx(0.4)
    assert out["fedavg"]["sd"] == pytest.approx(0.2)  # sample sd: sqrt((0.04 + 0 + 0.04) / 2)
    assert out["fedavg"]["values"] == pytest.approx([0.2, 0.4, 0.6])
    assert out["condistfl"] == {"values": [0.5], "without_test": 1, "n": 1, "mean": 0.5, "sd": None}
