"""Issue 23, part 6: differential privacy as a spec switch (``dp: {type, sigma, clip, delta}``).

The spec's keys and refusals (networks Opacus cannot train named with their layer), the plan's private
round at a site (Fed-BioMed's DPController, Opacus's Poisson batches of whole cases, empty batches, one
loss per case), the accountant's composition over a site's rounds, and what metrics.json, `coordinator
results` and the report show.
"""

from __future__ import annotations

import math

import pytest
import torch

from coordinator import spec as spec_mod
from coordinator.privacy import privacy_line, privacy_settings, privacy_summary, record_privacy, site_epsilons
from coordinator.report.tables import privacy_table
from coordinator.run_metrics import RunMetrics
from pipelines.privacy import (
    case_noise_multiplier,
    epsilon_spent,
    is_empty_batch,
    site_dp_history,
    spec_network_dp_problem,
    volume_list_collate,
)
from pipelines.wire import decode_params

DP = {"type": "local", "sigma": 1.0, "clip": 1.0}


def _raw(**extra):
    raw = {
        "name": "dp",
        "plan": "marginal",
        "sites": {"tags": ["x"], "min_sites": 2},
        "rounds": 30,
        "local_steps": 2,
        "split": {"validation": 0.25, "test": 0.25},
        "plan_args": {"schema": "abdominal-ct", "network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "patches_per_volume": 1},
    }
    raw.update(extra)
    return raw


def _problems(**extra) -> list[tuple[str, str]]:
    with pytest.raises(spec_mod.SpecError) as err:
        spec_mod.validate(_raw(**extra), "s.yaml")
    return err.value.problems


# -- the spec -------------------------------------------------------------------------------


def test_dp_passes_into_fedbiomeds_training_args_with_delta_kept_for_the_accounting():
    spec = spec_mod.validate(_raw(dp=DP), "s.yaml")
    assert spec.dp == {"type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1e-5}
    assert spec.training_args()["dp_args"] == {"type": "local", "sigma": 1.0, "clip": 1.0}
    assert not any("dp" in w for w in spec.warnings)  # patches_per_volume 1: the noise per case is sigma
    assert "dp_args" not in spec_mod.validate(_raw(), "s.yaml").training_args()  # off by default


def test_dp_warns_when_a_case_gives_several_patches():
    args = {**_raw()["plan_args"], "patches_per_volume": 2}
    spec = spec_mod.validate(_raw(dp={**DP, "type": "local"}, plan_args=args), "s.yaml")
    assert any("dp.sigma: each case gives plan_args.patches_per_volume (2)" in w and "sigma / 2 = 0.5" in w for w in spec.warnings)


@pytest.mark.parametrize(
    ("dp", "key", "text"),
    [
        ({"type": "local", "sigma": 0, "clip": 1.0}, "dp.sigma", "> 0"),
        ({"type": "local", "sigma": 1.0}, "dp.clip", "required"),
        ({"type": "shuffle", "sigma": 1.0, "clip": 1.0}, "dp.type", "local, central"),
        ({**DP, "delta": 0}, "dp.delta", "between 0 and 1"),
        ({**DP, "epsilon": 3}, "dp.epsilon", ""),
    ],
)
def test_dp_keys_are_checked(dp, key, text):
    problems = dict(_problems(dp=dp))
    assert key in problems and text in problems[key], problems


def test_dp_refuses_what_opacus_cannot_train_with():
    problems = dict(_problems(dp=DP, aggregator="scaffold", fedprox_mu=0.1, device={"precision": "bf16"}))
    assert "scaffold cannot be combined with dp" in problems["aggregator"]
    assert "cannot be combined with dp" in problems["fedprox_mu"]
    assert "bf16 cannot be combined with dp" in problems["device.precision"] and "auto" in problems["device.precision"]
    factory = dict(_problems(plan="data_factory", dp=DP, plan_args={}, split=None, sites={"tags": ["x"]}))
    assert "drop dp" in factory["dp"]
    headed = dict(_problems(dp=DP, plan_args={**_raw()["plan_args"], "presence_head": {"classes": ["liver"]}}))
    assert "cannot be combined with dp" in headed["plan_args.presence_head"] and "drop presence_head or dp" in headed["plan_args.presence_head"]


def test_a_network_with_batch_norm_is_refused_naming_the_layer_and_the_option():
    args = {**_raw()["plan_args"], "network": {"name": "basic_unet", "size": "tiny", "norm": "batch"}}
    (problem,) = [p for k, p in _problems(dp=DP, plan_args=args) if k == "plan_args.network"]
    assert "BatchNorm3d" in problem and "set plan_args.network.norm: instance" in problem
    assert "\n" not in problem


def test_dynunet_is_refused_naming_its_transposed_convolutions():
    problem = spec_network_dp_problem({"name": "dynunet", "size": "small", "spatial_dims": 3, "in_channels": 1})
    assert problem is not None and "ConvTranspose3d" in problem and "basic_unet or mednext" in problem
    assert spec_network_dp_problem({"name": "mednext", "size": "tiny", "spatial_dims": 3, "in_channels": 1, "deep_supervision": True}) is None


# -- the accountant ---------------------------------------------------------------------------


def test_epsilon_composes_over_rounds_and_only_grows():
    eps = [epsilon_spent([(1.0, 0.25, 2)] * n, 1e-5) for n in range(1, 5)]
    assert all(0 < a < b for a, b in zip(eps, eps[1:]))
    assert epsilon_spent([(1.0, 0.25, 4)], 1e-5) == pytest.approx(eps[1])  # two rounds of 2 steps = 4 steps
    assert epsilon_spent([], 1e-5) == 0.0 and epsilon_spent([(1.0, 0.25, 0)], 1e-5) == 0.0
    assert math.isinf(epsilon_spent([(0.0, 0.25, 2)], 1e-5))
    assert epsilon_spent([(2.0, 0.25, 2)], 1e-5) < epsilon_spent([(1.0, 0.25, 2)], 1e-5)  # more noise, less spent
    assert epsilon_spent([(1.0, 0.25, 2)], 1e-3) < epsilon_spent([(1.0, 0.25, 2)], 1e-5)
    assert case_noise_multiplier(1.0, 2) == 0.5 and case_noise_multiplier(1.0, 1) == 1.0


def _row(name: str, steps: int | None = 2) -> dict:
    train = {"loss_mean": 0.5}
    if steps is not None:
        train.update(dp_steps=float(steps), dp_sample_rate=0.25, dp_noise_multiplier=1.0, dp_local=1.0)
    return {"name": name, "train": train}


def test_record_privacy_composes_each_sites_rounds_and_a_missed_round_spends_nothing():
    metrics: dict = {"privacy": privacy_settings({**DP, "delta": 1e-5}), "rounds": []}
    spent = []
    for r, sites in enumerate([{"A": _row("a"), "B": _row("b")}, {"A": _row("a")}, {"A": _row("a"), "B": _row("b")}], start=1):
        record = {"round": r, "sites": sites}
        metrics["rounds"].append(record)
        spent.append(record_privacy(metrics, record))
    assert spent[1] == {"a": pytest.approx(epsilon_spent([(1.0, 0.25, 2)] * 2, 1e-5))}
    a = [s["a"] for s in spent]
    assert a[0] < a[1] < a[2]
    assert spent[2]["b"] == pytest.approx(a[1])  # b trained in rounds 1 and 3 only: as much as a after two rounds
    assert metrics["rounds"][2]["sites"]["B"]["privacy"] == {"epsilon": pytest.approx(a[1]), "delta": 1e-5, "steps": 4, "rounds": 2, "incomplete": False}
    assert site_epsilons(metrics)["b"] == [(1, pytest.approx(a[0])), (3, pytest.approx(a[1]))]
    RunMetrics.of(metrics)  # the typed model takes it
    line = privacy_summary(metrics)
    assert line is not None and "epsilon at delta 1e-05" in line and "b " in line and "after round 3" in line
    assert "a 3.7" in privacy_line(1, 3, {"a": 3.71}, metrics["privacy"])
    table = privacy_table(metrics)
    assert table is not None and table.columns == ["round", "a", "b"] and table.rows[1] == ["2", f"{a[1]:.3g}", "-"]
    assert "delta 1e-05" in table.caption
    assert record_privacy({"rounds": []}, {"round": 1, "sites": {"A": _row("a")}}) == {}  # no dp: nothing recorded


def test_central_dp_states_no_epsilon():
    metrics: dict = {"privacy": privacy_settings({**DP, "type": "central", "delta": 1e-5}), "rounds": []}
    row = _row("a")
    del row["train"]["dp_noise_multiplier"]
    record = {"round": 1, "sites": {"A": row}}
    metrics["rounds"].append(record)
    assert record_privacy(metrics, record) == {"a": None}
    assert row["privacy"]["epsilon"] is None and row["privacy"]["steps"] == 2
    assert "no epsilon can be stated" in (privacy_summary(metrics) or "")
    table = privacy_table(metrics)
    assert table is not None and table.rows == [["central", "1.000", "1.000", "not stated"]]


def test_site_history_skips_rounds_without_dp_scalars():
    assert site_dp_history([_row("a")["train"], _row("a", None)["train"]]) == [(1.0, 0.25, 2)]


# -- the loader and the plan at a site -----------------------------------------------------------


def test_poisson_batches_of_cases_of_any_shape_and_empty_ones():
    from opacus.data_loader import DPDataLoader

    volumes = [(torch.zeros(1, 8 + i, 8, 8), torch.zeros(1, 8 + i, 8, 8)) for i in range(4)]
    loader = torch.utils.data.DataLoader(volumes, batch_size=2, collate_fn=volume_list_collate)
    private = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(0))
    sizes, empty = set(), 0
    for _ in range(30):
        for data, target in private:
            if is_empty_batch(data):
                empty += 1
                continue
            assert isinstance(data, list) and len(data) == len(target)
            sizes.add(len(data))
    assert empty and max(sizes) >= 2  # some steps drew no case, some several (of different shapes)
    assert is_empty_batch(torch.zeros(0, 1, 8, 8, 8)) and is_empty_batch([]) and not is_empty_batch([torch.zeros(1, 8, 8, 8)])


@pytest.fixture
def private_plan(make_private_plan):
    """A marginal plan under ``dp: local``."""
    return make_private_plan("local")


@pytest.fixture
def make_private_plan(fedbiomed_round, tmp_path_factory, tmp_path, monkeypatch, site_process, one_thread):
    """Marginal plans under ``dp`` with their data loaded by Fed-BioMed's own Round code (two cases per batch on average)."""

    from fedimg_testing.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("dp-site") / "prepared"
    write_synthetic_dataset(root, seed=4, n_cases=5, shape=(32, 32, 32))
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))

    def make(dp_type: str):
        return _private_plan(fedbiomed_round, root, dp_type)

    return make


