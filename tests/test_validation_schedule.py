"""Issue 20, a first piece: ``validate_every: k`` scores the models every k rounds. The spec's key,
the per-round flags, and the engine setting Fed-BioMed's own testing flags before every round
(on a stand-in experiment that keeps Fed-BioMed's real training arguments and setters, and scores
as a Fed-BioMed node does); selection and the report on the rows that exist. No FL processes
(tests/integration/test_federation.py resumes a real run with ``validate_every: 2``)."""

from __future__ import annotations

import types
from types import SimpleNamespace

import pytest
import torch
from conftest import FACTORY_SPEC
from conftest import spec_problems as _problems

from coordinator import checkpoints, runs
from coordinator import spec as spec_mod
from coordinator.engine import Federation, RunError, scoring_flags
from coordinator.fedbiomed_hooks import OutgoingModels, RoundOutcomes, ScalarFeed, SiteErrors, WireCounter

SEG = """\
name: t1
plan: marginal
sites: {tags: [demo], min_sites: 2}
rounds: 7
local_steps: 10
"""
FACTORY = FACTORY_SPEC


# -- the spec --------------------------------------------------------------------------------


def test_validate_every_defaults_to_every_round_and_resolves():
    assert spec_mod.parse(SEG, "x").validate_every == 1
    s = spec_mod.parse(SEG + "validate_every: 3\n", "x")
    assert s.validate_every == 3 and s.warnings == []
    # the spec's training arguments are unchanged: the engine sets the flags per round
    assert s.training_args()["test_on_global_updates"] is True and s.training_args()["test_on_local_updates"] is True


@pytest.mark.parametrize("value, words", [("0", "must be an integer >= 1"), ("1.5", "must be an integer >= 1"), ("two", "must be an integer >= 1")])
def test_a_bad_validate_every_names_its_key(value, words):
    problems = _problems(SEG + f"validate_every: {value}\n")
    assert list(problems) == ["validate_every"], problems
    assert words in problems["validate_every"]


def test_the_data_factory_refuses_validate_every():
    problems = _problems(FACTORY + "validate_every: 2\n")
    assert list(problems) == ["validate_every"]
    assert "data_factory scores no models during training (it holds out no cases): drop validate_every" in problems["validate_every"]
    assert spec_mod.parse(FACTORY, "x").validate_every == 1


def test_validate_every_beyond_the_rounds_or_without_validation_is_warned_about():
    warnings = spec_mod.parse(SEG + "validate_every: 8\n", "x").warnings
    assert warnings == ["x: validate_every: 8 > rounds (7): only the initial model, the model before the last round and the final model are scored, "
                        "and no local model (no best local model is selected)"]  # fmt: skip
    assert spec_mod.parse(SEG + "validate_every: 7\n", "x").warnings == []  # the last round scores the local models
    warnings = spec_mod.parse(SEG + "validate_every: 2\nsplit: {validation: 0, test: 0}\n", "x").warnings
    assert "x: validate_every: 2 has no effect: without validation cases no model is scored" in warnings


# -- the schedule ----------------------------------------------------------------------------


def _scored(rounds: int, every: int) -> tuple[list[int], list[int]]:
    flags = [scoring_flags(r, rounds, every) for r in range(1, rounds + 1)]
    return [r for r, (g, _) in enumerate(flags, 1) if g], [r for r, (_, loc) in enumerate(flags, 1) if loc]


def test_scoring_flags_over_seven_rounds():
    # (rounds whose start scores the global model after the round before, rounds whose local models are scored)
    assert _scored(7, 1) == ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])  # today's behaviour
    assert _scored(7, 2) == ([1, 3, 5, 7], [2, 4, 6])
    # the last round scores the global model at its start: Fed-BioMed's final validation runs with its arguments
    assert _scored(7, 3) == ([1, 4, 7], [3, 6])
    assert _scored(6, 2) == ([1, 3, 5, 6], [2, 4, 6])
    assert _scored(3, 5) == ([1, 3], [])
    assert _scored(1, 4) == ([1], [])


