"""The initial model's background prior (`plan_args.background_prior`): validated, set on every output head, used by the plans."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from pipelines.networks import build_network, main_output, output_biases, set_background_prior
from pipelines.plan_args import InvalidPlanArgs, parse_plan_args
from pipelines.plans.condistfl import ConDistFLPlan
from preprocessing.schema import builtin_schema_path, load_schema

SCHEMA = load_schema()
NETWORKS = [
    {"name": "mednext", "size": "tiny", "deep_supervision": True},
    {"name": "dynunet", "size": "tiny", "deep_supervision": True},
    {"name": "basic_unet", "size": "tiny"},
    {"name": "flexible_unet", "size": "tiny"},
]


@pytest.mark.parametrize("cfg", NETWORKS, ids=lambda c: c["name"])
def test_prior_sets_every_output_head(cfg):
    torch.manual_seed(0)
    dims = 2 if cfg["name"] == "flexible_unet" else 3  # its EfficientNet encoder is slow in 3D on plain CPU kernels
    net = build_network(out_channels=8, spatial_dims=dims, **cfg)
    heads = output_biases(net, 8)
    assert len(heads) == (5 if cfg["name"] == "mednext" else 2 if cfg["name"] == "dynunet" else 1)
    set_background_prior(net, 8, 0.9)
    for bias in heads:
        assert bias[0].item() == pytest.approx(math.log(0.9 * 7 / 0.1))
        assert torch.all(bias[1:] == 0)
    net.eval()
    with torch.no_grad():
        p = torch.softmax(main_output(net(torch.zeros((1, 1) + (64,) * dims)), dims), dim=1)
    # features of an all-zero image are small: background starts near the prior everywhere, every other class far below it
    assert p[:, 0].mean().item() == pytest.approx(0.9, abs=0.05)
    assert p[:, 1:].mean(dim=(0, *range(2, 2 + dims))).max().item() < 0.05


def test_prior_refuses_bad_values():
    net = build_network(out_channels=8, spatial_dims=3, name="basic_unet", size="tiny")
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="background prior"):
            set_background_prior(net, 8, bad)
    with pytest.raises(ValueError, match="no output layer bias"):
        output_biases(net, 5)  # not this network's number of classes


def test_plan_args_validate_the_prior():
    assert parse_plan_args({"background_prior": 0.9}, SCHEMA).background_prior == 0.9
    assert parse_plan_args({}, SCHEMA).background_prior is None
    with pytest.raises(InvalidPlanArgs, match="plan_args.background_prior"):
        parse_plan_args({"background_prior": 1.5}, SCHEMA)


def test_plan_builds_the_initial_model_with_the_prior():
    args = {"network": NETWORKS[0], "roi_size": [32, 32, 32], "schema_definition": yaml.safe_load(builtin_schema_path("abdominal-ct").read_text())}
    plain = ConDistFLPlan().init_model(dict(args))
    primed = ConDistFLPlan().init_model({**args, "background_prior": 0.8})
    expected = math.log(0.8 * (SCHEMA.num_classes - 1) / 0.2)
    assert all(b[0].item() == pytest.approx(expected) for b in output_biases(primed, SCHEMA.num_classes))
    assert not any(b[0].item() == pytest.approx(expected) for b in output_biases(plain, SCHEMA.num_classes))
