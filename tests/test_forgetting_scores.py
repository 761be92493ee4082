"""Issue 20, test-only reference labels, scoring side: forgetting measured on each site's own test cases.

The plan (real Fed-BioMed Round and data manager, a small synthetic dataset, a tiny network or a
network whose prediction is fixed) scores its reference classes on the test cases only; the engine
keeps the keys in the site's test row through metrics.json; the run report and the comparison show
the forgetting table with the numbers, and leave it out for a run without reference scores.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from fedbiomed.common.training_args import TrainingArgs
from test_report import STATE, html_row, make_run
from test_report_splits import split_metrics

from coordinator import report, runs
from coordinator.engine import add_site_scalar
from coordinator.plans import model_args_for
from coordinator.report.forgetting import COMPARE_FORGETTING_TEXT, FORGETTING_TEXT, FORGETTING_TITLE, forgetting, forgetting_record
from coordinator.results import class_dice, reference_case_dice, reference_cases, reference_dice, selection_score
from fedimg_testing.phantom import write_phantom_site
from fedimg_testing.synthetic import write_synthetic_dataset
from pipelines.plans.marginal import MarginalSegmentationPlan

pytestmark = pytest.mark.usefixtures("site_process", "one_thread")

RUN_ID = "run-forgetting-1"
SPLIT = {"validation": 0.2, "test": 0.2, "seed": 2}  # 10 cases: 2 validation, 2 test


# -- the plan at a site ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("site") / "prepared"
    write_synthetic_dataset(root, seed=4, n_cases=10, shape=(32, 32, 32))  # labels kidney (1) and kidney_tumor (2)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))


class Monitor:
    """Fed-BioMed's history monitor as the plan uses it."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, **kwargs):
        self.scalars.append(kwargs)


class FixedNet(torch.nn.Module):
    """A network whose prediction is one class everywhere, whatever the image."""

    def __init__(self, num_classes: int, predicted: int):
        super().__init__()
        self.num_classes, self.predicted = num_classes, predicted
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], self.num_classes, *x.shape[2:]), dtype=x.dtype)
        out[:, self.predicted] = 1.0
        return out


class ReferenceLabels:
    """The contract's dataset accessor (`PreparedSegmentationDataset.reference_label`), recording what was asked."""

    def __init__(self, labels: dict[int, torch.Tensor | None]):
        self.labels, self.asked = labels, []

    def __call__(self, index: int) -> torch.Tensor | None:
        self.asked.append(index)
        return self.labels.get(index)


def _split_plan(round_class, root):
    args = model_args_for("marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native", "augment": False})
    args.update(run_id=RUN_ID, rounds_total=2, local_steps=2, split=SPLIT)
    ta = TrainingArgs(
        {
            "loader_args": {"batch_size": 1, "shuffle": True},
            "optimizer_args": {"lr": 1e-3},
            "num_updates": 2,
            "test_ratio": 0.4,
            "test_on_global_updates": True,
            "test_on_local_updates": True,
            "test_batch_size": 1,
            "random_seed": 3,
        },
        only_required=False,
    )
    plan = MarginalSegmentationPlan()
    plan.post_init(args, ta, node_id="NODE_A", round=0)
    r = round_class.__new__(round_class)  # Fed-BioMed's own Round code sets the plan's loaders
    r.training_plan, r.training_arguments = plan, ta
    r.testing_arguments, r.loader_arguments = ta.testing_arguments(), ta.loader_arguments()
    r.dataset_entry = {"path": str(root), "dataset_parameters": {}}
    r._dlp_and_loading_block_metadata = None
    r._testing_indexes = {"testing_index": [], "training_index": [], "test_ratio": None}
    r.researcher_id = "researcher"
    r._set_training_testing_data_loaders()
    return plan