def _private_plan(fedbiomed_round, root, dp_type: str):
    from fedbiomed.common.training_args import TrainingArgs

    from coordinator.plans import model_args_for
    from pipelines.plans.marginal import MarginalSegmentationPlan

    args = model_args_for(
        "marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native", "augment": False, "patches_per_volume": 2}
    )
    args.update(
        run_id="run-dp", rounds_total=2, local_steps=4, device={"gpu": "optional", "precision": "auto"}, split={"validation": 0.2, "test": 0.0, "seed": 0}
    )
    ta = TrainingArgs(
        {
            "loader_args": {"batch_size": 2, "shuffle": True},
            "optimizer_args": {"lr": 1e-3},
            "num_updates": 4,
            "test_ratio": 0.2,
            "test_on_global_updates": False,
            "test_on_local_updates": False,
            "test_batch_size": 1,
            "random_seed": 3,
            "dp_args": {"type": dp_type, "sigma": 1.0, "clip": 1.0},
        },
        only_required=False,
    )
    plan = MarginalSegmentationPlan()
    plan.post_init(args, ta, node_id="NODE_A", round=0)
    r = fedbiomed_round.__new__(fedbiomed_round)
    r.training_plan, r.training_arguments = plan, ta
    r.testing_arguments, r.loader_arguments = ta.testing_arguments(), ta.loader_arguments()
    r.dataset_entry = {"path": str(root), "dataset_parameters": {}}
    r._dlp_and_loading_block_metadata = None
    r._testing_indexes = {"testing_index": [], "training_index": [], "test_ratio": None}
    r.researcher_id = "researcher"
    r._set_training_testing_data_loaders()
    return plan


