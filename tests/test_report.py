"""Run report and run comparison on synthetic run directories with hand-computed numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from coordinator import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEMA = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4, "stomach": 5}

# Per-case Dice of the final global model on each site's validation cases; each site labels
# two classes. Other rows are shifted copies (see val_row).
CASES = {
    "site-a": {"liver": [0.8, 0.6], "kidney": [0.5, 0.7]},
    "site-b": {"liver": [0.9, 0.7], "spleen": [0.4, 0.6]},
    "site-c": {"kidney": [0.3, 0.5], "pancreas": [0.2, 0.4]},
}
# Final global model, per class, mean across the sites that label it (by hand):
# liver (0.7 + 0.8) / 2, kidney (0.6 + 0.4) / 2, spleen 0.5, pancreas 0.3; stomach never scored.
GLOBAL_MEANS = {"liver": 0.75, "kidney": 0.5, "spleen": 0.5, "pancreas": 0.3}
# Local models of round 3 (shift +0.05): liver (0.75 + 0.85) / 2, kidney (0.65 + 0.45) / 2, ...
LOCAL_MEANS = {"liver": 0.8, "kidney": 0.55, "spleen": 0.55, "pancreas": 0.35}


def val_row(cases: dict[str, list[float]], shift: float = 0.0) -> dict:
    row, means = {}, []
    for cls, values in cases.items():
        values = [min(1.0, max(0.0, v + shift)) for v in values]
        for j, v in enumerate(values):
            row[f"case{j}_dice_{cls}"] = v
        row[f"dice_{cls}"] = sum(values) / len(values)
        means.append(row[f"dice_{cls}"])
    row["dice_mean"] = sum(means) / len(means)
    row["cases"] = float(max(len(v) for v in cases.values()))
    return row


def site_row(name: str, r: int, rounds: int, cases: dict, shift: float = 0.0) -> dict:
    row = {
        "name": name,
        "samples": 4,
        "train_s": 1.5,
        "request_s": 2.0,
        "train": {
            "loss_mean": 1.0 / r,
            "sup_loss": 0.8 / r,
            "condist_loss": 0.2,
            "lambda": 0.5 * r,
            "step_s": 0.1,
            "teacher_s": 0.02,
        },
        "val_global": val_row(cases, shift - 0.1 * (rounds + 1 - r)),
        "val_local": val_row(cases, shift + 0.05 * (r - 2)),
    }
    if r == rounds:
        row["val_final"] = val_row(cases, shift)
    return row


def make_metrics(cases=CASES, rounds: int = 3, shift: float = 0.0, plan: str = "condistfl") -> dict:
    records = []
    for r in range(1, rounds + 1):
        sites = {f"NODE_{i}": site_row(name, r, rounds, c, shift) for i, (name, c) in enumerate(cases.items())}
        records.append(
            {
                "round": r,
                "wall_s": 10.0 * r,
                "update_norm": 1.0,
                "bytes": {"to_sites": 3_000_000, "from_sites": 2_000_000},
                "sites": sites,
            }
        )
    return {
        "rounds": records,
        "model": {"parameters": 250_000, "bytes": 1_000_000},
        "classes": SCHEMA,
        "plan": plan,
        "mode": "federated",
        "local_steps": 5,
        "rounds_planned": rounds,
        "best_global": {"model_round": rounds, "score": 0.5125},
        "best_local": {name: {"round": rounds, "score": 0.7} for name in cases},
    }


STATE = {
    "run_id": "20260101-000000-test-abcd",
    "name": "test",
    "status": "done",
    "started": "2026-01-01T00:00:00+0000",
    "finished": "2026-01-01T00:01:40+0000",
}

EVALUATION = {
    "dataset": "oof-site",
    "cases": 3,
    "merge_lesions": True,
    "classes": ["kidney", "liver", "pancreas", "spleen"],
    "models": {
        "global": {
            "label": "global (round 3)",
            "per_case": [
                {"kidney": 0.8, "liver": 0.7, "pancreas": 0.5, "spleen": 0.9},
                {"kidney": 0.6, "liver": 0.9, "spleen": 0.7},  # pancreas NaN: absent
                {"kidney": 0.7, "liver": 0.8, "pancreas": 0.3, "spleen": 0.8},
            ],
            "mean": {"kidney": 0.7, "liver": 0.8, "pancreas": 0.4, "spleen": 0.8},
            "mean_all": 0.675,
        },
        "local:site-a": {
            "label": "local site-a (round 3)",
            "per_case": [{"kidney": 0.4, "liver": 0.6}, {"kidney": 0.2, "liver": 0.5}, {"kidney": 0.3, "liver": 0.4}],
            "mean": {"kidney": 0.3, "liver": 0.5, "pancreas": float("nan"), "spleen": 0.0},
            "mean_all": 0.2,
        },
    },
}


def make_run(root: Path, name: str = "run", metrics: dict | None = None, state: dict | None = None, evaluation: dict | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "state.json").write_text(json.dumps(state if state is not None else {**STATE, "run_id": name}))
    if evaluation is not None:
        (run_dir / "evaluations").mkdir()
        (run_dir / "evaluations" / f"{evaluation['dataset']}.json").write_text(json.dumps(evaluation))
    return run_dir


def html_row(header: str, *cells: str) -> str:
    return f'<tr><th scope="row">{header}</th>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def fmt(v: float) -> str:
    return f"{v:.3f}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full report (3 sites, 3 rounds, one evaluation file), built once for the module."""
    run_dir = make_run(tmp_path_factory.mktemp("runs"), metrics=make_metrics(), state=STATE, evaluation=EVALUATION)
    messages = []
    out = report.write_report(run_dir, log=messages.append)
    return run_dir, out, messages


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on Pillow
        import matplotlib.image

        assert matplotlib.image.imread(path).size > 0
        return
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


