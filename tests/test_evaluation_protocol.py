"""Issue 19, coordinator side: the spec's ``split`` and ``weights``, validation and test rows kept
apart in the run record, selection on validation only (the test score recorded beside it),
equal aggregation weights through Fed-BioMed's own strategy and FedAverage, and metrics.json
of old and new runs. No FL processes (tests/integration runs the real federation)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import FACTORY_SPEC
from conftest import spec_problems as _problems

from coordinator import checkpoints, runs
from coordinator import spec as spec_mod
from coordinator.cli import cli
from coordinator.engine import Federation, add_site_scalar, record_split_sizes, resumed_protocol, selection_strategy
from coordinator.fedbiomed_hooks import ScalarFeed
from coordinator.results import split_test_keys
from coordinator.run_metrics import RunMetrics
from coordinator.strategy import SampledSitesStrategy

SEG = """\
name: t1
plan: marginal
sites: {tags: [demo], min_sites: 2}
rounds: 10
local_steps: 10
"""
FACTORY = FACTORY_SPEC


# -- the spec --------------------------------------------------------------------------------


def test_split_and_weights_default_and_resolve():
    s = spec_mod.parse(SEG, "exp.yaml")
    assert s.split == {"validation": 0.2, "test": 0.2, "seed": 0} and s.weights == "samples" and s.held_out == pytest.approx(0.4)
    assert s.warnings == []
    s = spec_mod.parse(SEG + "split: {validation: 0.25, test: 0.25, seed: 3}\nweights: equal\n", "exp.yaml")
    assert s.split == {"validation": 0.25, "test": 0.25, "seed": 3} and s.weights == "equal"
    # a key left out takes its default; the split seed is not the training seed
    s = spec_mod.parse(SEG + "seed: 7\nsplit: {test: 0.1}\n", "exp.yaml")
    assert s.split == {"validation": 0.2, "test": 0.1, "seed": 0} and s.seed == 7


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("split: {validation: 0.6, test: 0.4}\n", "split", "validation + test must be at most 0.9 so that every site trains (got 1)"),
        ("split: {validation: 0, test: 0.2}\n", "split.test", "the test cases are scored alongside validation; set split.validation > 0"),
        ("split: {validation: 1.5}\n", "split.validation", "must be in [0, 0.9]"),
        ("split: {validation: 0.2, tests: 0.2}\n", "split.tests", "unknown key; did you mean 'test'"),
        ("split: {seed: -1}\n", "split.seed", "must be an integer >= 0"),
        ("weights: mean\n", "weights", "must be one of samples, equal"),
        ("split: {validation: 0.2}\ntest_ratio: 0.2\n", "test_ratio", "cannot be combined with split: drop it"),
    ],
)
def test_each_split_problem_names_its_key_and_a_fix(extra, key, words):
    problems = _problems(SEG + extra)
    assert list(problems) == [key], problems
    assert words in problems[key]


def test_an_old_spec_with_test_ratio_still_loads_with_a_warning():
    s = spec_mod.parse(SEG + "test_ratio: 0.25\n", "old.yaml")
    # test_ratio held out validation cases only: no test split
    assert s.split == {"validation": 0.25, "test": 0.0, "seed": 0}
    assert s.warnings[0] == (
        "old.yaml: test_ratio: is deprecated: write split: {validation: 0.25, test: 0.2} (test_ratio held out validation cases only; no test split)"
    )
    assert any("no test cases: the in-federation numbers are on the validation cases that selected the model, which is optimistic" in w for w in s.warnings)
    # Fed-BioMed still tests on 0.25 of the cases, as the run did before
    assert s.training_args()["test_ratio"] == 0.25 and s.training_args()["test_on_global_updates"] is True
    # the run directory of an old run keeps its spec.yaml: it still opens
    assert spec_mod.validate({"test_ratio": 0.25, **yaml.safe_load(SEG)}, "spec.yaml").split["validation"] == 0.25


def test_risky_splits_are_warned_about():
    warnings = spec_mod.parse(SEG + "split: {validation: 0, test: 0}\n", "x").warnings
    assert warnings == ["x: split.validation: no validation cases: no Dice per round and no best-model selection (the last round's model is kept); "
                        "use e.g. split: {validation: 0.2, test: 0.2}"]  # fmt: skip
    warnings = spec_mod.parse(SEG + "split: {validation: 0.2, test: 0}\n", "x").warnings
    assert len(warnings) == 1 and warnings[0].startswith("x: split.test: no test cases")
    warnings = spec_mod.parse(SEG + "split: {validation: 0.3, test: 0.3}\n", "x").warnings
    assert warnings == ["x: split: 0.6 held out: trains on less than half of each site's cases"]


def test_factory_holds_out_nothing_and_weights_equally():
    s = spec_mod.parse(FACTORY, "x")
    assert s.split == {"validation": 0.0, "test": 0.0, "seed": 0} and s.weights == "equal" and s.held_out == 0
    assert s.training_args()["test_ratio"] == 0 and s.training_args()["test_on_local_updates"] is False
    assert "split" not in s.experiment_model_args("r")
    assert spec_mod.parse(FACTORY + "split: {validation: 0, test: 0}\nweights: equal\n", "x").weights == "equal"
    problems = _problems(FACTORY + "split: {validation: 0.2, test: 0}\nweights: samples\n")
    assert set(problems) == {"split", "weights"}
    assert "holds out no cases: drop split" in problems["split"] and "drop weights or write weights: equal" in problems["weights"]


def test_training_args_and_model_args_carry_the_split():
    s = spec_mod.parse(SEG + "split: {validation: 0.25, test: 0.25, seed: 4}\n", "x")
    args = s.training_args()
    # Fed-BioMed's test_ratio only switches its testing step on: the held-out share
    assert args["test_ratio"] == 0.5 and args["test_on_global_updates"] is True and args["test_on_local_updates"] is True
    assert s.experiment_model_args("run-1")["split"] == {"validation": 0.25, "test": 0.25, "seed": 4}
    off = spec_mod.parse(SEG + "split: {validation: 0, test: 0}\n", "x").training_args()
    assert off["test_ratio"] == 0 and off["test_on_global_updates"] is False and off["test_on_local_updates"] is False


def test_the_examples_hold_out_validation_and_test_cases():
    from importlib import resources

    from coordinator.testbed import DEMO_CASES_PER_SITE
    from pipelines.splits import SplitSettings, split_indices

    for name, weights in (("phantom_condistfl.yaml", "equal"), ("phantom_cross_modality.yaml", "samples")):
        s = spec_mod.parse(resources.files("coordinator").joinpath("examples", name).read_text(), name)
        assert s.split["validation"] > 0 and s.split["test"] > 0 and s.weights == weights and s.warnings == []
    # the main job: every phantom site has at least 4 test cases besides the ones that select the model (issue 20)
    main = spec_mod.parse(resources.files("coordinator").joinpath("examples", "phantom_condistfl.yaml").read_text(), "main")
    ids = [f"case_{i:04d}" for i in range(DEMO_CASES_PER_SITE)]
    counts = split_indices(ids, SplitSettings(validation=main.split["validation"], test=main.split["test"], seed=main.split["seed"])).counts()
    assert counts["test"] >= 4 and counts["validation"] >= 1 and counts["training"] >= 4


# -- the round record --------------------------------------------------------------------------


def test_split_test_keys():
    validation, test = split_test_keys({"dice_liver": 0.5, "dice_mean": 0.5, "cases": 1.0, "test_dice_liver": 0.9, "test_case0_dice_liver": 0.9})
    assert validation == {"dice_liver": 0.5, "dice_mean": 0.5, "cases": 1.0}
    assert test == {"dice_liver": 0.9, "case0_dice_liver": 0.9}
    assert split_test_keys({"dice_mean": 0.1}) == ({"dice_mean": 0.1}, {})


def test_round_record_keeps_validation_and_test_rows_apart():
    """The engine's `_round_record` on what the real `ScalarFeed` collects for a last round."""
    callbacks: dict = {}
    requests = SimpleNamespace(add_monitor_callback=callbacks.__setitem__, remove_monitor_callback=callbacks.pop)
    reply = {"sample_size": 2, "timing": {"rtime_training": 1.0, "rtime_total": 2.0}}
    exp = SimpleNamespace(
        id="exp-1", requests=requests, monitor=lambda: SimpleNamespace(on_message_handler=lambda msg: None), training_replies=lambda: {2: {"N1": reply}}
    )
    fed = object.__new__(Federation)  # no gRPC server: only the record is built
    fed._scalars = ScalarFeed()
    fed._scalars.track(exp)

    def testing(global_: bool, val: float, test: float | None) -> dict:
        metric = {"dice_liver": val, "dice_mean": val, "cases": 1.0, "case0_dice_liver": val}
        if test is not None:
            metric.update({"test_dice_liver": test, "test_dice_mean": test, "test_cases": 1.0, "test_case0_dice_liver": test})
        return {"node_id": "N1", "train": False, "test_on_global_updates": global_, "metric": metric}

    send = callbacks["exp-1"]
    send(testing(True, 0.4, 0.7))  # the received global model, before local training
    send({"node_id": "N1", "train": True, "metric": {"loss_mean": 0.3, "cases_training": 2.0, "cases_validation": 1.0, "cases_test": 1.0}})
    send(testing(False, 0.5, 0.8))  # after local training
    send(testing(True, 0.6, 0.9))  # the final model, after the last round
    send(testing(True, 0.1, None) | {"node_id": "N2"})  # a site without test cases
    w = {"w": torch.zeros(2)}
    record = fed._round_record(exp, 3, 1.0, {"N1": "site-a", "N2": "site-b"}, w, {"w": torch.tensor([3.0, 4.0])})
    row = record["sites"]["N1"]
    assert row["val_global"] == {"dice_liver": 0.4, "dice_mean": 0.4, "cases": 1.0, "case0_dice_liver": 0.4}
    assert row["test_global"] == {"dice_liver": 0.7, "dice_mean": 0.7, "cases": 1.0, "case0_dice_liver": 0.7}
    assert row["val_local"]["dice_mean"] == 0.5 and row["test_local"]["dice_mean"] == 0.8
    assert row["val_final"]["dice_mean"] == 0.6 and row["test_final"]["dice_mean"] == 0.9
    assert not any(k.startswith("test_") for key in ("val_global", "val_local", "val_final") for k in row[key])
    assert row["samples"] == 2 and row["train"]["loss_mean"] == 0.3 and record["update_norm"] == pytest.approx(5.0)
    assert record["sites"]["N2"] == {"name": "site-b", "val_global": {"dice_liver": 0.1, "dice_mean": 0.1, "cases": 1.0, "case0_dice_liver": 0.1}}
    metrics: dict = {}
    record_split_sizes(metrics, record)
    assert metrics["splits"] == {"site-a": {"training": 2, "validation": 1, "test": 1}}  # site-b reported no sizes
    assert all(type(n) is int for n in metrics["splits"]["site-a"].values())