def _block(shape, blocks: dict[int, int]) -> torch.Tensor:
    """A (1, X, Y, Z) uint8 label map with a cube of side ``side`` of each class, at separate corners."""
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    for k, (c, side) in enumerate(blocks.items()):
        lo = 0 if k == 0 else shape[0] - side
        label[0, lo : lo + side, :side, :side] = c
    return label


def _score(plan, before_train: bool = True) -> dict[str, float]:
    monitor = Monitor()
    plan.testing_routine(metric=None, metric_args={}, history_monitor=monitor, before_train=before_train)
    (call,) = monitor.scalars
    return call["metric"]


def test_reference_scores_keep_their_test_case_numbers(fedbiomed_round, dataset_root, cache):
    # the first test case has no reference label: the second one's reference scores are numbered 1, like its test_case1 keys
    plan = _split_plan(fedbiomed_round, dataset_root)
    dataset, test = plan._dataset, plan._data.indices.test
    classes = plan._settings.schema.classes
    shape = tuple(dataset.get_item(0)[1].shape[1:])
    labels = {i: _block(shape, {classes["liver"]: 8, classes["spleen"]: 4}) for i in range(len(dataset))}
    labels[test[0]] = None
    dataset.reference_classes = [classes["liver"], classes["spleen"]]
    dataset.reference_label = ReferenceLabels(labels)
    metric = _score(plan)
    assert metric["test_ref_cases"] == 1.0
    assert "test_ref_case1_dice_liver" in metric and not any(k.startswith("test_ref_case0") for k in metric)


def test_reference_classes_are_scored_on_the_test_cases_only(fedbiomed_round, dataset_root, cache):
    plan = _split_plan(fedbiomed_round, dataset_root)
    dataset, test = plan._dataset, plan._data.indices.test
    classes = plan._settings.schema.classes
    assert dataset.labeled_classes == [classes["kidney"], classes["kidney_tumor"]] and len(test) == 2
    shape = tuple(dataset.get_item(0)[1].shape[1:])
    labels = {i: _block(shape, {classes["liver"]: 8, classes["spleen"]: 4}) for i in range(len(dataset))}
    labels[test[1]] = None  # a test case whose reference label was refused at prepare: scored without it
    dataset.reference_classes = [classes["liver"], classes["liver_tumor"], classes["spleen"]]
    dataset.reference_label = ReferenceLabels(labels)
    metric = _score(plan)
    assert dataset.reference_label.asked == test  # the test cases, each once: never a validation case
    assert metric["test_ref_cases"] == 1.0 and metric["test_cases"] == 2.0 and metric["cases"] == 2.0
    assert {"test_ref_dice_liver", "test_ref_dice_spleen", "test_ref_dice_mean", "test_ref_case0_dice_liver", "test_ref_case0_dice_spleen"} <= set(metric)
    assert all(0.0 <= metric[k] <= 1.0 for k in metric if k.startswith("test_ref_dice"))
    # no liver tumour in the reference and (an untrained tiny net, argmax) maybe none predicted: scored only where defined
    assert not any(k.startswith("test_ref_case1") for k in metric)
    assert not any(k.startswith(("ref_", "dice_liver", "dice_spleen")) for k in metric)  # validation never gets reference scores
    assert metric["eval_s"] > 0