# --- the run report ------------------------------------------------------------------------


def test_report_files_are_written_and_pngs_are_valid(built):
    run_dir, out, messages = built
    assert out == run_dir / "report"
    names = {p.name for p in out.iterdir()}
    assert names == {"index.html", "report.md", "dice_global.png", "boxplots.png", "boxplots_oof.png", "learning_curves.png"}
    for name in names - {"index.html", "report.md"}:
        assert_png(out / name)
    # no temporary folder left beside the report
    assert sorted(p.name for p in run_dir.iterdir()) == ["evaluations", "metrics.json", "report", "state.json"]
    assert any("index.html" in m for m in messages)


def test_page_is_self_contained_and_references_images_relatively(built):
    _, out, _ = built
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for name in ("dice_global.png", "boxplots.png", "boxplots_oof.png", "learning_curves.png"):
        assert f'<img src="{name}"' in page
        assert f"]({name})" in (out / "report.md").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "20260101-000000-test-abcd" in page and "condistfl" in page and "federated" in page
    assert html_row("rounds", "3 / 3") in page


def test_global_table_has_hand_computed_means_across_sites(built):
    _, out, _ = built
    page = (out / "index.html").read_text()
    assert "best global model (after round 3, selected on validation), validation cases" in page
    # a run from before issue 19: validation numbers as before, and the report says there is no test split
    assert "No test split in this run" in page and "never used for training or selection" not in page
    order = ["liver", "kidney", "spleen", "pancreas"]  # schema order; stomach never scored: empty column
    assert "<th>liver</th><th>kidney</th><th>spleen</th><th>pancreas</th><th>stomach</th><th>mean</th>" in page
    selection = sum(GLOBAL_MEANS.values()) / 4
    expected = html_row("mean across sites", *[fmt(GLOBAL_MEANS[c]) for c in order], "", fmt(selection))
    assert expected in page
    # site-a: liver (0.8 + 0.6) / 2, kidney (0.5 + 0.7) / 2, other classes empty, mean 0.65
    assert html_row("site-a", "0.700", "0.600", "", "", "", "0.650") in page
    md = (out / "report.md").read_text()
    assert "| mean across sites | 0.750 | 0.500 | 0.500 | 0.300 |  | " + fmt(selection) + " |" in md


