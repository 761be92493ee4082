"""`coordinator evaluate`: out-of-federation scoring of a run's checkpoints (no FL processes)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli

from coordinator import runs
from coordinator.evaluate import evaluate_run
from coordinator.spec import parse
from fedimg_testing.phantom import write_phantom_site
from pipelines.networks import build_network
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema
from site_agent.errors import UserError

SCHEMA = load_schema()
SPEC = """
name: oof
plan: marginal
sites: {tags: [x]}
rounds: 2
plan_args:
  schema: abdominal-ct
  network: {name: basic_unet, features: [4, 4, 8, 8, 16, 4]}
  roi_size: [32, 32, 32]
  spacing: native
"""


def _dataset(tmp, classes, name, phase="non_contrast"):
    site = write_phantom_site(tmp / f"{name}-src", classes, n_cases=2, seed=21, phase=phase, shape=(32, 32, 16))
    out = tmp / name
    prepare([site.dicom_dir], out, SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir],
            options=PrepareOptions(name=name, qc_report=False))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    spec = parse(SPEC, "spec")
    run = runs.new_run(home, SPEC, "oof", resolved=spec.resolved_raw())
    torch.manual_seed(0)
    net = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    (run / "checkpoints" / "local").mkdir(parents=True)
    torch.save(net.state_dict(), run / "checkpoints" / "best_global.pt")
    torch.save(net.state_dict(), run / "checkpoints" / "local" / "site-a_last.pt")
    runs.write_metrics(run, {"rounds": [], "best_global": {"model_round": 1, "score": 0.5}})
    return run


def test_a_sites_best_local_model_is_scored_when_the_run_selected_one(tmp_path, organs_only):
    """The local model out of federation is the one selected on the site's validation cases, as in the report."""
    run = runs.new_run(tmp_path, SPEC, "oof-best", resolved=parse(SPEC, "spec").resolved_raw())
    torch.manual_seed(0)
    best = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    last = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    (run / "checkpoints" / "local").mkdir(parents=True)
    torch.save(best.state_dict(), run / "checkpoints" / "best_global.pt")
    torch.save(best.state_dict(), run / "checkpoints" / "local" / "site-a_best.pt")
    torch.save(last.state_dict(), run / "checkpoints" / "local" / "site-a_last.pt")
    torch.save(last.state_dict(), run / "checkpoints" / "local" / "site-b_last.pt")  # no best: its last model
    runs.write_metrics(run, {"rounds": [], "best_global": {"model_round": 1, "score": 0.5}, "best_local": {"site-a": {"round": 2, "score": 0.4}}})
    record = evaluate_run(run, organs_only)
    assert record["models"]["local:site-a"]["label"] == "local site-a (best on validation, round 2)"
    assert record["models"]["local:site-b"]["label"] == "local site-b (last round)"
    assert record["models"]["local:site-a"]["per_case"] == record["models"]["global"]["per_case"]  # the best file was scored
    assert record["models"]["local:site-b"]["per_case"] != record["models"]["global"]["per_case"]


@pytest.fixture(scope="module")
def organs_only(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("oof"), ["kidney", "liver", "spleen"], "organs-only")


def test_organs_only_dataset_is_scored_with_lesions_merged(run_dir, organs_only):
    record = evaluate_run(run_dir, organs_only)
    assert record["merge_lesions"] is True and record["classes"] == ["kidney", "liver", "spleen"]
    assert set(record["models"]) == {"global", "local:site-a"}
    assert record["models"]["global"]["label"] == "global (best, round 1)"
    for m in record["models"].values():
        assert len(m["per_case"]) == 2
        assert all(0.0 <= v <= 1.0 for case in m["per_case"] for v in case.values())
        assert set(m["mean"]) <= {"kidney", "liver", "spleen"}
    # same weights in both checkpoints: same scores
    assert record["models"]["global"]["per_case"] == record["models"]["local:site-a"]["per_case"]
    saved = json.loads((run_dir / "evaluations" / "organs-only.json").read_text())
    assert saved["classes"] == record["classes"] and saved["cases"] == 2