class Monitor:
    def __init__(self):
        self.scalars: list[dict] = []

    def add_scalar(self, **kwargs):
        self.scalars.append(kwargs)


def test_a_private_round_at_a_site_reports_its_accounting_and_sends_the_plain_model(private_plan):
    plan = private_plan
    assert all(not getattr(m, "inplace", False) for m in plan.model().modules())  # in-place activations off
    before = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    monitor = Monitor()
    plan.training_routine(history_monitor=monitor, node_args={"gpu": False})
    (train,) = [s["metric"] for s in monitor.scalars if "dp_steps" in s["metric"]]
    assert not [s for s in monitor.scalars if s.get("train") and "Loss" in s["metric"]]  # Fed-BioMed's per-batch loss stays at the site
    assert not {"loss_mean", "sup_loss", "condist_loss"} & set(train)  # so do the plan's: computed on training cases, outside the mechanism
    assert train["dp_steps"] == 4.0 and train["dp_local"] == 1.0 and train["dp_clip"] == 1.0
    assert train["dp_sample_rate"] == pytest.approx(0.5)  # batch size 2 of 4 training cases
    assert train["dp_noise_multiplier"] == pytest.approx(0.5)  # sigma / patches_per_volume
    assert plan._precision is not None and plan._precision.name == "fp32"
    params = decode_params(plan.after_training_params())  # what the node sends, as the coordinator reads it
    assert set(params) == set(before)  # Opacus's `_module.` prefix is gone: the coordinator's model
    assert any(not torch.equal(params[k], before[k]) for k in params)