def test_a_site_with_only_test_keys_still_counts_its_final_model():
    row: dict = {}
    add_site_scalar(row, {"train": False, "global": True, "metric": {"test_dice_mean": 0.5}})
    add_site_scalar(row, {"train": False, "global": True, "metric": {"test_dice_mean": 0.6}})
    assert row == {"val_global": {}, "test_global": {"dice_mean": 0.5}, "val_final": {}, "test_final": {"dice_mean": 0.6}}


# -- selection on validation only -------------------------------------------------------------


def _row(name: str, key: str, val: float, test: float) -> dict:
    # per class Dice: what selection_score averages over classes and sites
    return {"name": name, f"val_{key}": {"dice_liver": val, "dice_mean": val}, f"test_{key}": {"dice_liver": test, "dice_mean": test}}


def test_selection_follows_validation_and_records_the_test_score_of_the_selected_model(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for r in range(4):
        checkpoints.save_global(tmp_path, r, {"w": torch.full((1,), float(r))})
    # validation favours the model after round 1 (and local round 2); test favours others
    scores = {1: (0.3, 0.9, 0.4, 0.95), 2: (0.6, 0.1, 0.7, 0.2), 3: (0.5, 0.99, 0.5, 0.99)}  # val global, test global, val local, test local
    metrics: dict = {}
    for r, (vg, tg, vl, tl) in scores.items():
        row = {**_row("site-a", "global", vg, tg), **_row("site-a", "local", vl, tl)}
        record = {"round": r, "sites": {"N1": row}}
        checkpoints.select_best(tmp_path, metrics, record, {"N1": {"w": torch.full((1,), 10.0 + r)}}, {"N1": "site-a"})
    assert metrics["best_global"] == {"model_round": 1, "score": 0.6, "test_score": 0.1}
    assert torch.equal(checkpoints.load_tensors(ckpt / "best_global.pt")["w"], torch.tensor([1.0]))
    assert metrics["best_local"]["site-a"] == {"round": 2, "score": 0.7, "test_score": 0.2}
    assert torch.equal(checkpoints.load_tensors(ckpt / "local" / "site-a_best.pt")["w"], torch.tensor([12.0]))


def test_the_final_model_is_selected_on_validation_with_its_test_score(tmp_path):
    for r in range(3):
        checkpoints.save_global(tmp_path, r, {"w": torch.full((1,), float(r))})
    metrics: dict = {"best_global": {"model_round": 1, "score": 0.5, "test_score": 0.5}}
    last = {
        "name": "a",
        "val_global": {"dice_liver": 0.4},
        "test_global": {"dice_liver": 0.99},
        "val_final": {"dice_liver": 0.7},
        "test_final": {"dice_liver": 0.2},
    }
    checkpoints.select_best(tmp_path, metrics, {"round": 2, "sites": {"N1": last}}, {}, {"N1": "a"})
    assert metrics["best_global"] == {"model_round": 2, "score": 0.7, "test_score": 0.2}
    # an older run's rows (no test rows): the test score is None
    metrics = {}
    checkpoints.select_best(tmp_path, metrics, {"round": 1, "sites": {"N1": {"name": "a", "val_global": {"dice_liver": 0.3}}}}, {}, {"N1": "a"})
    assert metrics["best_global"] == {"model_round": 0, "score": 0.3, "test_score": None}


# -- aggregation weights ----------------------------------------------------------------------


def _replies(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "A": {"success": True, "node_id": "A", "params": {"w": a}, "sample_size": 10},
        "B": {"success": True, "node_id": "B", "params": {"w": b}, "sample_size": 30},
    }


@pytest.mark.parametrize("uniform, expected", [(True, {"A": 0.5, "B": 0.5}), (False, {"A": 0.25, "B": 0.75})])
def test_fedbiomed_strategy_and_fedaverage_weights(uniform, expected):
    from fedbiomed.researcher.aggregators import FedAverage

    a, b = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 6.0, 0.0])
    strategy = SampledSitesStrategy(None, seed=0, uniform=uniform)  # every site, as `weights: equal` without sampling
    assert strategy.sample_nodes(["B", "A"], 0) == ["A", "B"]
    params, weights, total, _ = strategy.refine(_replies(a, b), 0)
    assert weights == pytest.approx(expected) and total == 40
    aggregate = FedAverage().aggregate(params, weights)["w"]
    if uniform:  # the paper's setting: the plain mean of the sites' parameters
        assert torch.allclose(aggregate, (a + b) / 2)
    else:
        assert torch.allclose(aggregate, 0.25 * a + 0.75 * b)