def test_a_perfect_model_scores_one(run_dir, organs_only, tmp_path, monkeypatch):
    """Replace the network's prediction by the reference itself: every scored Dice and NSD is 1,
    every distance 0 mm, every volume difference 0."""
    import coordinator.evaluate as ev
    import pipelines.training as tr

    def oracle(model, image, label, settings, merge_lesion_classes=False):
        ref = label[0].numpy() if label.dim() == 4 else label.numpy()
        table = settings.schema.lesion_merge_table()
        ref = table[ref] if merge_lesion_classes else ref
        return ref, ref

    monkeypatch.setattr(tr, "case_label_maps", oracle)
    record = ev.evaluate_run(run_dir, organs_only)
    for m in record["models"].values():
        assert m["mean"] == {"kidney": 1.0, "liver": 1.0, "spleen": 1.0} and m["mean_all"] == 1.0
        for organ, row in m["metrics_mean"].items():
            assert row["dice"]["mean"] == row["nsd"]["mean"] == 1.0 and row["hd95"]["mean"] == row["assd"]["mean"] == row["rvd"]["mean"] == 0.0, organ
            assert row["dice"]["n"] == row["hd95"]["n"] == sum(organ in case for case in m["per_case"]) > 0
            assert row["volume_ref_ml"]["mean"] == row["volume_pred_ml"]["mean"] > 0


def test_clinical_metrics_are_recorded_per_case_and_class_with_nulls_and_counts(run_dir, organs_only):
    """Beside the Dice keys: per case and class every metric of `pipelines.metrics` (null where
    undefined), per class their mean, median and count, the NSD tolerances and each case's grid
    spacing; the file is strict JSON (no NaN)."""
    from pipelines.metrics import METRICS

    record = evaluate_run(run_dir, organs_only)
    text = (run_dir / "evaluations" / "organs-only.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the evaluation file"))
    assert saved["surface_tolerance_mm"] == {"kidney": SCHEMA.surface_tolerance("kidney"), "liver": SCHEMA.surface_tolerance("liver"),
                                             "spleen": SCHEMA.surface_tolerance("spleen")}  # fmt: skip
    assert len(saved["case_spacing_mm"]) == 2 and all(len(s) == 3 and all(v > 0 for v in s) for s in saved["case_spacing_mm"])
    for key, m in saved["models"].items():
        assert len(m["metrics"]) == len(m["per_case"]) == 2
        for dice, case in zip(m["per_case"], m["metrics"]):
            assert set(case) == set(dice) and all(case[c]["dice"] == dice[c] for c in dice)  # the same Dice
            for row in case.values():
                assert set(row) == set(METRICS) and all(v is None or isinstance(v, float) for v in row.values())
        assert set(m["metrics_mean"]) == {"kidney", "liver", "spleen"}
        for organ, row in m["metrics_mean"].items():
            assert set(row) == set(METRICS)
            assert row["dice"]["n"] == sum(organ in case for case in m["per_case"])
            if organ in m["mean"]:
                assert row["dice"]["mean"] == pytest.approx(m["mean"][organ])
            for metric, s in row.items():
                values = [case[organ][metric] for case in m["metrics"] if organ in case and case[organ][metric] is not None]
                assert s["n"] == len(values) and (s["mean"] is None) == (not values), (key, organ, metric)
    assert record["models"]["global"]["metrics"] == saved["models"]["global"]["metrics"]


def test_lesion_labelling_dataset_is_not_merged_unless_asked(run_dir, tmp_path):
    ds = _dataset(tmp_path, ["liver", "liver_tumor"], "liver-lesions")
    assert evaluate_run(run_dir, ds)["classes"] == ["liver", "liver_tumor"]
    forced = evaluate_run(run_dir, ds, merge_lesions="yes")
    assert forced["merge_lesions"] is True and forced["classes"] == ["liver"]