def test_local_table_scores_only_labelled_classes(built):
    _, out, _ = built
    page = (out / "index.html").read_text()
    assert "best local models (selected on each site&#x27;s validation cases; trained in round 3), validation cases" in page
    assert "only on the classes that site labels" in page
    assert html_row("site-b", "0.850", "", "0.550", "", "", "0.700") in page
    order = ["liver", "kidney", "spleen", "pancreas"]
    assert html_row("mean across sites", *[fmt(LOCAL_MEANS[c]) for c in order], "", fmt(sum(LOCAL_MEANS.values()) / 4)) in page
    assert html_row("site-c", "3", "2", "0.400", "", "") in page  # best local round, validation cases and Dice; no test cells


def test_out_of_federation_table(built):
    _, out, _ = built
    page = (out / "index.html").read_text()
    assert "oof-site (3 cases, lesions merged into their organs)" in page
    assert "<th>model</th><th>kidney</th><th>liver</th><th>pancreas</th><th>spleen</th><th>mean</th>" in page
    assert html_row("global (round 3)", "0.700", "0.800", "0.400", "0.800", "0.675") in page
    assert html_row("local site-a (round 3)", "0.300", "0.500", "", "0.000", "0.200") in page  # NaN: empty


def test_out_of_federation_clinical_metrics_table(tmp_path):
    """An evaluation with clinical metrics (``metrics_mean``) gets a second table under its Dice
    table: per model and class the means, the NSD tolerance and the two counts; an older
    evaluation (Dice only) gets none."""

    def summary(mean, n):
        return {"mean": mean, "median": mean, "n": n}

    liver = {"dice": summary(0.9, 3), "hd95": summary(4.25, 2), "assd": summary(1.5, 2), "nsd": summary(0.8, 3), "rvd": summary(-0.1, 3)}
    spleen = {m: summary(None, 0) for m in ("dice", "hd95", "assd", "nsd", "rvd")}
    global_model = {**EVALUATION["models"]["global"], "metrics_mean": {"liver": liver, "spleen": spleen}}
    evaluation = {**EVALUATION, "classes": ["liver", "spleen"], "models": {"global": global_model}, "surface_tolerance_mm": {"liver": 5.0, "spleen": 2.0}}
    run_dir = make_run(tmp_path, metrics=make_metrics(), state=STATE, evaluation=evaluation)
    (ev,) = report.read_evaluations(run_dir)
    table = report.evaluation_metrics_table(ev)
    assert table.columns == ["model", "class", "Dice", "HD95 (mm)", "ASSD (mm)", "NSD", "NSD tolerance (mm)", "RVD", "cases scored", "cases with both masks"]
    assert table.rows == [
        ["global (round 3)", "liver", 0.9, 4.25, 1.5, 0.8, "5", -0.1, 3, 2],
        ["global (round 3)", "spleen", None, None, None, None, "2", None, 0, 0],
    ]
    page = (report.write_report(run_dir, log=lambda _: None) / "index.html").read_text()
    assert "<th>HD95 (mm)</th>" in page and "Metrics and empty masks" in page
    assert html_row("global (round 3)", "liver", "0.900", "4.250", "1.500", "0.800", "5", "-0.100", "3", "2") in page
    (old,) = report.read_evaluations(make_run(tmp_path, "old", metrics=make_metrics(), state=STATE, evaluation=EVALUATION))
    assert report.evaluation_metrics_table(old) is None


def test_cost_table(built):
    _, out, _ = built
    page = (out / "index.html").read_text()
    assert html_row("model parameters", "250,000") in page
    assert html_row("model size (MB)", "1.000") in page
    assert html_row("sent to sites per round, mean (MB)", "3.000") in page
    assert html_row("sent to sites, total (MB)", "9.000") in page
    assert html_row("received from sites, total (MB)", "6.000") in page
    assert html_row("sent + received, total (MB)", "15.000") in page
    assert html_row("paper&#x27;s estimate 2 × rounds × clients × model size (MB)", "18.000 (2 × 3 rounds × 3 clients × 1.000 MB)") in page
    assert html_row("wall time, sum of rounds (s)", "60.0") in page
    assert html_row("wall time, run start to finish (s)", "100.0") in page
    assert html_row("local step, mean (ms)", "100.0") in page
    assert html_row("teacher forward per step, mean (ms)", "20.0") in page