def test_the_spec_picks_the_strategy():
    default = selection_strategy(spec_mod.parse(SEG, "x"))  # weights by training cases, as Fed-BioMed's FedAvg
    assert isinstance(default, SampledSitesStrategy)
    assert default._parameters == {"clients_per_round": None, "seed": 0, "uniform": False, "min_per_round": 1, "mandatory": [], "secure": False}
    equal = selection_strategy(spec_mod.parse(SEG + "weights: equal\n", "x"))
    assert isinstance(equal, SampledSitesStrategy) and equal._parameters["uniform"] is True
    standalone = selection_strategy(spec_mod.parse(SEG + "weights: equal\nmode: standalone\n", "x"))
    assert standalone is not None and standalone._parameters["uniform"] is True and standalone._parameters["min_per_round"] == 1
    factory = selection_strategy(spec_mod.parse(FACTORY, "x"))
    assert factory is not None and factory._parameters["clients_per_round"] == 2 and factory._parameters["uniform"] is True


# -- metrics.json ------------------------------------------------------------------------------

OLD = {
    "rounds": [{"round": 1, "wall_s": 1.0, "update_norm": math.nan, "sites": {"N1": {"name": "a", "samples": 3, "val_global": {"dice_mean": 0.4}}}}],
    "rounds_planned": 1,
    "best_global": {"model_round": 0, "score": 0.4},
    "best_local": {"a": {"round": 1, "score": 0.5}},
}


