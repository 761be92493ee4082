"""The papers' configurations as example specs (issue 22): each validates at full scale, builds the paper's
networks, and runs at ``--scale tiny`` on the CPU through the same code path (the site's training round)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from coordinator import spec as spec_mod
from coordinator.plans import FACTORY_PLANS
from fedimg_core.devices import DEVICE_ENV
from pipelines.wire import decode_params
from tests.conftest import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "coordinator" / "examples"
CONDISTFL_3D = EXAMPLES / "paper_condistfl_3d.yaml"
FACTORY_512 = EXAMPLES / "paper_factory_512.yaml"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_condistfl_3d_spec_is_the_papers_configuration():
    s = spec_mod.load(CONDISTFL_3D)
    assert (s.plan, s.rounds, s.local_steps, s.weights, s.aggregator, s.min_sites) == ("condistfl", 120, 1000, "equal", "fedavg", 4)
    assert s.optimizer["lr"] == 0.001 and s.device == {"gpu": "required", "precision": "auto"}
    from pipelines.plans.segmentation import settings_from_model_args

    settings = settings_from_model_args(s.experiment_model_args(run_id="r"))
    assert settings.roi_size == (128, 128, 128) and settings.lr_schedule == "cosine" and settings.gpu == "required"
    assert settings.network["name"] == "mednext" and settings.network["size"] == "base"
    assert tuple(settings.schema.target_spacing) == (1.5, 1.5, 1.5) and settings.spacing == "schema"


def test_the_factory_512_spec_builds_the_papers_networks():
    s = spec_mod.load(FACTORY_512)
    assert (s.rounds, s.local_steps, s.batch_size, s.clients_per_round) == (385, 2000, 16, 2)
    from pipelines.plans.data_factory import DataFactoryPlan

    model = DataFactoryPlan().init_model(s.experiment_model_args(run_id="r", client_ids={"NODE_A": 0, "NODE_B": 1, "NODE_C": 2}))
    assert model.config.resolution == 512
    # the method notes: G ~30.6 M and D ~29.7 M parameters at 512 px (ours adds the client and key embeddings)
    assert 28e6 < _params(model.generator) < 34e6 and 27e6 < _params(model.discriminator) < 33e6


@pytest.mark.parametrize("path", [CONDISTFL_3D, FACTORY_512], ids=["condistfl_3d", "factory_512"])
def test_tiny_scale_keeps_the_method_and_shrinks_the_cost(path):
    full, tiny = spec_mod.load(path), spec_mod.load(path, scale="tiny")
    assert tiny.name == f"{full.name}-tiny" and (tiny.plan, tiny.aggregator, tiny.weights, tiny.optimizer) == (
        full.plan,
        full.aggregator,
        full.weights,
        full.optimizer,
    )
    assert tiny.rounds == 2 and tiny.local_steps == 2 and tiny.device["gpu"] == "optional"
    args = tiny.experiment_model_args(run_id="r", client_ids={"NODE_A": 0})
    if tiny.plan in FACTORY_PLANS:
        assert args["factory"] == {"preset": "tiny"} and args["refine_rounds"] == 1
    else:
        assert args["network"]["size"] == "tiny" and args["roi_size"] == [32, 32, 32]
        assert args["temperature"] == full.model_args["temperature"] and args["lambda"] == full.model_args["lambda"]


def test_validate_and_the_recorded_spec_say_tiny(tmp_path):
    done = cli("coordinator", "validate", str(CONDISTFL_3D), "--scale", "tiny")
    assert done.returncode == 0 and "ok: paper-condistfl-3d-tiny: plan condistfl (federated), 2 rounds x 2 steps" in done.stdout
    assert "too few to learn much" not in done.stdout + done.stderr  # shrunk on purpose: not warned about
    shrunk = spec_mod.scale_raw(yaml.safe_load(CONDISTFL_3D.read_text()), "tiny")
    assert any("too few to learn much" in w for w in spec_mod.validate(shrunk, "written small").warnings)  # a spec written that small is
    from coordinator.commands.common import spec_text

    text = spec_text(CONDISTFL_3D, spec_mod.load(CONDISTFL_3D, scale="tiny"), "tiny")
    again = spec_mod.parse(text, "recorded")  # what `coordinator resume` reads back runs the same tiny spec
    assert again.name == "paper-condistfl-3d-tiny" and again.rounds == 2 and again.model_args["roi_size"] == [32, 32, 32]


def test_the_tiny_condistfl_3d_round_trains_on_the_sites_device(fedbiomed_round, tmp_path, monkeypatch, site_process, one_thread):
    """A site's round of the tiny paper spec: the spec's own model and training arguments, Fed-BioMed's Round
    loading the data, the ConDistFL plan training where the site's `auto` says (the CPU here; a GPU where there is one)."""
    from fedbiomed.common.training_args import TrainingArgs

    from fedimg_testing.synthetic import write_synthetic_dataset
    from pipelines.plans.condistfl import ConDistFLPlan
    from tests.test_split_data import _fedbiomed_round

    root = tmp_path / "prepared"
    write_synthetic_dataset(root, seed=2, n_cases=5, shape=(40, 40, 40))
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(DEVICE_ENV, "auto")
    s = spec_mod.load(CONDISTFL_3D, scale="tiny")
    args = s.experiment_model_args(run_id="tiny-run")
    args["spacing"] = "native"  # the synthetic volumes' own grid (the spec's 1.5 mm would resample them)
    training_args = TrainingArgs(s.training_args(), only_required=False)
    plan = ConDistFLPlan()
    plan.post_init(args, training_args, node_id="NODE_A", round=0)
    _fedbiomed_round(fedbiomed_round, plan, root, {}, test_ratio=s.held_out)
    before = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    samples = plan.training_routine(history_monitor=None, node_args={"gpu": False})
    assert samples > 0 and plan._device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    after = decode_params(plan.after_training_params())  # what the node sends, as the coordinator reads it
    assert any(not torch.equal(after[k], before[k]) for k in after) and all(v.device.type == "cpu" for v in after.values())