# -- the engine drives Fed-BioMed's flags ------------------------------------------------------

SITES = {"N1": "site-a", "N2": "site-b"}


def _global_dice(model_round: int) -> float:
    return 0.9 - abs(model_round - 4) / 10  # the global model after round 4 is the best one


def _local_dice(r: int) -> float:
    return 0.9 - abs(r - 5) / 10  # the local models of round 5 are the best ones


class _Experiment:
    """What `Federation._federated` and `_standalone` use of a Fed-BioMed `Experiment`, with its
    real `TrainingArgs` and its own flag setters and getter; ``run_once`` stands in for the sites as a
    Fed-BioMed node does (`fedbiomed.node.round`): it scores the received global model first when
    ``test_on_global_updates`` is set, the local model after training when ``test_on_local_updates``
    is, and ``test_after`` sends a request that scores the aggregated model under the same flags."""

    def __init__(self, training_args: dict, rounds: int, nodes: list[str], done: int = 0):
        from fedbiomed.common.training_args import TrainingArgs
        from fedbiomed.researcher.aggregators import FedAverage
        from fedbiomed.researcher.federated_workflows import Experiment

        for name in ("set_test_on_global_updates", "set_test_on_local_updates", "training_args", "test_on_global_updates", "test_on_local_updates"):
            setattr(self, name, types.MethodType(getattr(Experiment, name), self))
        self._training_args = TrainingArgs(training_args, only_required=False)
        self.id = f"exp-{'-'.join(nodes)}"
        self.nodes, self.rounds, self._round = nodes, rounds, done
        self.seen: list[tuple[int, bool, bool, bool]] = []  # (round, global flag, local flag, test_after) as each run_once found them
        self._callbacks: dict = {}
        self.requests = SimpleNamespace(add_monitor_callback=self._callbacks.__setitem__, remove_monitor_callback=self._callbacks.pop)
        self._replies: dict = {}
        self._answered: dict[int, list[str]] = {}  # round (from 0) -> the sites aggregated, as the strategy records them
        self._params = {"w": torch.tensor([float(done)])}
        self.aggregator = lambda: FedAverage()

    def monitor(self):
        return SimpleNamespace(on_message_handler=lambda msg: None)

    def round_current(self) -> int:
        return self._round

    def training_plan(self):
        return SimpleNamespace(get_model_params=lambda: self._params)

    def training_replies(self) -> dict:
        return self._replies

    def strategy(self):
        return SimpleNamespace(history={}, _parameters={}, _success_node_history=self._answered)

    def set_strategy(self, strategy) -> None:  # a resumed run gets the spec's quorum (the stand-in keeps its own strategy)
        self.strategy_set = strategy

    secagg = None  # no secure aggregation

    def model_args(self) -> dict:
        return {"split": {"validation": 0.25, "test": 0.25, "seed": 0}}

    def _score(self, nid: str, global_: bool, dice: float) -> None:
        metric = {"dice_liver": dice, "dice_mean": dice, "cases": 1.0, "test_dice_liver": dice / 2, "test_dice_mean": dice / 2, "test_cases": 1.0}
        self._callbacks[self.id]({"node_id": nid, "train": False, "test_on_global_updates": global_, "metric": metric})

    def run_once(self, increase: bool = False, test_after: bool = False) -> int:
        assert self._round < self.rounds
        score_global, score_local = self.test_on_global_updates(), self.test_on_local_updates()
        r = self._round + 1
        self.seen.append((r, score_global, score_local, test_after))
        for i, nid in enumerate(self.nodes):
            if score_global:
                self._score(nid, True, _global_dice(r - 1))
            self._callbacks[self.id]({"node_id": nid, "train": True, "metric": {"loss_mean": 1.0 / r}})
            if score_local:
                self._score(nid, False, _local_dice(r))
        self._replies[r - 1] = {nid: {"sample_size": 2, "params": {"w": torch.tensor([10.0 * r + i])}} for i, nid in enumerate(self.nodes)}
        self._answered[r - 1] = list(self.nodes)
        self._round = r
        self._params = {"w": torch.tensor([float(r)])}
        self.breakpoint = self._training_args.get_state_breakpoint()  # what Fed-BioMed's breakpoint of the round keeps of them
        if test_after and score_global:
            for nid in self.nodes:
                self._score(nid, True, _global_dice(r))
        return 1


