"""Coordinator side of the data factory: spec, site sampling, client ids, sample grids."""

import collections

import pytest
import torch
import yaml

from coordinator import spec as spec_mod
from coordinator.engine import client_ids
from coordinator.strategy import SampledSitesStrategy
from pipelines.sampling import sample_sites

BASE = {
    "name": "fac",
    "plan": "data_factory",
    "sites": {"tags": ["t"], "min_sites": 3},
    "rounds": 4,
    "plan_args": {"factory": {"preset": "tiny"}},
}


def _spec(**over):
    return spec_mod.validate({**BASE, **over}, "spec.yaml")


def test_factory_spec_defaults_and_model_args():
    s = _spec()
    assert s.is_factory and s.batch_size == 8 and s.held_out == 0 and s.clients_per_round == 2 and s.weights == "equal"
    args = s.experiment_model_args(run_id="r1", client_ids={"n-a": 0, "n-b": 1})
    assert args["client_ids"] == {"n-a": 0, "n-b": 1} and args["run_id"] == "r1" and args["rounds_total"] == 4
    assert args["schema_definition"]["name"] == "abdominal-ct"
    assert s.training_args()["test_ratio"] == 0 and "split" not in args
    # segmentation plans keep every site every round unless asked
    seg = spec_mod.validate({**BASE, "plan": "condistfl", "plan_args": {}}, "spec.yaml")
    assert seg.clients_per_round is None and "client_ids" not in seg.experiment_model_args("r")
    with pytest.raises(spec_mod.SpecError, match="clients_per_round: is only for the data_factory plan"):
        spec_mod.validate({**BASE, "plan": "condistfl", "plan_args": {}, "clients_per_round": 2}, "spec.yaml")
    assert s.optimizer == {"lr": 0.002} and _spec(optimizer={"lr": 0.001}).optimizer == {"lr": 0.001}


@pytest.mark.parametrize(
    "over, key",
    [
        ({"test_ratio": 0.2}, "test_ratio"),
        ({"split": {"validation": 0.2, "test": 0}}, "split"),
        ({"weights": "samples"}, "weights"),
        ({"server_optimizer": {"name": "adam"}}, "plan"),
        ({"mode": "standalone"}, "plan"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"optimizer": {"lr": "fast"}}, "optimizer"),
        ({"optimizer": {"lr": 0.002, "betas": [0, 0.99]}}, "optimizer"),
        ({"plan_args": {"refine_rounds": 9}}, "plan_args.refine_rounds"),
        ({"plan_args": {"factory": {"n_clients": 3}}}, "plan_args.factory.n_clients"),
        ({"plan_args": {"client_ids": {"x": 0}}}, "plan_args.client_ids"),
        ({"plan_args": {"key": {"kind": "clip"}}}, "plan_args.key"),
        ({"plan_args": {"factory": {"channels": [8]}}}, "plan_args.factory.channels"),
    ],
)
def test_factory_spec_errors_name_the_key(over, key):
    with pytest.raises(spec_mod.SpecError) as exc:
        _spec(**over)
    assert f"spec.yaml: {key}" in str(exc.value)


def test_example_spec_is_valid():
    from importlib import resources

    text = resources.files("coordinator").joinpath("examples/phantom_factory.yaml").read_text()
    s = spec_mod.parse(text, "phantom_factory.yaml")
    assert s.plan == "data_factory" and s.clients_per_round == 2
    assert yaml.safe_load(text)["plan_args"]["key"]["kind"] == "random_cnn+histogram"


def test_sampling_is_seeded_uniform_and_covers_every_site():
    nodes = [f"NODE_{i}" for i in range(5)]
    draws = [sample_sites(nodes, 2, seed=7, round_i=r) for r in range(400)]
    assert draws == [sample_sites(list(reversed(nodes)), 2, seed=7, round_i=r) for r in range(400)]  # order-free
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws)
    counts = collections.Counter(n for d in draws for n in d)
    assert set(counts) == set(nodes) and max(counts.values()) / min(counts.values()) < 1.4
    assert draws != [sample_sites(nodes, 2, seed=8, round_i=r) for r in range(400)]
    assert sample_sites(nodes, None, 0, 0) == sorted(nodes) and sample_sites(nodes[:2], 3, 0, 0) == nodes[:2]