class _Payload:
    """Unpickling this would touch a marker file: code run at load time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_a_callable_is_refused(run_dir, organs_only, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, run / "checkpoints" / "local" / "site-a_last.pt")
    with pytest.raises(UserError, match=r"site-a_last.pt: not a checkpoint of plain tensors"):
        evaluate_run(run, organs_only)
    assert not marker.exists()


def test_dataset_of_another_schema_is_refused(run_dir, organs_only, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(organs_only, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["schema"] = {"name": "thorax-ct", "version": "1.0.0"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="prepared with label schema thorax-ct 1.0.0, but the experiment uses abdominal-ct"):
        evaluate_run(run_dir, other)


def test_cli_prints_the_table_and_fails_cleanly(run_dir, organs_only, tmp_path):
    home = run_dir.parent.parent
    res = cli("coordinator", "evaluate", run_dir.name, "--home", home, "--data", organs_only)
    assert res.returncode == 0, res.stderr
    assert "out-of-federation: organs-only (2 cases, lesions merged into organs)" in " ".join(res.stdout.split())
    assert "global (best, round 1)" in res.stdout
    res = cli("coordinator", "evaluate", run_dir.name, "--home", home, "--data", tmp_path / "missing")
    assert res.returncode != 0 and "missing: not a folder" in res.stderr


def test_classes_no_site_labels_are_not_predicted(tmp_path_factory, organs_only):
    """A federation whose sites label kidney, liver and spleen only never trained the lesion
    and pancreas outputs: evaluate folds them into background (read from the run's
    validation metrics) and says so in the record."""
    from coordinator.evaluate import trained_classes

    home = tmp_path_factory.mktemp("home2")
    run = runs.new_run(home, SPEC, "oof2", resolved=parse(SPEC, "spec").resolved_raw())
    torch.manual_seed(0)
    net = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run / "checkpoints" / "best_global.pt")
    val = {"dice_kidney": 0.5, "dice_liver": 0.5, "dice_spleen": 0.4, "dice_mean": 0.47}
    runs.write_metrics(run, {"rounds": [{"round": 1, "sites": {"n1": {"val_global": val}}}], "best_global": {"model_round": 1}})
    metrics = runs.read_metrics(run)
    assert trained_classes(metrics, SCHEMA) == sorted(SCHEMA.classes[c] for c in ("kidney", "liver", "spleen"))
    # a class a site scores only on its test cases (its validation cases lack it) was labelled, so trained
    with_test = {"rounds": [{"round": 1, "sites": {"n1": {"val_global": val, "test_global": {"dice_pancreas": 0.3}}}}]}
    assert trained_classes(with_test, SCHEMA) == sorted(SCHEMA.classes[c] for c in ("kidney", "liver", "spleen", "pancreas"))
    record = evaluate_run(run, organs_only)
    assert record["predicted_classes"] == ["kidney", "liver", "spleen"]
    # a run that validated every class predicts every class (nothing to fold)
    assert evaluate_run(run_dir_all(tmp_path_factory), organs_only)["predicted_classes"] == "all"


def run_dir_all(tmp_path_factory):
    home = tmp_path_factory.mktemp("home3")
    run = runs.new_run(home, SPEC, "oof3", resolved=parse(SPEC, "spec").resolved_raw())
    net = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run / "checkpoints" / "best_global.pt")
    val = {f"dice_{c}": 0.5 for c in SCHEMA.classes if c != "background"}
    runs.write_metrics(run, {"rounds": [{"round": 1, "sites": {"n1": {"val_global": val}}}], "best_global": {"model_round": 1}})
    return run


def test_a_standalone_run_is_scored_as_the_papers_ensemble_of_its_local_models(tmp_path, organs_only):
    """Standalone training has no global model: its joint model is the ensemble of the sites' local models, each
    class taken from the models of the sites that label it (the classes a site scored during the run)."""
    import coordinator.evaluate as ev
    from pipelines.ensemble import PartialLabelEnsemble
    from pipelines.scoring import preprocess_cases, score_model, scoring_plan
    from preprocessing.dataset import load_dataset

    spec = SPEC.replace("plan: marginal", "plan: marginal\nmode: standalone")
    run = runs.new_run(tmp_path, spec, "alone", resolved=parse(spec, "spec").resolved_raw())
    (run / "checkpoints" / "local").mkdir(parents=True)
    nets = {}
    for seed, site in enumerate(("site-a", "site-b", "site-c")):
        torch.manual_seed(seed)
        nets[site] = build_network("basic_unet", features=[4, 4, 8, 8, 16, 4], out_channels=SCHEMA.num_classes)
        torch.save(nets[site].state_dict(), run / "checkpoints" / "local" / f"{site}_last.pt")
    rows = {"N1": {"name": "site-a", "val_local": {"dice_liver": 0.5}}, "N2": {"name": "site-b", "val_local": {"dice_kidney": 0.4, "dice_spleen": 0.3}}}
    runs.write_metrics(run, {"rounds": [{"round": 1, "sites": rows}]})  # site-c scored nothing: its classes are unknown
    record = evaluate_run(run, organs_only, overlays=0)
    assert set(record["models"]) == {"ensemble", "local:site-a", "local:site-b", "local:site-c"}
    entry = record["models"]["ensemble"]
    assert entry["label"] == "standalone ensemble (2 local models)" and entry["checkpoint"] is None
    assert entry["members"] == ["local:site-a", "local:site-b"] and len(entry["per_case"]) == 2
    settings = ev._settings(run)
    ensemble = PartialLabelEnsemble([(nets["site-a"].eval(), [3]), (nets["site-b"].eval(), [1, 7])], SCHEMA.num_classes, 3)
    prepared = load_dataset(organs_only)
    expected = score_model(ensemble, preprocess_cases(prepared, settings), settings, scoring_plan(prepared, SCHEMA))
    assert entry["per_case"] == expected["per_case"]