def test_each_cases_loss_is_its_own(private_plan):
    plan = private_plan
    plan.training_routine(history_monitor=None, node_args={"gpu": False})  # sets the round's objective
    torch.manual_seed(0)
    outputs, labels = torch.randn(4, plan._settings.num_classes, 8, 8, 8), torch.randint(0, 2, (4, 1, 8, 8, 8))
    loss, _ = plan._per_case_objective(outputs, labels, None, 2)
    first, _ = plan._objective(outputs[:2], labels[:2], None, plan._lambda)
    second, _ = plan._objective(outputs[2:], labels[2:], None, plan._lambda)
    assert float(loss) == pytest.approx(float((first + second) / 2))


def test_central_dp_adds_noise_once_to_the_parameters_sent(make_private_plan):
    plan = make_private_plan("central")
    monitor = Monitor()
    plan.training_routine(history_monitor=monitor, node_args={"gpu": False})
    (train,) = [s["metric"] for s in monitor.scalars if "dp_steps" in s["metric"]]
    assert train["dp_local"] == 0.0 and train["dp_steps"] == 4.0 and "dp_noise_multiplier" not in train  # no epsilon to compose
    trained = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    sent = decode_params(plan.after_training_params())  # what the node sends, as the coordinator reads it
    noise = torch.cat([(sent[k] - trained[f"_module.{k}"]).flatten() for k in sent if f"_module.{k}" in trained])
    assert noise.numel() > 1000 and 0.9 < float(noise.std()) < 1.1  # sigma * clip
