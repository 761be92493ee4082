"""SCAFFOLD under Adam: the site optimizer (`pipelines.plans.optimizers`) and the coordinator's half.

Two "sites" pull one weight vector towards different points; SCAFFOLD's correction should make
each site's local steps head for the federation's optimum (the mean of the two points) instead of
its own, which is what keeps the average of partially labelled sites' models from losing what
each site learned (docs/results/condistfl-main-job.md).
"""

import logging

import pytest
import torch
import yaml
from declearn.optimizer.modules import AdamModule, ScaffoldServerModule
from fedbiomed.common.models import TorchModel
from fedbiomed.common.optimizers import Optimizer
from fedbiomed.common.optimizers.generic_optimizers import DeclearnOptimizer

from coordinator import spec as spec_mod
from coordinator.engine import _server_optimizer
from coordinator.plans import check_plan_args
from pipelines.plans.optimizers import ADAM_BETAS, ADAM_EPS, CosineScheduleModule, scaffold_adam, scaffold_state
from pipelines.training import cosine_lr

TARGETS = (torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 2.0, 0.0]))  # each site's own optimum
STEPS = 20


class Point(torch.nn.Module):
    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(start.clone())


def _local_round(start: torch.Tensor, target: torch.Tensor, optimizer: Optimizer) -> tuple[torch.Tensor, DeclearnOptimizer]:
    """STEPS steps of 0.5 * |w - target|^2 from `start`, Fed-BioMed's wrapper stepping the declearn optimizer."""
    net = Point(start)
    wrapper = DeclearnOptimizer(TorchModel(net), optimizer)
    wrapper.init_training()
    for _ in range(STEPS):
        wrapper.zero_grad()
        loss = 0.5 * (net.w - target).pow(2).sum()
        loss.backward()
        wrapper.step()
    return net.w.detach().clone(), wrapper


def _federation(rounds: int, scaffold: bool) -> list[list[torch.Tensor]]:
    """Each round's local end points of the two sites, averaged with equal weights (FedAvg)."""
    server = Optimizer(lr=1.0, modules=[ScaffoldServerModule()])
    site_opts = [
        scaffold_adam(0.05, 0.0, 0) if scaffold else Optimizer(lr=0.05, modules=[AdamModule(beta_1=ADAM_BETAS[0], beta_2=ADAM_BETAS[1], eps=ADAM_EPS)])
        for _ in TARGETS
    ]
    w = torch.zeros(3)
    history = []
    for _ in range(rounds):
        if scaffold:  # the server's state goes to every site before its round (Fed-BioMed: the aux vars of the request)
            for opt in site_opts:
                opt.set_aux(server.get_aux())
        ends = []
        aux = []
        for opt, target in zip(site_opts, TARGETS):
            end, wrapper = _local_round(w, target, opt)
            ends.append(end)
            if scaffold:
                aux.append(wrapper.get_aux())
        if scaffold:  # the sites' state updates, summed by declearn's aggregation rules, to the server
            merged = {name: sum((a[name] for a in aux[1:]), aux[0][name]) for name in aux[0]}
            server.set_aux(merged)
        w = sum(ends) / len(ends)
        history.append(ends)
    return history


def test_scaffold_points_each_sites_steps_at_the_federations_optimum():
    optimum = sum(TARGETS) / 2
    plain = _federation(3, scaffold=False)
    corrected = _federation(3, scaffold=True)
    # round 1: no correction yet, both runs take the same steps
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[0], corrected[0]))
    # later rounds: the corrected sites end near the federation's optimum, the plain ones near their own
    for ends_plain, ends_corrected in zip(plain[1:], corrected[1:]):
        for a, b in zip(ends_plain, ends_corrected):
            assert float((b - optimum).norm()) < 0.5 * float((a - optimum).norm())


def test_the_correction_is_opposite_at_two_equal_sites_and_zero_in_round_one():
    site_opts = [scaffold_adam(0.05, 0.0, 0) for _ in TARGETS]
    server = Optimizer(lr=1.0, modules=[ScaffoldServerModule()])
    assert all(scaffold_state(DeclearnOptimizer(TorchModel(Point(torch.zeros(3))), o))["scaffold_correction_norm"] == 0.0 for o in site_opts)
    aux = []
    for opt, target in zip(site_opts, TARGETS):
        opt.set_aux(server.get_aux())
        _, wrapper = _local_round(torch.zeros(3), target, opt)
        aux.append(wrapper.get_aux())
    server.set_aux({name: aux[0][name] + aux[1][name] for name in aux[0]})
    norms = []
    for opt in site_opts:
        opt.set_aux(server.get_aux())
        state = scaffold_state(DeclearnOptimizer(TorchModel(Point(torch.zeros(3))), opt))
        assert state["adam_steps"] == STEPS
        norms.append(state["scaffold_correction_norm"])
    # c = (c_1 + c_2) / 2, so c_1 - c = -(c_2 - c): the same size at both sites, and not zero
    assert norms[0] > 0.1 and norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_the_schedule_module_follows_the_cosine_and_survives_a_state_round_trip():
    opt = scaffold_adam(0.1, 0.0, total_steps=10)
    net = Point(torch.zeros(3))
    wrapper = DeclearnOptimizer(TorchModel(net), opt)
    for _ in range(4):
        wrapper.zero_grad()
        net.w.sum().backward()
        wrapper.step()
    restored = Optimizer.load_state(opt.get_state())  # what Fed-BioMed does between a site's rounds
    (module,) = [m for m in restored._optimizer.modules if isinstance(m, CosineScheduleModule)]
    assert module.step == 4 and module.total_steps == 10
    scaled = module.run(torch.ones(1))
    assert float(scaled) == pytest.approx(cosine_lr(1.0, 4, 10))
    assert scaffold_state(DeclearnOptimizer(TorchModel(net), restored))["schedule_steps"] == 5