def test_learning_curves_numbers():
    c = report.learning_curves(make_metrics())
    assert c.loss["site-a"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [x for x, _ in c.selection] == [0, 1, 2, 3]  # val_global scores the model of round r-1, val_final round 3
    assert c.selection[-1][1] == pytest.approx(sum(GLOBAL_MEANS.values()) / 4)
    assert c.lam == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert c.local_dice["site-c"][-1] == (3, pytest.approx(0.4))


def test_boxplot_panels_pool_global_cases_and_keep_local_models_apart():
    m = make_metrics()
    panels = dict(report.federation_box_panels(report.global_rows(m), report.local_rows(m), SCHEMA))
    assert list(panels) == ["liver", "kidney", "spleen", "pancreas"]
    liver = dict(panels["liver"])
    assert sorted(liver["global"]) == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert sorted(liver["local site-a"]) == pytest.approx([0.65, 0.85])
    assert liver["local site-c"] == []
    oof = dict(report.oof_box_panels(report.read_evaluations(Path("/nonexistent"))))
    assert oof == {}


def test_failed_run_with_lost_round_and_no_val_final(tmp_path):
    m = make_metrics()
    # stopped after round 2's record; round 3's metrics lost (resume); best global: model of round 1
    for site in m["rounds"][2]["sites"].values():
        site.pop("val_final")
    m["rounds"][2] = {"round": 3, "wall_s": 0.0, "update_norm": float("nan"), "sites": {}, "metrics_lost": True}
    m["rounds"][1].pop("bytes")
    m["best_global"] = {"model_round": 1, "score": 0.4}
    m["model"] = {}
    state = {"run_id": "failed", "status": "failed", "started": "2026-01-01T00:00:00+0000", "error": "node lost"}
    run_dir = make_run(tmp_path, metrics=m, state=state)
    out = report.write_report(run_dir, log=lambda _m: None)
    page = (out / "index.html").read_text()
    # the best global model (after round 1) was scored by the sites at the start of round 2
    assert "best global model (after round 1, selected on validation)" in page
    assert html_row("site-a", "0.500", "0.400", "", "", "", "0.450") in page  # round 2: shift -0.2
    assert html_row("rounds done", "3 / 3 (1 with metrics lost)") in page
    assert html_row("sent + received, total (MB)", "5.000") in page  # round 1 only
    assert html_row("wall time, run start to finish (s)", "") in page
    assert html_row("error", "node lost") in page
    for name in ("dice_global.png", "boxplots.png", "learning_curves.png"):
        assert_png(out / name)
    assert not (out / "boxplots_oof.png").exists()
    assert "No out-of-federation evaluation" in page


def test_run_without_metrics_or_state_fields(tmp_path):
    run_dir = make_run(tmp_path, metrics=None, state={})
    (run_dir / "evaluations").mkdir()
    (run_dir / "evaluations" / "broken.json").write_text("{not json")
    messages = []
    out = report.write_report(run_dir, log=messages.append)
    page = (out / "index.html").read_text()
    assert html_row("run id", "run") in page
    assert "nothing recorded" in page
    assert any("broken.json" in m for m in messages)
    assert_png(out / "learning_curves.png")


def test_existing_report_is_kept_when_building_fails(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, metrics=make_metrics(), state=STATE)
    out = report.write_report(run_dir, log=lambda _m: None)
    (out / "marker.txt").write_text("old report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report.run_report, "plot_learning_curves", broken)  # where build_report looks it up
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_report(run_dir, log=lambda _m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "report", "state.json"]

    monkeypatch.undo()
    report.write_report(run_dir, log=lambda _m: None)  # a successful build replaces the whole folder
    assert not (out / "marker.txt").exists()
    assert (out / "index.html").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "report", "state.json"]


def test_site_names_and_text_are_html_escaped(tmp_path):
    evil = "<script>alert('x')</script>"
    cases = {evil: CASES["site-a"], "site-b": CASES["site-b"]}
    state = {**STATE, "run_id": "run & <b>bold</b>"}
    run_dir = make_run(tmp_path, metrics=make_metrics(cases=cases), state=state)
    out = report.write_report(run_dir, log=lambda _m: None)
    page = (out / "index.html").read_text()
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "run &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    md = (out / "report.md").read_text()
    assert "<script" not in md and "&lt;script&gt;" in md


def test_cell_formatting():
    assert report.cell(None) == ""
    assert report.cell(float("nan")) == ""
    assert report.cell(0.5) == "0.500"
    assert report.cell(3) == "3"
    assert report.cell("a") == "a"


# --- comparing runs -------------------------------------------------------------------------


def test_compare_runs(tmp_path):
    fedavg = make_run(tmp_path, "fedavg-run", metrics=make_metrics(shift=-0.1, plan="fedavg"))
    condist = make_run(tmp_path, "condist-run", metrics=make_metrics(), evaluation=EVALUATION)
    out = report.compare_runs([fedavg, condist], tmp_path / "cmp", labels=["FedAvg", "ConDistFL"])
    assert out == tmp_path / "cmp"
    assert {p.name for p in out.iterdir()} == {"index.html", "comparison.md", "comparison.json", "methods_global.png"}
    assert_png(out / "methods_global.png")

    table = json.loads((out / "comparison.json").read_text())
    assert table["classes"] == ["liver", "kidney", "spleen", "pancreas", "stomach"]
    assert table["oof_datasets"] == {"oof-site": ["kidney", "liver", "pancreas", "spleen"]}
    a, c = table["runs"]
    assert [a["method"], c["method"]] == ["FedAvg", "ConDistFL"]
    assert c["global"]["dice"] == pytest.approx(GLOBAL_MEANS)
    assert c["global"]["mean"] == pytest.approx(sum(GLOBAL_MEANS.values()) / 4)
    assert a["global"]["dice"] == pytest.approx({k: v - 0.1 for k, v in GLOBAL_MEANS.items()})
    assert c["local"]["dice"] == pytest.approx(LOCAL_MEANS)
    assert a["local"]["mean"] == pytest.approx(sum(LOCAL_MEANS.values()) / 4 - 0.1)
    oof_global = {"dice": {"kidney": 0.7, "liver": 0.8, "pancreas": 0.4, "spleen": 0.8}, "mean": 0.675}
    assert c["oof"]["oof-site"]["global"] == oof_global
    assert c["oof"]["oof-site"]["local_mean"]["dice"] == {"kidney": 0.3, "liver": 0.5, "spleen": 0.0}
    assert a["oof"] == {}
    assert a["rounds_done"] == 3 and a["mb_total"] == pytest.approx(15.0) and a["wall_s"] == pytest.approx(100.0)

    # runs without test cases: in-fed columns fall back to validation, marked and explained
    assert a["split"] == c["split"] == "validation"
    assert c["global_validation"]["mean"] == pytest.approx(sum(GLOBAL_MEANS.values()) / 4)
    page = (out / "index.html").read_text()
    assert '<th colspan="6">global in-fed, validation (no test split)</th>' in page
    assert "No test split in these runs (FedAvg, ConDistFL)" in page
    selection = fmt(sum(GLOBAL_MEANS.values()) / 4)
    row = html_row("ConDistFL *", *[fmt(GLOBAL_MEANS[k]) for k in ("liver", "kidney", "spleen", "pancreas")], "", selection)
    assert row[: -len("</tr>")] in page
    assert re.search(r"<td>0\.675</td><td>3</td><td>15\.000</td><td>100\.0</td></tr>", page)
    md = (out / "comparison.md").read_text()
    assert "| global in-fed, validation (no test split): liver |" in md and "| FedAvg * |" in md


def test_compare_runs_default_labels_and_missing_data(tmp_path):
    first = make_run(tmp_path, "one", metrics=make_metrics(plan="fedavg"))
    second = make_run(tmp_path, "two", metrics=make_metrics(plan="fedavg"))
    empty = make_run(tmp_path, "empty", metrics=None, state={})
    out = report.compare_runs([first, second, empty], tmp_path / "cmp")
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["fedavg (federated) [one]", "fedavg (federated) [two]", "? (?)"]
    assert runs[2]["global"]["mean"] is None and runs[2]["mb_total"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for r in runs for v in r.values())
    with pytest.raises(ValueError):
        report.compare_runs([first], tmp_path / "cmp2", labels=["a", "b"])


# --- metrics.json through its model -----------------------------------------------------------


def test_metrics_json_round_trips_through_its_model_and_old_keys_stay(tmp_path):
    from coordinator import runs

    m = make_metrics()
    m["rounds"][0]["update_norm"] = float("nan")  # a lost round's norm: kept as NaN
    m["rounds"][0]["sites"]["NODE_0"]["legacy_field"] = {"any": "thing"}  # a key an older version wrote
    m["legacy_top"] = [1, 2]
    run_dir = make_run(tmp_path, metrics=m)
    runs.write_metrics(run_dir, runs.read_metrics(run_dir))
    again = json.loads((run_dir / "metrics.json").read_text())
    assert math.isnan(again["rounds"][0].pop("update_norm"))
    del m["rounds"][0]["update_norm"]
    assert again == json.loads(json.dumps(m))
    assert (report.write_report(run_dir, log=lambda _m: None) / "index.html").is_file()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not a readable JSON file"),
        (json.dumps({"rounds": [{"round": "three", "sites": {}}]}), "rounds[0].round"),
        (json.dumps({"rounds_planned": 3, "best_local": {"site-a": {"round": [1]}}}), "best_local.site-a.round"),
    ],
)
def test_a_bad_metrics_json_is_one_clear_error(tmp_path, content, needle):
    from coordinator import runs
    from fedimg_core.errors import ConfigError

    run_dir = make_run(tmp_path, metrics={})
    (run_dir / "metrics.json").write_text(content)
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        runs.read_metrics(run_dir)
    assert str(run_dir / "metrics.json") in str(err.value)
    with pytest.raises(ConfigError):
        report.write_report(run_dir, log=lambda _m: None)
    assert not (run_dir / "report").exists()


