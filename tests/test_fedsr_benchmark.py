"""benchmarks/fedsr_methods.py: the --quick path end to end, and the simulated federation's sharing rules."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from conftest import ROOT


def _load():
    """The script as a module, registered first: its dataclasses look their module up while being built."""
    spec = importlib.util.spec_from_file_location("fedsr_methods", ROOT / "benchmarks" / "fedsr_methods.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedsr_methods"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()

FINITE = ("seg_dice", "seg_jaccard", "seg_hd95_mm", "seg_asd_mm", "seg_avd_percent", "reg_dice_mean", "reg_ncc", "reg_local_ncc")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (2 sites, 24^3, 2 rounds x 2 steps, the last fine-tuning), its federations kept."""
    tmp = tmp_path_factory.mktemp("fedsr-bench")
    args = bench.parse_args(["--quick", "--out", str(tmp / "out"), "--workdir", str(tmp / "data")])
    return args, bench.run(args, keep_federations=True)


def _decoder(model, part: str = "segmentation_decoder") -> dict[str, torch.Tensor]:
    return getattr(model.network, part).state_dict()


def _received(fed, site: str):
    """The site's model as it starts a next round: the global shared state over its own parts."""
    model = fed.models[site]
    model.load_state_dict(fed.global_state, strict=False)
    return model


def test_every_method_scores_every_site_and_the_tables_are_written(quick):
    args, result = quick
    sites = list(result.config.sites)
    assert set(result.scores) == set(bench.METHODS) | {bench.FEDAVG_GLOBAL}
    for method, per_seed in result.scores.items():
        for site in sites:
            metrics = per_seed[0][site]["metrics"]
            assert metrics["n_cases"] == 1.0
            bad = {k: metrics[k] for k in FINITE if not math.isfinite(metrics[k])}
            assert not bad, (method, site, bad)
    markdown = (args.out / "results.md").read_text()
    table_i = markdown.split("**Table IV")[0]
    for method in (*bench.METHODS, bench.FEDAVG_GLOBAL, bench.FLOOR):
        assert sum(line.startswith(f"| {bench.NAMES[method]} |") for line in table_i.splitlines()) == 1, method
    record = json.loads((args.out / "benchmark.json").read_text())
    assert set(record["summary"]) == set(bench.METHODS) | {bench.FEDAVG_GLOBAL, bench.FLOOR}
    assert record["config"]["rounds"] == 2 and record["command"].endswith("--quick --out " + str(args.out))
    # the floor is the atlas as it is: registration and segmentation Dice are the same overlap
    for site in sites:
        floor = result.floor[site]["metrics"]
        assert floor["seg_dice"] == pytest.approx(floor["reg_dice_mean"]) and 0.3 < floor["seg_dice"] < 0.95


def test_fedavg_shares_the_decoders_fedsr_and_fedrep_keep_them(quick):
    _, result = quick
    sites = list(result.config.sites)
    fedavg = result.federations[("fedavg", 0)]["federation"]
    received = [_decoder(_received(fedavg, s)) for s in sites]
    assert all(torch.equal(received[0][k], other[k]) for other in received[1:] for k in received[0])
    for method in ("fedsr", "fedrep"):
        fed = result.federations[(method, 0)]["federation"]
        for part in ("segmentation_decoder", "registration_decoder"):
            own = [_decoder(_received(fed, s), part) for s in sites]
            assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0]), (method, part)
        # what they share is shared: every site starts the next round from the same encoder
        encoders = [_received(fed, s).network.encoder.state_dict() for s in sites]
        assert all(torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[0])
    # FedSR's SA representation is shared and moved off the atlas's; FedRep has none
    assert torch.count_nonzero(result.federations[("fedsr", 0)]["federation"].global_state["sa_representation"]) > 0
    assert "sa_representation" not in result.federations[("fedrep", 0)]["federation"].global_state


def test_standalone_sites_never_share(quick):
    _, result = quick
    alone = result.federations[("standalone", 0)]["standalone"]
    assert alone.global_state is None
    a, b = (alone.models[s].network.encoder.state_dict() for s in result.config.sites)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_finetuning_leaves_the_encoder_the_global_one(quick):
    _, result = quick
    for method in bench.FEDERATED:
        fed = result.federations[(method, 0)]["federation"]
        received = {k[len("network.encoder.") :]: v for k, v in fed.last_received.items() if k.startswith("network.encoder.")}
        for site in result.config.sites:
            for model in (fed.scored[site], fed.models[site]):
                encoder = model.network.encoder.state_dict()
                assert all(torch.equal(encoder[k], received[k]) for k in received), (method, site)
        # every site sends the received encoder back: the average is that encoder (float rounding aside)
        for k, v in received.items():
            assert torch.allclose(fed.global_state[f"network.encoder.{k}"], v, atol=1e-6), (method, k)
    # centralised: each site fine-tunes its decoders on the centrally trained encoder, frozen
    stages = result.federations[("centralised", 0)]
    central = stages["pretraining"].models[bench.CENTRAL_SITE]
    for site in result.config.sites:
        tuned = stages[f"finetuning {site}"].scored[site]
        ref = central.network.encoder.state_dict()
        assert all(torch.equal(tuned.network.encoder.state_dict()[k], ref[k]) for k in ref)
        assert any(not torch.equal(_decoder(tuned)[k], _decoder(central)[k]) for k in _decoder(central))