def test_weight_decay_is_adamws_lr_times_decay():
    opt = scaffold_adam(0.003, 1e-5, 0)
    assert opt._optimizer.w_decay == pytest.approx(0.003 * 1e-5)


SEG = """
name: scaffold-demo
plan: condistfl
sites: {tags: [fedimg-demo], min_sites: 2}
rounds: 2
local_steps: 2
plan_args: {schema: abdominal-ct}
"""


def test_the_coordinator_pairs_scaffolds_server_module_with_averaging():
    s = spec_mod.parse(SEG + "aggregator: scaffold\n", "x")
    assert s.weights == "equal" and s.experiment_model_args()["aggregator"] == "scaffold"
    modules = _server_optimizer(s)._optimizer.modules
    assert [type(m).__name__ for m in modules] == ["ScaffoldServerModule"]
    with_momentum = spec_mod.parse(SEG + "aggregator: scaffold\nserver_optimizer: {name: momentum, lr: 1.0, momentum: 0.6}\n", "x")
    assert [type(m).__name__ for m in _server_optimizer(with_momentum)._optimizer.modules] == ["ScaffoldServerModule", "MomentumModule"]
    plain = spec_mod.parse(SEG, "x")
    assert _server_optimizer(plain) is None and plain.experiment_model_args()["aggregator"] == "fedavg"


def test_scaffold_refuses_to_drop_the_optimizer_state():
    with pytest.raises(spec_mod.SpecError, match="plan_args.keep_optimizer_state: false cannot be used with aggregator scaffold"):
        spec_mod.parse(SEG.replace("plan_args: {schema: abdominal-ct}", "plan_args: {schema: abdominal-ct, keep_optimizer_state: false}")
                       + "aggregator: scaffold\n", "x")  # fmt: skip
    spec_mod.parse(SEG.replace("plan_args: {schema: abdominal-ct}", "plan_args: {schema: abdominal-ct, keep_optimizer_state: false}"), "x")


def test_aggregator_in_plan_args_is_refused_as_filled_in():
    raw = yaml.safe_load(SEG)
    _, problems = check_plan_args("condistfl", {**raw["plan_args"], "aggregator": "scaffold"})
    assert [(p.key, p.problem) for p in problems] == [
        ("aggregator", "is filled in by the coordinator from the spec (rounds, local_steps, aggregator, device), the run and the sites")
    ]


def _scaffold_plan(round_index: int):
    from fedbiomed.common.training_args import TrainingArgs

    from coordinator.plans import model_args_for
    from pipelines.plans.marginal import MarginalSegmentationPlan

    args = model_args_for("marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native"})
    args.update(run_id="scaffold-unit", rounds_total=3, local_steps=2, aggregator="scaffold")
    ta = TrainingArgs({"optimizer_args": {"lr": 1e-3}, "num_updates": 2}, only_required=False)
    plan = MarginalSegmentationPlan()
    plan.post_init(args, ta, node_id="NODE_A", round=round_index)
    return plan


def test_a_site_without_an_earlier_scaffold_state_joins_fresh_and_says_so(site_process, caplog):
    """After round 1 a site with no state (its earlier updates timed out: the coordinator holds none of it)
    trains as a new SCAFFOLD client instead of stopping the run; the round reports it (restored 0) for the
    coordinator to judge (`coordinator.engine.scaffold_state_lost`)."""
    first = _scaffold_plan(0)
    assert isinstance(first.optimizer().optimizer, Optimizer)  # the declearn optimizer, not torch's AdamW
    with caplog.at_level(logging.WARNING, logger="pipelines.plans.segmentation"):
        assert first._restore_optimizer_state() is False  # round 1: nothing to restore, nothing missing
        assert not caplog.records
        assert _scaffold_plan(1)._restore_optimizer_state() is False
    (record,) = caplog.records
    assert "round 2: no SCAFFOLD optimizer state from an earlier round of this site: it joins as a new SCAFFOLD client" in record.getMessage()