def test_writing_metrics_of_the_wrong_type_fails_where_they_are_written(tmp_path):
    from pydantic import ValidationError

    from coordinator import runs

    with pytest.raises(ValidationError):
        runs.write_metrics(tmp_path, {"rounds": [{"round": 1, "sites": {"N": {"train": {"loss_mean": "low"}}}}]})
    assert not (tmp_path / "metrics.json").exists()


def test_scoring_time_per_site_and_round_sums_the_models_a_site_scored():
    """eval_s of every scoring of a round (global before training, local after, final) adds up per site and round."""
    from coordinator.report.numbers import cost_summary

    row = {"name": "a", "train": {}, "val_global": {"dice_mean": 0.1, "eval_s": 2.0}, "val_local": {"dice_mean": 0.2, "eval_s": 3.0}}
    last = {**row, "val_final": {"dice_mean": 0.3, "eval_s": 4.0}}
    metrics = {"rounds": [{"round": 1, "sites": {"N1": row}}, {"round": 2, "sites": {"N1": last, "N2": {"name": "b", "train": {}}}}]}
    # site b scored nothing in round 2 (validate_every): it counts 0, so a sparser schedule shows its saving
    assert cost_summary(metrics, {})["eval_s_mean"] == pytest.approx((5.0 + 9.0 + 0.0) / 3)
    assert cost_summary({"rounds": [{"round": 1, "sites": {"N1": {"name": "a"}}}]}, {})["eval_s_mean"] is None