def test_strategy_samples_logs_and_weights_uniformly():
    strat = SampledSitesStrategy(clients_per_round=2, seed=1, uniform=True)
    nodes = ["A", "B", "C"]
    chosen = strat.sample_nodes(nodes, round_i=0)
    assert chosen == sample_sites(nodes, 2, 1, 0) and strat.history[0] == chosen
    replies = {n: {"success": True, "node_id": n, "params": {"w": torch.ones(1)}, "sample_size": s} for n, s in zip(chosen, (10, 90))}
    _, weights, total, _ = strat.refine(replies, 0)
    assert weights == {chosen[0]: 0.5, chosen[1]: 0.5} and total == 100
    by_samples = SampledSitesStrategy(clients_per_round=2, seed=1, uniform=False)
    by_samples.sample_nodes(nodes, 0)
    _, weights, _, _ = by_samples.refine(replies, 0)
    assert weights[chosen[0]] == pytest.approx(0.1)
    # a missing reply from a sampled site is an error, as in Fed-BioMed's default strategy
    with pytest.raises(Exception):
        strat.refine({chosen[0]: replies[chosen[0]]}, 0)
    # breakpoints keep the parameters and the draws
    state = strat.save_state_breakpoint()
    again = SampledSitesStrategy()
    again.load_state_breakpoint(state)
    assert again._parameters == strat._parameters and again.history == strat.history


def test_client_ids_follow_site_names():
    assert client_ids({"N2": "site-b", "N1": "site-c", "N3": "site-a"}) == {"N3": 0, "N2": 1, "N1": 2}


def test_sample_grid_rows_are_client_conditions(tmp_path):
    from coordinator.factory import sample_images, write_sample_grid
    from pipelines.factory.networks import FactoryConfig, Generator

    torch.manual_seed(0)
    g = Generator(FactoryConfig.preset("tiny", resolution=16, channels=(16, 16, 8), n_clients=3, n_bins=5))
    imgs = sample_images(g, 3, 5, columns=4)
    assert imgs.shape == (3, 4, 16, 16)
    assert torch.equal(imgs, sample_images(g, 3, 5, columns=4))  # fixed z and noise
    assert not torch.allclose(imgs[0], imgs[1])
    write_sample_grid(tmp_path / "g.png", imgs, {0: "site-a"}, "t", 5)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def _factory_run(tmp_path, site="site-a"):
    """A finished factory run directory: metrics of two rounds, two sample grids and the loss curves."""
    import json

    from coordinator import runs
    from coordinator.factory import write_loss_plot, write_sample_grid

    run_dir = tmp_path / "runs" / "20260101-000000-fac-abcd"
    run_dir.mkdir(parents=True)
    runs.write_state(run_dir, {"run_id": run_dir.name, "name": "fac", "status": "done"})
    train = {"client_id": 0.0, "d_loss": 1.25, "g_loss": 0.5, "r1": 0.01, "key_checksum32": 12345.0}
    metrics = {
        "plan": "data_factory",
        "rounds_planned": 2,
        "clients": {site: 0},
        "rounds": [{"round": r, "wall_s": 1.0, "update_norm": 0.1, "sites": {"N0": {"name": site, "train": train}}} for r in (1, 2)],
        "published": {"kind": "factory", "name": "fac", "version": "v0001"},
        "old_key": "kept",  # a key an older version wrote: still opens, kept as is
    }
    runs.write_metrics(run_dir, metrics)
    assert json.loads((run_dir / "metrics.json").read_text())["old_key"] == "kept"
    imgs = torch.zeros(1, 2, 8, 8)
    for r in (1, 2):
        write_sample_grid(run_dir / "samples" / f"round_{r:04d}.png", imgs, {0: site}, f"round {r}", 4)
    write_loss_plot(run_dir / "samples" / "losses.png", metrics)
    return run_dir


def test_factory_report(tmp_path):
    from coordinator.factory import write_report

    run_dir = _factory_run(tmp_path)
    out = write_report(run_dir)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "losses.png", "round_0001.png", "round_0002.png"]
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "published: factory/fac v0001" in page and "every site reported the same key-function checksum" in page
    assert "status done, 2/2 rounds; clients: site-a = 0" in page
    assert '<img src="round_0002.png"' in page and '<img src="round_0001.png"' in page and '<img src="losses.png"' in page
    assert '<tr><th scope="row">2</th><td>site-a</td><td>0</td><td>1.250</td><td>0.500</td><td>-</td>' in page


def test_factory_report_escapes_site_names(tmp_path):
    from coordinator.factory import write_report

    evil = "<script>alert('x')</script>"
    page = (write_report(_factory_run(tmp_path, site=evil)) / "index.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page