def _federation(tmp_path, experiments: list[_Experiment]) -> Federation:
    fed = object.__new__(Federation)  # no gRPC server: the experiments stand in for Fed-BioMed's
    fed.home, fed.log = tmp_path, lambda msg: None
    fed._scalars, fed._wire, fed._site_errors = ScalarFeed(), WireCounter(), SiteErrors()
    fed._outcomes = RoundOutcomes(lambda message: False, lambda timeout_s: [])  # no requests here: every site answers
    fed._outgoing = OutgoingModels()  # no training request goes out here: nothing to encode
    fed.wait_for_sites = lambda spec: dict(SITES)
    fed._check_approval = lambda exp, spec, sites: None
    queue = list(experiments)
    fed._experiment = lambda spec, run_dir, nodes=None, folder=None, sites=None: queue.pop(0)
    return fed


def _rows(metrics: dict, key: str) -> list[int]:
    return [rec["round"] for rec in metrics["rounds"] if any(key in row for row in rec["sites"].values())]


@pytest.fixture
def researcher_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))  # Fed-BioMed makes its config on import


def test_the_engine_sets_fedbiomeds_flags_each_round_and_selects_among_scored_models(tmp_path, researcher_env):
    from coordinator.report import write_report

    spec = spec_mod.parse(SEG + "validate_every: 3\nsplit: {validation: 0.25, test: 0.25}\n", "exp.yaml")
    exp = _Experiment(spec.training_args(), spec.rounds, ["N1", "N2"])
    run_dir = runs.new_run(tmp_path, SEG, "t1")
    metrics = _federation(tmp_path, [exp])._run(run_dir, spec, resume=False)
    # Fed-BioMed's own flags, as run_once found them: global at rounds 1, 4 and the last; local at 3 and 6
    assert exp.seen == [(1, True, False, False), (2, False, False, False), (3, False, True, False), (4, True, False, False),
                        (5, False, False, False), (6, False, True, False), (7, True, False, True)]  # fmt: skip
    assert metrics["validate_every"] == 3
    assert _rows(metrics, "val_global") == [1, 4, 7] and _rows(metrics, "test_global") == [1, 4, 7]
    assert _rows(metrics, "val_local") == [3, 6] and _rows(metrics, "val_final") == [7]
    # the best global model is the best of those scored (after rounds 0, 3, 6 and 7), not the model after round 4
    assert metrics["best_global"] == {"model_round": 3, "score": pytest.approx(0.8), "test_score": pytest.approx(0.4)}
    assert torch.equal(checkpoints.load_tensors(run_dir / "checkpoints" / "best_global.pt")["w"], torch.tensor([3.0]))
    # a best local model comes from a scored round only (round 5's would score higher)
    assert metrics["best_local"]["site-b"] == {"round": 6, "score": pytest.approx(0.8), "test_score": pytest.approx(0.4)}
    assert torch.equal(checkpoints.load_tensors(run_dir / "checkpoints" / "local" / "site-b_best.pt")["w"], torch.tensor([61.0]))
    assert torch.equal(checkpoints.load_tensors(run_dir / "checkpoints" / "local" / "site-b_last.pt")["w"], torch.tensor([71.0]))
    # the report draws the curves with gaps and says what was scored
    report = (write_report(run_dir, log=lambda _m: None) / "report.md").read_text()
    assert "models scored every 3 rounds" in report
    assert runs.load_metrics(run_dir).validate_every == 3