def test_a_fixed_prediction_gives_the_dice_by_hand(fedbiomed_round, dataset_root, cache, monkeypatch):
    plan = _split_plan(fedbiomed_round, dataset_root)
    dataset, test = plan._dataset, plan._data.indices.test
    classes = plan._settings.schema.classes
    liver, spleen = classes["liver"], classes["spleen"]
    fixed = FixedNet(plan._settings.num_classes, predicted=liver)  # liver everywhere
    monkeypatch.setattr(plan, "model", lambda: fixed)
    shape = tuple(dataset.get_item(0)[1].shape[1:])
    volume = shape[0] * shape[1] * shape[2]
    assert volume == 32**3
    # case 0: a liver cube of 16^3 and a spleen cube of 4^3; case 1: a liver cube of 8^3 and spleen cube of 4^3
    dataset.reference_classes = [liver, classes["liver_tumor"], spleen]
    dataset.reference_label = ReferenceLabels({test[0]: _block(shape, {liver: 16, spleen: 4}), test[1]: _block(shape, {liver: 8, spleen: 4})})
    metric = _score(plan, before_train=False)
    # Dice(liver) = 2 |ref| / (|ref| + |pred|), pred = the whole volume minus nothing (liver everywhere)
    case0, case1 = 2 * 4096 / (4096 + volume), 2 * 512 / (512 + volume)
    assert metric["test_ref_case0_dice_liver"] == pytest.approx(case0) and metric["test_ref_case1_dice_liver"] == pytest.approx(case1)
    assert metric["test_ref_dice_liver"] == pytest.approx((case0 + case1) / 2)
    assert metric["test_ref_dice_spleen"] == 0.0 and metric["test_ref_case0_dice_spleen"] == 0.0  # spleen never predicted
    # liver tumour: absent from the reference, never predicted: not scorable (empty-mask rule), so no key
    assert not any("liver_tumor" in k for k in metric)
    assert metric["test_ref_dice_mean"] == pytest.approx((case0 + case1) / 4)
    assert metric["test_ref_cases"] == 2.0
    # the classes the site trains on are still scored on the same prediction: liver everywhere, so kidney is 0
    assert metric["test_dice_kidney"] == 0.0 and metric["dice_kidney"] == 0.0


def test_no_reference_keys_without_reference_classes(fedbiomed_round, dataset_root, cache):
    plan = _split_plan(fedbiomed_round, dataset_root)
    plan._dataset.reference_classes = []
    plan._dataset.reference_label = ReferenceLabels({})
    metric = _score(plan)
    assert plan._dataset.reference_label.asked == []
    assert "test_dice_mean" in metric and not any("ref_" in k for k in metric)


def test_a_reference_class_the_site_trains_on_is_not_scored_as_reference(fedbiomed_round, dataset_root, cache):
    plan = _split_plan(fedbiomed_round, dataset_root)
    classes = plan._settings.schema.classes
    shape = tuple(plan._dataset.get_item(0)[1].shape[1:])
    plan._dataset.reference_classes = [classes["kidney"], classes["spleen"]]
    plan._dataset.reference_label = ReferenceLabels({i: _block(shape, {classes["spleen"]: 4}) for i in range(len(plan._dataset))})
    metric = _score(plan)
    assert "test_ref_dice_spleen" in metric and not any(k.startswith("test_ref") and k.endswith("_kidney") for k in metric)


def test_a_reference_label_that_fails_to_read_leaves_only_that_case_out(fedbiomed_round, dataset_root, cache):
    plan = _split_plan(fedbiomed_round, dataset_root)
    dataset, test = plan._dataset, plan._data.indices.test
    classes = plan._settings.schema.classes
    shape = tuple(dataset.get_item(0)[1].shape[1:])
    good = ReferenceLabels({test[1]: _block(shape, {classes["spleen"]: 4})})

    def reference_label(index: int):
        if index == test[0]:
            raise OSError("labelsRef/case_x.nii.gz: unreadable")
        return good(index)

    dataset.reference_classes = [classes["spleen"]]
    dataset.reference_label = reference_label
    metric = _score(plan)
    assert metric["test_ref_cases"] == 1.0 and metric["test_cases"] == 2.0 and "dice_mean" in metric and "test_ref_dice_spleen" in metric


