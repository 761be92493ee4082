"""The science's typed config models: plan args (both plans), GIN, factory, key, adaptation, branch, pushed branch meta."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from coordinator.plans import PlanArgsError, check_plan_args
from fedimg_core.config import ConfigValueError
from fedimg_core.errors import FedimgError, UserError
from pipelines.factory.config import FactoryConfig
from pipelines.factory.plan_args import FactoryPlanArgs, parse_factory_args
from pipelines.plan_args import PlanArgs, parse_plan_args
from pipelines.plan_args_common import InvalidPlanArgs, PlanArgsBase
from preprocessing.schema import load_schema


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_both_plans_share_one_base():
    assert issubclass(PlanArgs, PlanArgsBase) and issubclass(FactoryPlanArgs, PlanArgsBase)
    shared = {"spacing", "keep_optimizer_state", "rounds_total", "local_steps", "run_id"}
    assert shared <= set(PlanArgs.model_fields) & set(FactoryPlanArgs.model_fields)


@pytest.mark.parametrize("key", ["r1_gamma", "pl_weight", "ema_decay", "key_align_weight", "min_foreground"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_factory_numbers_refuse_nan_and_infinities(key, bad):
    with pytest.raises(InvalidPlanArgs) as info:
        parse_factory_args({key: bad})
    assert info.value.key == f"plan_args.{key}" and str(info.value).startswith(f"plan_args.{key}: must be")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_segmentation_numbers_refuse_nan_and_infinities(schema, bad):
    with pytest.raises(InvalidPlanArgs, match=r"^plan_args\.temperature: must be a finite number"):
        parse_plan_args({"temperature": bad}, schema)


def test_every_problem_is_listed_with_its_key(schema):
    with pytest.raises(InvalidPlanArgs) as info:
        parse_plan_args({"roi_sise": 32, "augment": "yes", "gin": {"prob": 2}, "inference": {"overlap": 0.95}}, schema)
    err = info.value
    keys = [k for k, _ in err.problems]
    assert keys == ["plan_args.roi_sise", "plan_args.augment", "plan_args.gin.prob", "plan_args.inference.overlap"]
    assert str(err).startswith("plan_args: 4 problems:\n  plan_args.roi_sise: unknown key; did you mean 'roi_size'?")
    assert isinstance(err, ValueError) and isinstance(err, FedimgError) and not isinstance(err, UserError)


def test_check_plan_args_takes_keys_from_the_error_not_its_message():
    out, problems = check_plan_args("condistfl", {"gin": {"prob": 2}, "lambda": [1], "zzz": 1, "rounds_total": 3})
    assert out == {}
    assert [(p.key, p.problem) for p in problems] == [
        ("rounds_total", "is filled in by the coordinator from the spec (rounds, local_steps, aggregator, device), the run and the sites"),
        ("zzz", "unknown key (allowed: schema, network, roi_size, patches_per_volume, spacing, temperature, lambda, lr_schedule, augment, gin, "
                "predict_classes, inference, keep_optimizer_state, background_prior, mirror_axes, presence_head)"),
        ("lambda", "must be [start, end], two numbers >= 0 (got [1])"),
        ("gin.prob", "must be within [0, 1] (got 2)"),
    ]  # fmt: skip
    assert all(isinstance(p, PlanArgsError) and str(p) == f"{p.key}: {p.problem}" for p in problems)


def test_a_bad_schema_does_not_hide_the_other_problems():
    _, problems = check_plan_args("condistfl", {"schema": "nope", "roi_size": 4, "predict_classes": ["liver"]}, allow_files=False)
    assert [p.key for p in problems] == ["schema", "roi_size"]


def test_factory_problems_from_nested_configs_keep_their_key_path():
    _, problems = check_plan_args("data_factory", {"factory": {"resolution": 48}, "key": {"kind": "random_cnn", "proj_dimm": 8}})
    assert [p.key for p in problems] == ["key.proj_dimm"]  # the key width comes first: the factory config needs it
    _, problems = check_plan_args("data_factory", {"factory": {"resolution": 48}, "diff_augment": {"cutout": 2}})
    assert [p.key for p in problems] == ["diff_augment.cutout"]
    _, problems = check_plan_args("data_factory", {"factory": {"resolution": 48}})
    assert [p.key for p in problems] == ["factory.resolution"]


def test_factory_config_is_a_frozen_model_with_worded_errors():
    cfg = FactoryConfig.preset("small", n_clients=3)
    assert FactoryConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(FactoryConfig.from_dict(cfg.to_dict()))
    with pytest.raises(Exception):
        cfg.resolution = 32  # type: ignore[misc]
    with pytest.raises(ConfigValueError) as info:
        FactoryConfig.from_dict({"z_dim": 0, "key_mix": math.nan}, where="x.json: factory")
    assert info.value.problems == [
        ("x.json: factory.z_dim", "must be an integer >= 1 (got 0)"),
        ("x.json: factory.key_mix", "must be a finite number (got nan)"),
    ]


def test_branch_file_is_its_own_module_and_networks_still_exports_it():
    from pipelines.adaptation import branch_file, networks

    for name in ("validate_branch_files", "load_branch", "branch_files", "validate_branch_config", "BRANCH_CONFIG_FILE", "BRANCH_WEIGHTS_FILE"):
        assert getattr(networks, name) is getattr(branch_file, name)
    with pytest.raises(AttributeError):
        networks.no_such_name  # noqa: B018
    assert issubclass(branch_file.BranchFileError, ValueError)


def test_adaptation_configs_import_no_torch():
    code = "import sys, pipelines.adaptation.config, coordinator.plans; print(sorted(m for m in ('torch', 'monai', 'fedbiomed') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_pushed_branch_meta():
    from coordinator.branches import PushedMeta

    ok = PushedMeta.model_validate({"validation_dice": {"liver": 0.5, "spleen": None}, "steps": 10}, context={"classes": ["liver", "spleen"]})
    assert ok.validation_dice == {"liver": 0.5, "spleen": None} and ok.steps == 10
    for bad in ({"steps": 0}, {"steps": True}, {"validation_dice": {"liver": 1.5}}, {"validation_dice": {"kidney": 0.5}}, {"validation_dice": [0.5]}):
        with pytest.raises(ValueError):
            PushedMeta.model_validate(bad, context={"classes": ["liver"]})