def test_every_round_is_scored_by_default(tmp_path, researcher_env):
    spec = spec_mod.parse(SEG.replace("rounds: 7", "rounds: 3"), "exp.yaml")
    exp = _Experiment(spec.training_args(), spec.rounds, ["N1", "N2"])
    metrics = _federation(tmp_path, [exp])._run(runs.new_run(tmp_path, SEG, "t1"), spec, resume=False)
    assert exp.seen == [(1, True, True, False), (2, True, True, False), (3, True, True, True)]
    assert _rows(metrics, "val_global") == [1, 2, 3] and _rows(metrics, "val_local") == [1, 2, 3] and _rows(metrics, "val_final") == [3]


def test_without_validation_cases_the_flags_stay_off(tmp_path, researcher_env):
    spec = spec_mod.parse(SEG.replace("rounds: 7", "rounds: 2") + "validate_every: 2\nsplit: {validation: 0, test: 0}\n", "exp.yaml")
    exp = _Experiment(spec.training_args(), spec.rounds, ["N1", "N2"])
    metrics = _federation(tmp_path, [exp])._run(runs.new_run(tmp_path, SEG, "t1"), spec, resume=False)
    assert exp.seen == [(1, False, False, False), (2, False, False, True)]
    assert _rows(metrics, "val_global") == [] and "best_global" not in metrics


def test_standalone_sites_follow_the_schedule(tmp_path, researcher_env):
    spec = spec_mod.parse(SEG.replace("rounds: 7", "rounds: 4") + "validate_every: 2\nmode: standalone\n", "exp.yaml")
    exps = [_Experiment(spec.training_args(), spec.rounds, [nid]) for nid in sorted(SITES)]
    metrics = _federation(tmp_path, exps)._run(runs.new_run(tmp_path, SEG, "t1"), spec, resume=False)
    for exp in exps:
        assert exp.seen == [(1, True, False, False), (2, False, True, False), (3, True, False, False), (4, True, True, True)]
    assert _rows(metrics, "val_local") == [2, 4] and _rows(metrics, "val_final") == [4]
    assert {site: best["round"] for site, best in metrics["best_local"].items()} == {"site-a": 4, "site-b": 4}


def test_a_resumed_run_keeps_the_schedule_whatever_its_breakpoint_saved(tmp_path, researcher_env, monkeypatch):
    """Fed-BioMed's breakpoint saves the training arguments of the round it followed; the engine sets the flags again each round."""
    from fedbiomed.common.training_args import TrainingArgs
    from fedbiomed.researcher.federated_workflows import Experiment

    spec = spec_mod.parse(SEG.replace("rounds: 7", "rounds: 3") + "validate_every: 2\nsplit: {validation: 0.25, test: 0.25}\n", "exp.yaml")
    first = _Experiment(spec.training_args(), spec.rounds, ["N1", "N2"])
    run_dir = runs.new_run(tmp_path, SEG, "t1")
    fed = _federation(tmp_path, [first])
    fed.config = SimpleNamespace(vars={})
    first.rounds = 1  # the run stops in round 2
    with pytest.raises(RunError):
        fed._run(run_dir, spec, resume=False)
    assert first.seen == [(1, True, False, False)] and _rows(runs.read_metrics(run_dir), "val_global") == [1]
    resumed = _Experiment(TrainingArgs.load_state_breakpoint(first.breakpoint).dict(), spec.rounds, ["N1", "N2"], done=1)
    assert resumed.test_on_global_updates() is True and resumed.test_on_local_updates() is False
    monkeypatch.setattr(runs, "latest_breakpoint", lambda run_dir: run_dir / "fedbiomed" / "breakpoint_0001")
    monkeypatch.setattr(Experiment, "load_breakpoint", classmethod(lambda cls, path: resumed))
    metrics = fed._run(run_dir, spec, resume=True)
    assert resumed.seen == [(2, False, True, False), (3, True, False, True)]
    assert _rows(metrics, "val_global") == [1, 3] and _rows(metrics, "val_local") == [2] and _rows(metrics, "val_final") == [3]