def test_old_metrics_round_trip_unchanged():
    m = RunMetrics.of(json.loads(json.dumps(OLD)))
    assert m.split is None and m.weights is None and m.splits == {} and m.best_global is not None and m.best_global.test_score is None
    assert m.rounds[0].rows("test_global") == {} and m.rounds[0].rows("val_global") == {"a": {"dice_mean": 0.4}}
    dumped = m.to_json_dict()
    assert "split" not in dumped and "test_score" not in dumped["best_global"] and "test_global" not in dumped["rounds"][0]["sites"]["N1"]
    assert json.dumps(dumped, sort_keys=True) == json.dumps(OLD, sort_keys=True)


def test_new_metrics_round_trip(tmp_path):
    new = json.loads(json.dumps(OLD))
    site = new["rounds"][0]["sites"]["N1"]
    site.update(test_global={"dice_mean": 0.7, "case0_dice_liver": 0.7}, test_local={"dice_mean": 0.8}, test_final={"dice_mean": 0.9})
    new.update(split={"validation": 0.25, "test": 0.25, "seed": 0}, weights="equal", splits={"a": {"training": 2, "validation": 1, "test": 1}})
    new["best_global"]["test_score"] = 0.7
    new["best_local"]["a"]["test_score"] = 0.8
    m = RunMetrics.of(new)
    assert m.rounds[0].rows("test_global") == {"a": {"dice_mean": 0.7, "case0_dice_liver": 0.7}}
    assert m.best_global is not None and m.best_global.test_score == 0.7 and m.best_local["a"].test_score == 0.8
    assert m.weights == "equal" and m.splits["a"]["test"] == 1
    run = tmp_path / "run"
    run.mkdir()
    runs.write_metrics(run, new)
    assert json.dumps(runs.read_metrics(run), sort_keys=True) == json.dumps(new, sort_keys=True)


