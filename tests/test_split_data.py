"""The node's case split with real Fed-BioMed classes: `pipelines.plans.split_data` under Fed-BioMed's Round.

A small prepared dataset (fedimg_testing.synthetic: every volume distinct, so a batch names its
case) is split by the segmentation plan's data manager through Fed-BioMed's own
``Round._set_training_testing_data_loaders`` (training_data -> extend_loader_args -> load ->
load_dataset -> load_state -> split -> save_state), two rounds in a row as a node runs them
(the second with the state the first saved). Test and validation cases never reach a training
batch; the plan scores validation and test and reports both, the training report counts them,
and the site keeps its own record of the split.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from fedbiomed.common.datamanager import DataManager
from fedbiomed.common.training_args import TrainingArgs

from coordinator.plans import model_args_for
from fedimg_testing.synthetic import write_synthetic_dataset
from pipelines.plans.marginal import MarginalSegmentationPlan
from pipelines.plans.split_data import CaseSplitDataManager, split_record_path
from pipelines.site_errors import SiteError
from pipelines.splits import SplitSettings, assign_splits, split_indices

pytestmark = pytest.mark.usefixtures("site_process", "one_thread")

N_CASES = 10
RUN_ID = "run-split-1"


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("site") / "prepared"
    write_synthetic_dataset(root, seed=4, n_cases=N_CASES, shape=(32, 32, 32))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class SpyPlan(MarginalSegmentationPlan):
    """The marginal plan, recording the volumes of every training batch."""

    def training_step(self, data, target):
        self.trained_on.extend(_key(v) for v in data)
        return super().training_step(data, target)


class Monitor:
    """Fed-BioMed's history monitor as the plan uses it: what it would send to the coordinator."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, **kwargs):
        self.scalars.append(kwargs)


def _key(volume: torch.Tensor) -> str:
    return hashlib.sha256(volume.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _training_args(test_ratio: float, num_updates: int = 2) -> TrainingArgs:
    return TrainingArgs(
        {
            "loader_args": {"batch_size": 1, "shuffle": True},
            "optimizer_args": {"lr": 1e-3},
            "num_updates": num_updates,
            "test_ratio": test_ratio,
            "test_on_global_updates": test_ratio > 0,
            "test_on_local_updates": test_ratio > 0,
            "test_batch_size": 1,
            "random_seed": 3,
        },
        only_required=False,
    )


def _plan(split: dict | None, test_ratio: float, round_index: int = 0) -> SpyPlan:
    args = model_args_for("marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native", "augment": False})
    args.update(run_id=RUN_ID, rounds_total=2, local_steps=2)
    if split is not None:
        args["split"] = split
    plan = SpyPlan()
    plan.trained_on = []
    plan.post_init(args, _training_args(test_ratio), node_id="NODE_A", round=round_index)
    return plan


def _fedbiomed_round(round_class, plan, root, testing_indexes: dict, test_ratio: float):
    """Fed-BioMed's own Round code sets the plan's loaders (the rest of a Round needs a node database)."""
    r = round_class.__new__(round_class)
    ta = _training_args(test_ratio)
    r.training_plan = plan
    r.training_arguments = ta
    r.testing_arguments = ta.testing_arguments()
    r.loader_arguments = ta.loader_arguments()
    r.dataset_entry = {"path": str(root), "dataset_parameters": {}}
    r._dlp_and_loading_block_metadata = None
    r._testing_indexes = testing_indexes
    r.researcher_id = "researcher"
    r._set_training_testing_data_loaders()  # training_data ... split, save_state
    return r


def _cases_of(loader, by_key: dict[str, str], epochs: int = 1) -> list[str]:
    return [by_key[_key(v)] for _ in range(epochs) for data, _target in loader for v in data]


def _by_key(plan) -> dict[str, str]:
    dataset = plan._dataset
    keys = {_key(dataset.get_item(i)[0]): case for i, case in enumerate(dataset.case_ids)}
    assert len(keys) == len(dataset) == N_CASES  # every volume is distinct: a batch names its case
    return keys