def test_a_prepared_site_with_reference_labels_is_scored_on_them(fedbiomed_round, tmp_path, cache, monkeypatch):
    """End to end at a site: a phantom site prepared with `--reference-labels`, the dataset's own accessor, a fixed prediction."""
    train, reference = ["liver", "liver_tumor"], ["kidney", "spleen"]
    site = write_phantom_site(tmp_path / "site", train, n_cases=5, seed=3, shape=(32, 28, 12), reference_classes=reference)
    out = tmp_path / "prepared"
    res = cli("site-agent", "prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out, "--no-qc",
              "--reference-labels", site.root / "reference-labels", "--reference-label-map", site.reference_label_map)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    plan = _split_plan(fedbiomed_round, out)
    dataset, test = plan._dataset, plan._data.indices.test
    classes = plan._settings.schema.classes
    assert sorted(dataset.reference_classes) == sorted(classes[c] for c in reference) and len(test) == 1
    spleen = classes["spleen"]
    monkeypatch.setattr(plan, "model", lambda: FixedNet(plan._settings.num_classes, predicted=spleen))
    metric = _score(plan)
    ref = dataset.reference_label(test[0])
    n_ref, volume = int((ref == spleen).sum()), ref.numel()
    assert n_ref > 0
    assert metric["test_ref_dice_spleen"] == pytest.approx(2 * n_ref / (n_ref + volume)) and metric["test_ref_dice_kidney"] == 0.0
    assert metric["test_ref_cases"] == 1.0 and not any(k.startswith("ref_") for k in metric)


# -- from the site's message to metrics.json ---------------------------------------------------------


def test_reference_keys_reach_the_test_row_and_metrics_json(tmp_path):
    metric = {
        "dice_kidney": 0.8, "dice_mean": 0.8, "cases": 2.0, "case0_dice_kidney": 0.8, "eval_s": 1.0,
        "test_dice_kidney": 0.7, "test_dice_mean": 0.7, "test_cases": 2.0, "test_case0_dice_kidney": 0.7,
        "test_ref_dice_liver": 0.4, "test_ref_dice_spleen": 0.2, "test_ref_dice_mean": 0.3, "test_ref_cases": 2.0,
        "test_ref_case0_dice_liver": 0.5, "test_ref_case1_dice_liver": 0.3, "test_ref_case0_dice_spleen": 0.2,
    }  # fmt: skip
    row: dict = {"name": "site-a"}
    add_site_scalar(row, {"train": False, "global": True, "metric": metric})
    assert not any("ref_" in k for k in row["val_global"])
    test = row["test_global"]
    assert {k: test[k] for k in ("ref_dice_liver", "ref_dice_spleen", "ref_dice_mean", "ref_cases")} == {
        "ref_dice_liver": 0.4, "ref_dice_spleen": 0.2, "ref_dice_mean": 0.3, "ref_cases": 2.0,
    }  # fmt: skip
    assert reference_dice(test) == {"liver": 0.4, "spleen": 0.2} and reference_cases(test) == 2
    assert reference_case_dice(test) == {"liver": [0.5, 0.3], "spleen": [0.2]}
    # the reference classes never count as classes the site scored: selection and test scores ignore them
    assert class_dice(test) == {"kidney": 0.7}
    assert selection_score([{"t": test}], "t") == pytest.approx(0.7)
    run = tmp_path / "run"
    run.mkdir()
    runs.write_metrics(run, {"rounds": [{"round": 1, "sites": {"N1": row}}]})
    loaded = runs.load_metrics(run).rounds[0].rows("test_global")["site-a"]
    assert reference_dice(loaded) == {"liver": 0.4, "spleen": 0.2} and reference_cases(loaded) == 2


# -- the reports -------------------------------------------------------------------------------


# Reference Dice of each site (classes it does not train on); a global model of round r's row adds 0.01 r,
# a local model's row subtracts 0.3 and adds 0.01 r.
REF = {"site-a": {"spleen": 0.5, "pancreas": 0.3}, "site-b": {"pancreas": 0.7}}
REF_CASES = {"site-a": 2.0, "site-b": 3.0}