def test_results_show_validation_and_test_dice(tmp_path):
    home = tmp_path / "home"
    run = runs.new_run(home, SEG, "t1")
    row = {
        "name": "site-a",
        "samples": 2,
        "val_global": {"dice_liver": 0.41, "dice_mean": 0.41},
        "test_global": {"dice_liver": 0.77, "dice_mean": 0.77},
        "val_final": {"dice_liver": 0.52, "dice_mean": 0.52},
        "test_final": {"dice_liver": 0.88, "dice_mean": 0.88},
    }
    runs.write_metrics(run, {"rounds": [{"round": 1, "wall_s": 1.0, "update_norm": 0.1, "sites": {"N1": row}}], "rounds_planned": 1,
                             "best_global": {"model_round": 1, "score": 0.52, "test_score": 0.88}})  # fmt: skip
    runs.mark(run, "done")
    res = CliRunner().invoke(cli, ["results", run.name, "--home", str(home)], terminal_width=200)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # table titles wrap
    assert "dice global val" in out and "dice global test" in out and "0.770" in out
    assert "Dice per class on each site's validation cases (they select the models)" in out
    assert "Dice per class on each site's test cases (never trained on, never used to select)" in out
    assert "final global model: validation cases: site-a: dice 0.520" in out and "final global model: test cases: site-a: dice 0.880" in out
    assert "selected on validation: mean Dice over classes across sites 0.520, on test cases 0.880" in out
    # an old run: validation only, said so
    runs.write_metrics(run, {"rounds": [{"round": 1, "sites": {"N1": {"name": "site-a", "val_global": {"dice_liver": 0.41, "dice_mean": 0.41}}}}]})
    out = CliRunner().invoke(cli, ["results", run.name, "--home", str(home)], terminal_width=200).output
    assert "dice global test" not in out and "no test split in this run" in out