def test_test_and_validation_cases_never_reach_a_training_batch_over_two_rounds(fedbiomed_round, dataset_root, cache):
    settings = {"validation": 0.2, "test": 0.2, "seed": 0}
    state = {"testing_index": [], "training_index": [], "test_ratio": None}  # a Round's first state
    splits = []
    for round_index in (0, 1):
        plan = _plan(settings, test_ratio=0.4, round_index=round_index)
        r = _fedbiomed_round(fedbiomed_round, plan, dataset_root, state, test_ratio=0.4)
        data = plan._data
        assert isinstance(data, CaseSplitDataManager) and isinstance(data, DataManager)
        expected = assign_splits(plan._dataset.case_ids, SplitSettings.from_mapping(settings))
        by_split = {name: sorted(c for c, s in expected.items() if s == name) for name in ("training", "validation", "test")}
        assert {k: len(v) for k, v in by_split.items()} == {"training": 6, "validation": 2, "test": 2}
        by_key = _by_key(plan)

        trained = _cases_of(plan.training_data_loader, by_key, epochs=25)
        assert set(trained) == set(by_split["training"])  # every training case, and only those
        assert not set(trained) & set(by_split["validation"] + by_split["test"])
        assert sorted(_cases_of(plan.testing_data_loader, by_key)) == by_split["validation"]
        test_loader = data.test_loader()
        assert test_loader.batch_size == 1 and sorted(_cases_of(test_loader, by_key)) == by_split["test"]

        # the plan's own training loop (Fed-BioMed's TorchTrainingPlan) sees training cases only
        monitor = Monitor()
        plan.training_routine(history_monitor=monitor, node_args={"gpu": False})
        assert plan.trained_on and {by_key[k] for k in plan.trained_on} <= set(by_split["training"])
        report = monitor.scalars[-1]["metric"]
        assert (report["cases_training"], report["cases_validation"], report["cases_test"]) == (6.0, 2.0, 2.0)

        record = json.loads(split_record_path(cache / "splits", RUN_ID).read_text())
        assert record == {"split": settings, "cases": by_split}
        state = r._testing_indexes  # what Fed-BioMed keeps for the next round
        assert sorted(state["testing_index"]) == sorted(plan._dataset.case_ids.index(c) for c in by_split["validation"])
        splits.append(by_split)
    assert splits[0] == splits[1]


def test_a_saved_state_of_fedbiomeds_random_split_cannot_move_a_case(fedbiomed_round, dataset_root, cache):
    settings = {"validation": 0.2, "test": 0.2, "seed": 0}
    plan = _plan(settings, test_ratio=0.4)
    expected = assign_splits([f"case_{i:04d}" for i in range(N_CASES)], SplitSettings.from_mapping(settings))
    held_out = [i for i in range(N_CASES) if expected[f"case_{i:04d}"] != "training"]
    # e.g. a run resumed from an older version: Fed-BioMed's state trains on the held-out cases
    state = {"training_index": held_out, "testing_index": [i for i in range(N_CASES) if i not in held_out][:2], "test_ratio": 0.4}
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, state, test_ratio=0.4)
    by_key = _by_key(plan)
    trained = set(_cases_of(plan.training_data_loader, by_key, epochs=10))
    assert trained == {c for c, s in expected.items() if s == "training"}


def test_the_plan_reports_validation_and_test_in_one_message(fedbiomed_round, dataset_root, cache):
    plan = _plan({"validation": 0.2, "test": 0.2, "seed": 2}, test_ratio=0.4)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.4)
    counts = plan._data.indices.counts()
    monitor = Monitor()
    plan.testing_routine(metric=None, metric_args={}, history_monitor=monitor, before_train=True)
    (call,) = monitor.scalars
    metric = call["metric"]
    assert call["test"] is True and call["test_on_global_updates"] is True and call["total_samples"] == counts["validation"]
    assert metric["cases"] == counts["validation"] == 2 and metric["test_cases"] == counts["test"] == 2
    assert metric["eval_s"] > 0  # what the scoring cost, for the run report's cost table
    names = {v: k for k, v in plan._settings.schema.classes.items()}
    classes = [names[c] for c in plan._dataset.labeled_classes]
    for prefix in ("", "test_"):
        assert {f"{prefix}dice_{c}" for c in classes} | {f"{prefix}dice_mean"} <= set(metric)
        assert all(0.0 <= metric[f"{prefix}dice_{c}"] <= 1.0 for c in classes)
        per_case = {k for k in metric if k.startswith(f"{prefix}case") and "_dice_" in k}
        assert {k.split("_dice_")[0] for k in per_case} == {f"{prefix}case0", f"{prefix}case1"}
    assert not any("case_0" in k for k in metric)  # no case ids leave the site