def _ref_keys(site: str, shift: float) -> dict[str, float]:
    dice = {c: round(v + shift, 6) for c, v in REF[site].items()}
    keys = {f"ref_dice_{c}": v for c, v in dice.items()}
    keys.update({f"ref_case0_dice_{c}": v for c, v in dice.items()})
    return keys | {"ref_dice_mean": sum(dice.values()) / len(dice), "ref_cases": REF_CASES[site]}


def forgetting_metrics() -> dict:
    """`test_report_splits.split_metrics` (best global: after round 1; best local: site-a round 2, site-b round 3),
    with reference scores in every test row."""
    metrics = split_metrics()
    for record in metrics["rounds"]:
        r = record["round"]
        for row in record["sites"].values():
            row["test_global"].update(_ref_keys(row["name"], 0.01 * r))
            row["test_local"].update(_ref_keys(row["name"], -0.3 + 0.01 * r))
            if "test_final" in row:
                row["test_final"].update(_ref_keys(row["name"], 0.05))
    return metrics


def test_forgetting_rows_pick_the_selected_models():
    f = forgetting(forgetting_metrics())
    assert f.sites == ["site-a", "site-b"]
    # the best global model (after round 1) is scored at the start of round 2
    assert reference_dice(f.glob.rows["site-a"]) == {"spleen": pytest.approx(0.52), "pancreas": pytest.approx(0.32)}
    assert f.best_local.rounds == {"site-a": 2, "site-b": 3} and f.last_local.rounds == {"site-a": 3, "site-b": 3}
    assert reference_dice(f.best_local.rows["site-a"])["spleen"] == pytest.approx(0.22)
    assert reference_dice(f.last_local.rows["site-a"])["spleen"] == pytest.approx(0.23)
    record = forgetting_record(forgetting_metrics())
    assert record is not None
    assert record["global"] == {"spleen": pytest.approx(0.52), "pancreas": pytest.approx((0.32 + 0.72) / 2)}
    assert record["local"] == {"spleen": pytest.approx(0.22), "pancreas": pytest.approx((0.02 + 0.43) / 2)}
    assert record["n"] == {"spleen": 2, "pancreas": 5}
    assert not forgetting(split_metrics()).has_data and forgetting_record(split_metrics()) is None


def test_the_run_report_shows_the_forgetting_table(tmp_path):
    out = report.write_report(make_run(tmp_path, metrics=forgetting_metrics(), state=STATE), log=lambda _m: None)
    html, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert FORGETTING_TITLE in html and FORGETTING_TITLE in md and FORGETTING_TEXT in md  # (the HTML escapes its apostrophes)
    # site, class, n, best global, best local, its round, last local, its round
    assert html_row("site-a", "spleen", "2", "0.520", "0.220", "2", "0.230", "3") in html
    assert html_row("site-a", "pancreas", "2", "0.320", "0.020", "2", "0.030", "3") in html
    assert html_row("site-b", "pancreas", "3", "0.720", "0.430", "3", "0.430", "3") in html
    # per class, the mean across the sites that hold it, n summed; spleen has one site: no mean row
    assert html_row(report.MEAN_ACROSS_SITES, "pancreas", "5", "0.520", "0.225", "", "0.230", "") in html
    assert html_row(report.MEAN_ACROSS_SITES, "spleen") not in html and f"{report.MEAN_ACROSS_SITES} | spleen" not in md
    assert "| site-a | spleen | 2 | 0.520 | 0.220 | 2 | 0.230 | 3 |" in md
    # the reference classes are not in-federation classes: the global model's table is unchanged
    assert "ref_" not in html


def test_a_run_without_reference_scores_has_no_forgetting_section(tmp_path):
    out = report.write_report(make_run(tmp_path, metrics=split_metrics(), state=STATE), log=lambda _m: None)
    for name in ("index.html", "report.md"):
        text = (out / name).read_text()
        assert "Forgetting" not in text and FORGETTING_TEXT not in text