def test_split_under_plan_args_is_refused_with_where_it_belongs(tmp_path):
    """A researcher who nests split under plan_args is told to move it, not silently overridden."""
    spec_file = tmp_path / "nested.yaml"
    spec_file.write_text(
        "name: nested\nplan: condistfl\nsites: {tags: [t], min_sites: 2}\nrounds: 10\nlocal_steps: 80\n"
        "plan_args: {schema: abdominal-ct, split: {validation: 0.3, test: 0.3}}\n"
    )
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.load(spec_file)
    assert "plan_args.split: is a top-level key of the spec: move it out of plan_args" in str(info.value)


def test_scaffold_weights_sites_equally_and_refuses_sample_weights():
    """declearn's SCAFFOLD averages the sites' states equally: the run records equal weights, and `samples` is refused."""
    s = spec_mod.parse(SEG + "aggregator: scaffold\n", "x")
    assert s.weights == "equal"
    problems = _problems(SEG + "aggregator: scaffold\nweights: samples\n")
    assert list(problems) == ["weights"] and "scaffold averages the sites' correction states equally" in problems["weights"]


def test_the_deprecation_suggestion_for_test_ratio_zero_validates():
    s = spec_mod.parse(SEG + "test_ratio: 0\n", "old.yaml")
    (deprecation,) = [w for w in s.warnings if "deprecated" in w]
    assert "write split: {validation: 0, test: 0}" in deprecation
    spec_mod.parse(SEG + "split: {validation: 0, test: 0}\n", "new.yaml")  # the suggestion itself is a valid spec


def test_a_site_with_test_cases_but_no_validation_case_is_named_once():
    """Fed-BioMed scores nothing at such a site: the engine warns about it (once per site)."""
    metrics: dict = {}
    record = {"sites": {"N1": {"name": "small", "train": {"cases_training": 2.0, "cases_validation": 0.0, "cases_test": 1.0}},
                        "N2": {"name": "big", "train": {"cases_training": 6.0, "cases_validation": 2.0, "cases_test": 2.0}}}}  # fmt: skip
    assert record_split_sizes(metrics, record) == ["small"]
    assert record_split_sizes(metrics, record) == []  # already named
    assert metrics["splits"]["small"] == {"training": 2, "validation": 0, "test": 1}


def test_a_resumed_run_records_the_split_and_weights_of_its_breakpoint():
    """Fed-BioMed resumes with the breakpoint's arguments, aggregator and strategy: metrics.json says those."""
    from fedbiomed.researcher.aggregators import FedAverage, Scaffold

    def exp(model_args, test_ratio, uniform, aggregator):
        strategy = SampledSitesStrategy(None, 0, uniform=uniform)
        return SimpleNamespace(model_args=lambda: model_args, training_args=lambda: {"test_ratio": test_ratio},
                               strategy=lambda: strategy, aggregator=lambda: aggregator)  # fmt: skip

    new = {"split": {"validation": 0.25, "test": 0.25, "seed": 1}}
    assert resumed_protocol(exp(new, 0.5, True, FedAverage())) == ({"validation": 0.25, "test": 0.25, "seed": 1}, "equal")
    # a run started before the three-way split: its sites validate on test_ratio of their cases, and test on none
    assert resumed_protocol(exp({}, 0.3, False, FedAverage())) == ({"validation": 0.3, "test": 0.0, "seed": 0}, "samples")
    assert resumed_protocol(exp({}, 0.3, False, Scaffold(server_lr=1.0)))[1] == "equal"


def test_validate_prints_the_split_and_the_weights(tmp_path):
    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(SEG + "split: {validation: 0.25, test: 0.25, seed: 3}\nweights: equal\n")
    res = CliRunner().invoke(cli, ["validate", str(spec_file)])
    assert res.exit_code == 0, res.output
    assert "held out per site: validation 0.25, test 0.25 (split seed 3); weights equal" in res.output
    spec_file.write_text(SEG + "validate_every: 3\n")
    res = CliRunner().invoke(cli, ["validate", str(spec_file)])
    assert "test 0.2 (split seed 0), models scored every 3 rounds; weights samples" in res.output, res.output