def test_no_test_keys_when_the_site_has_no_test_case(fedbiomed_round, dataset_root, cache):
    plan = _plan(None, test_ratio=0.25)  # an older coordinator: no split, Fed-BioMed's test_ratio held out validation only
    assert plan._settings.split is None
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.25)
    assert plan._data.test_loader() is None
    assert plan._data.indices == split_indices(plan._dataset.case_ids, SplitSettings(validation=0.25, test=0.0, seed=0))
    monitor = Monitor()
    plan.testing_routine(metric=None, metric_args={}, history_monitor=monitor, before_train=False)
    metric = monitor.scalars[0]["metric"]
    assert monitor.scalars[0]["test_on_local_updates"] is True
    assert metric["cases"] == plan._data.indices.counts()["validation"] > 0
    assert "dice_mean" in metric and not any(k.startswith("test_") for k in metric)


def test_a_test_ratio_of_zero_trains_on_every_case(fedbiomed_round, dataset_root, cache):
    plan = _plan({"validation": 0.0, "test": 0.0, "seed": 0}, test_ratio=0.0)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.0)
    assert plan.testing_data_loader is None and plan._data.test_loader() is None
    assert sorted(_cases_of(plan.training_data_loader, _by_key(plan))) == sorted(plan._dataset.case_ids)
    record = json.loads(split_record_path(cache / "splits", RUN_ID).read_text())
    assert record["cases"]["training"] == sorted(plan._dataset.case_ids) and record["split"]["test"] == 0.0


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_without_a_split_the_sent_test_ratio_is_the_validation_share(fedbiomed_round, dataset_root, cache, ratio):
    """An older coordinator's test_ratio keeps its meaning: that share validates, nothing is held out for test."""
    plan = _plan(None, test_ratio=ratio)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=ratio)
    assert plan._data.indices == split_indices(plan._dataset.case_ids, SplitSettings(validation=ratio, test=0.0, seed=0))
    assert plan._data.indices.counts()["validation"] == round(N_CASES * ratio)


def test_held_out_cases_never_train_even_when_fedbiomeds_test_ratio_is_zero(fedbiomed_round, dataset_root, cache):
    """Fail closed: the split the coordinator sent decides which cases train, whatever test_ratio says."""
    plan = _plan({"validation": 0.2, "test": 0.2, "seed": 0}, test_ratio=0.0)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.0)
    by_key = _by_key(plan)
    trained = set(_cases_of(plan.training_data_loader, by_key, epochs=5))
    ids = plan._dataset.case_ids
    held_out = {ids[i] for i in plan._data.indices.validation + plan._data.indices.test}
    assert held_out and not trained & held_out
    assert trained == {ids[i] for i in plan._data.indices.training}


def test_split_records_go_to_the_sites_splits_folder_and_a_failed_write_is_not_fatal(fedbiomed_round, dataset_root, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIMG_SPLITS_DIR", str(tmp_path / "work" / "splits"))
    plan = _plan({"validation": 0.2, "test": 0.2, "seed": 0}, test_ratio=0.4)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.4)
    record = json.loads(split_record_path(tmp_path / "work" / "splits", RUN_ID).read_text())
    assert sorted(sum(record["cases"].values(), [])) == sorted(plan._dataset.case_ids)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDIMG_SPLITS_DIR", str(blocker))  # the record cannot be written there
    plan = _plan({"validation": 0.2, "test": 0.2, "seed": 0}, test_ratio=0.4)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.4)
    assert plan.training_data_loader is not None and plan._data.indices.counts()["test"] == 2


def test_without_a_cache_folder_no_record_is_written(fedbiomed_round, dataset_root, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDIMG_CACHE_DIR", raising=False)
    plan = _plan({"validation": 0.2, "test": 0.2, "seed": 0}, test_ratio=0.4)
    _fedbiomed_round(fedbiomed_round, plan, dataset_root, {"testing_index": [], "training_index": [], "test_ratio": None}, test_ratio=0.4)
    assert plan._data.indices.counts() == {"training": 6, "validation": 2, "test": 2}
    assert not list(tmp_path.rglob("*.json"))


def test_split_before_load_is_a_site_error():
    from pipelines.plans.datasets import PreparedSegmentationDataset

    manager = CaseSplitDataManager(PreparedSegmentationDataset(), SplitSettings(), None)
    assert manager.indices is None and manager.test_loader() is None
    with pytest.raises(SiteError):
        manager.split(test_ratio=0.4, test_batch_size=1)