def test_the_comparison_shows_forgetting_per_method(tmp_path):
    with_ref = make_run(tmp_path, "with-ref", metrics=forgetting_metrics())
    without = make_run(tmp_path, "without", metrics=split_metrics())
    out = report.compare_runs([with_ref, without], tmp_path / "cmp", labels=["condistfl", "fedavg"])
    html, md = (out / "index.html").read_text(), (out / "comparison.md").read_text()
    assert FORGETTING_TITLE in html and COMPARE_FORGETTING_TEXT in md
    # classes in schema order (pancreas 4 after spleen 3): global spleen, pancreas; local spleen, pancreas; n spleen, pancreas
    assert html_row("condistfl", "0.520", "0.520", "0.220", "0.225", "2", "5") in html
    assert html_row("fedavg", *[""] * 6) not in html and "| fedavg | " in md  # a run without reference scores has no forgetting row
    runs_json = json.loads((out / "comparison.json").read_text())["runs"]
    assert runs_json[0]["forgetting"]["n"] == {"spleen": 2, "pancreas": 5} and runs_json[1]["forgetting"] is None
    only_without = report.compare_runs([without], tmp_path / "cmp2")
    assert "Forgetting" not in (only_without / "index.html").read_text()


def test_the_final_global_model_also_gets_boundary_metrics_on_the_test_cases(fedbiomed_round, dataset_root, cache, monkeypatch):
    """Fed-BioMed's validation-only request after the last round (round == rounds_total) scores the final model: its
    test keys add per class the mean HD95, ASSD, NSD and RVD and their counts; earlier rounds do not pay for them."""
    plan = _split_plan(fedbiomed_round, dataset_root)
    classes = plan._settings.schema.classes
    kidney = classes["kidney"]
    fixed = FixedNet(plan._settings.num_classes, predicted=kidney)  # kidney everywhere
    monkeypatch.setattr(plan, "model", lambda: fixed)
    assert not any(k.startswith("test_hd95") for k in _score(plan))  # round 0 of 2: Dice only
    monkeypatch.setattr(plan, "round", lambda: 2)  # the final validation request
    metric = _score(plan)
    assert metric["test_hd95_n_kidney"] == 2.0 and metric["test_rvd_n_kidney"] == 2.0
    assert metric["test_hd95_kidney"] > 0 and 0 <= metric["test_nsd_kidney"] < 1
    assert metric["test_rvd_kidney"] > 0  # kidney predicted everywhere: over-segmented
    assert not any(k.startswith(("hd95", "nsd")) for k in metric)  # validation keeps Dice only
    assert not any("volume" in k for k in metric)  # volumes stay at the site
    assert not any(k.startswith("test_ref_hd95") for k in metric)
    assert not plan._data.indices.validation or metric["cases"] > 0


def test_the_run_report_shows_the_final_models_boundary_metrics(tmp_path):
    metrics = split_metrics()
    final = next(row for record in metrics["rounds"] for row in record["sites"].values() if "test_final" in row)
    (cls,) = [k[len("dice_") :] for k in final["test_final"] if k.startswith("dice_") and k != "dice_mean"][:1]
    final["test_final"].update({f"hd95_{cls}": 4.25, f"assd_{cls}": 1.5, f"nsd_{cls}": 0.8, f"rvd_{cls}": -0.125,
                                f"hd95_n_{cls}": 2.0, f"assd_n_{cls}": 2.0, f"nsd_n_{cls}": 2.0, f"rvd_n_{cls}": 3.0})  # fmt: skip
    out = report.write_report(make_run(tmp_path, metrics=metrics, state=STATE), log=lambda _m: None)
    html = (out / "index.html").read_text()
    assert html_row(final["name"], cls, f"{final['test_final'][f'dice_{cls}']:.3f}", "4.250", "1.500", "0.800", "-0.125", "2/3") in html
    plain = make_run(tmp_path / "plain", metrics=split_metrics(), state=STATE)
    assert "HD95 (mm)" not in (report.write_report(plain, log=lambda _m: None) / "index.html").read_text()  # an older run: no table
