"""Out-of-federation overlays: `coordinator evaluate` draws the best global model on the first cases,
the run report shows them (coordinator/report/overlays.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import cli
from test_report import EVALUATION, make_metrics, make_run

from coordinator import report, runs
from coordinator.evaluate import evaluate_run
from coordinator.report import overlays
from coordinator.spec import parse
from fedimg_testing.phantom import write_phantom_site
from pipelines.networks import build_network
from pipelines.transforms import deterministic_transforms
from preprocessing.dataset import load_dataset
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEMA = load_schema()
SPEC = """
name: overlays
plan: marginal
sites: {tags: [x]}
rounds: 2
plan_args:
  schema: abdominal-ct
  network: {name: basic_unet, features: [4, 4, 8, 8, 16, 4]}
  roi_size: [32, 32, 32]
  spacing: native
"""
SECTION = "Out-of-federation examples (best global model)"


# --- the slice and the rows ------------------------------------------------------------------


def test_the_slice_shown_has_the_most_reference_voxels_of_the_class():
    ref = np.zeros((6, 6, 5), dtype=np.uint8)
    ref[:2, :2, 1] = 2  # 4 voxels
    ref[:3, :3, 3] = 2  # 9 voxels: the most
    ref[:, :, 4] = 1  # another class, everywhere on slice 4
    pred = np.zeros_like(ref)
    pred[:, :, 0] = 2  # the prediction's largest slice of class 2 does not count while the reference has it
    assert overlays.pick_slice(ref, pred, 2) == 3
    assert overlays.pick_slice(ref, pred, 1) == 4
    # absent from the reference: the slice with the most predicted voxels
    pred[:1, :1, 2] = 5
    pred[:2, :2, 1] = 5
    assert overlays.pick_slice(ref, pred, 5) == 1
    with pytest.raises(ValueError, match="class 7 is neither"):
        overlays.pick_slice(ref, pred, 7)


def test_rows_are_the_scored_classes_in_the_reference_or_the_prediction():
    ref = np.zeros((4, 4, 3), dtype=np.uint8)
    ref[0, 0, 2] = 1
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = 3  # predicted only: a row (Dice 0)
    pred[2, 2, 0] = 4  # predicted but not scored: no row
    rows = overlays.overlay_rows(ref, pred, {1: "liver", 2: "kidney", 3: "spleen"}, {1: 0.0, 2: float("nan"), 3: 0.0})
    assert [(r.name, r.slice_index, r.dice) for r in rows] == [("liver", 2, 0.0), ("spleen", 1, 0.0)]


# --- coordinator evaluate ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def oof_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oof")
    site = write_phantom_site(tmp / "src", ["kidney", "liver", "spleen"], n_cases=2, seed=21, phase="non_contrast", shape=(32, 32, 16))
    out = tmp / "organs-only"
    prepare([site.dicom_dir], out, SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir],
            options=PrepareOptions(name="organs-only", qc_report=False))  # fmt: skip
    return out


def _run(home, name="ov"):
    run = runs.new_run(home, SPEC, name, resolved=parse(SPEC, "spec").resolved_raw())
    torch.manual_seed(0)
    net = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    (run / "checkpoints" / "local").mkdir(parents=True)
    torch.save(net.state_dict(), run / "checkpoints" / "best_global.pt")
    torch.save(net.state_dict(), run / "checkpoints" / "local" / "site-a_last.pt")
    runs.write_metrics(run, {"rounds": [], "best_global": {"model_round": 1, "score": 0.5}})
    return run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, oof_dataset):
    run = _run(tmp_path_factory.mktemp("home"))
    return run, evaluate_run(run, oof_dataset)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    from PIL import Image

    with Image.open(path) as img:
        img.verify()


def test_evaluate_draws_the_first_cases_of_the_best_global_model(evaluated, oof_dataset):
    run, record = evaluated
    entries = record["overlays"]
    assert [e["case"] for e in entries] == [1, 2]  # default 3, the dataset has 2 cases
    assert [e["path"] for e in entries] == ["report/overlays/oof_organs-only_case1.png", "report/overlays/oof_organs-only_case2.png"]
    assert sorted(p.name for p in (run / "report" / "overlays").iterdir()) == ["oof_organs-only_case1.png", "oof_organs-only_case2.png"]
    for e in entries:
        assert_png(run / e["path"])
        # the figure's Dice are the scores of the same prediction: the classes present in reference or prediction
        assert e["dice"] == pytest.approx(record["models"]["global"]["per_case"][e["case"] - 1])
        assert set(e["dice"]) <= {"kidney", "liver", "spleen"} and e["dice"]
    saved = json.loads((run / "evaluations" / "organs-only.json").read_text())
    assert saved["overlays"] == entries
    # each row's slice holds the most reference voxels of its class, on the grid that was scored
    dataset = load_dataset(oof_dataset)
    case = dataset.cases[0]
    chain = deterministic_transforms(SCHEMA, dataset.modality, spacing=None, label_dtype=torch.uint8)  # the spec's `spacing: native`
    label = chain({"image": str(case.image), "label": str(case.label)})["label"]
    ref = SCHEMA.lesion_merge_table()[np.asarray(label)[0].astype(np.int64)]
    checked = 0
    for name, z in entries[0]["slices"].items():
        counts = (ref == SCHEMA.classes[name]).sum(axis=(0, 1))
        if counts.any():  # else: predicted only, shown where most predicted
            assert counts[z] == counts.max()
            checked += 1
    assert checked == len({"kidney", "liver", "spleen"} & {n for n, i in SCHEMA.classes.items() if (ref == i).any()}) > 0


def test_overlays_option_limits_the_cases_and_zero_draws_none(tmp_path, oof_dataset):
    run = _run(tmp_path, "one")
    record = evaluate_run(run, oof_dataset, overlays=1)
    assert [e["path"] for e in record["overlays"]] == ["report/overlays/oof_organs-only_case1.png"]
    assert [p.name for p in (run / "report" / "overlays").iterdir()] == ["oof_organs-only_case1.png"]
    none = _run(tmp_path, "none")
    record = evaluate_run(none, oof_dataset, overlays=0)
    assert "overlays" not in record and not (none / "report").exists()
    assert record["models"]["global"]["per_case"]  # still scored


# --- the run report ---------------------------------------------------------------------------


def test_report_shows_the_overlays_and_keeps_them_when_rebuilt(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated[0], run)
    record = evaluated[1]
    for _ in range(2):  # a rebuilt report swaps its folder: the overlays must come along
        out = report.write_report(run, log=lambda _: None)
        page = (out / "index.html").read_text()
        assert SECTION in page
        for e in record["overlays"]:
            assert_png(out / "overlays" / f"oof_organs-only_case{e['case']}.png")
            assert f'<img src="overlays/oof_organs-only_case{e["case"]}.png"' in page
            scores = ", ".join(f"{c} {v:.3f}" for c, v in e["dice"].items())
            assert f"organs-only, case {e['case']}: Dice {scores}" in page
        assert "](overlays/oof_organs-only_case1.png)" in (out / "report.md").read_text()
    # the section follows the out-of-federation tables
    assert page.index("<h2>Out of federation</h2>") < page.index(SECTION) < page.index("<h2>Per-case Dice</h2>")


def test_an_old_run_without_overlays_reports_without_the_section(tmp_path):
    run = make_run(tmp_path, metrics=make_metrics(), evaluation=EVALUATION)
    out = report.write_report(run, log=lambda _: None)
    page = (out / "index.html").read_text()
    assert "<h2>Out of federation</h2>" in page and SECTION not in page and "overlays/" not in page
    assert not (out / "overlays").exists()


def test_report_shows_each_file_once_and_only_files_under_the_report(tmp_path):
    run = make_run(tmp_path, metrics=make_metrics(), evaluation=EVALUATION)
    folder = run / "report" / "overlays"
    folder.mkdir(parents=True)
    (folder / "oof_case1.png").write_bytes(PNG_SIGNATURE)
    (run / "secret.png").write_bytes(PNG_SIGNATURE)
    old = {**EVALUATION, "dataset": "older", "overlays": [{"case": 1, "path": "report/overlays/oof_case1.png", "dice": {"liver": 0.1}}]}
    new = {
        **EVALUATION,
        "dataset": "newer",
        "overlays": [
            {"case": 1, "path": "report/overlays/oof_case1.png", "dice": {"liver": 0.9}},
            {"case": 2, "path": "report/overlays/oof_case2.png", "dice": {}},  # file missing: not shown
            {"case": 3, "path": "report/../secret.png", "dice": {}},  # outside the report folder: not shown
        ],
    }
    (run / "evaluations" / "older.json").write_text(json.dumps(old))
    (run / "evaluations" / "newer.json").write_text(json.dumps(new))
    os.utime(run / "evaluations" / "older.json", (1_000_000, 1_000_000))  # written before: its figure was overwritten
    shown = overlays.report_overlays(run)
    assert [(o.name, o.caption) for o in shown] == [("overlays/oof_case1.png", "newer, case 1: Dice liver 0.900")]


def test_cli_option(tmp_path, oof_dataset):
    run = _run(tmp_path)
    res = cli("coordinator", "evaluate", run.name, "--home", tmp_path, "--data", oof_dataset, "--overlays", "1")
    assert res.returncode == 0, res.stderr
    assert "overlays (in the run directory): report/overlays/oof_organs-only_case1.png" in res.stdout
    assert (run / "report" / "overlays" / "oof_organs-only_case1.png").is_file() and not (run / "report" / "overlays" / "oof_organs-only_case2.png").exists()
    res = cli("coordinator", "evaluate", run.name, "--home", tmp_path, "--data", oof_dataset, "--overlays", "-1")
    assert res.returncode != 0 and "--overlays" in res.stderr
