"""The in-process replay of the data-factory federation (pipelines.factory.simulate)."""

import pytest
import torch

from pipelines.factory.simulate import SimulatedSite, average_into, load_shared, simulate_federation, train_pooled
from pipelines.factory.training import FactoryModel, is_key_pathway, parse_factory_args
from pipelines.sampling import sample_sites

FACTORY = dict(preset="tiny", resolution=16, channels=[16, 16, 8], z_dim=16, w_dim=16, mapping_layers=1, n_bins=4)


def _settings(key=None, **over):
    return parse_factory_args({"factory": FACTORY, "key": key, "client_ids": {"a": 0, "b": 1, "c": 2}, **over})


def _sites(n=3, key_dim=0):
    g = torch.Generator().manual_seed(1)
    return [
        SimulatedSite(name, cid, torch.rand(12, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (12,), generator=g),
                      key=torch.nn.functional.normalize(torch.randn(key_dim, generator=g), dim=0) if key_dim else None)
        for cid, name in enumerate("abc"[:n])
    ]  # fmt: skip


def test_average_is_uniform_mean_and_key_layers_stay_local():
    s = _settings(key={"kind": "histogram", "bins": 8})
    torch.manual_seed(0)
    models = [FactoryModel(s.config) for _ in range(3)]
    dst = FactoryModel(s.config)
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    average_into(dst, models[:2])
    params = [dict(m.named_parameters()) for m in models]
    key_layers = 0
    for name, p in dst.named_parameters():
        if is_key_pathway(name):
            key_layers += 1
            assert torch.equal(p, before[name])  # never averaged
        else:
            assert torch.allclose(p, (params[0][name] + params[1][name]) / 2)  # uniform, site 3 not in it
    assert key_layers > 0
    load_shared(models[2], dst)
    for name, p in models[2].named_parameters():
        assert torch.equal(p, dst.get_parameter(name)) != is_key_pathway(name)


def test_rounds_follow_the_coordinator_draw_and_keep_site_state():
    s = _settings()
    sites = _sites()
    model, history = simulate_federation(sites, s, rounds=4, local_steps=3, batch_size=4, clients_per_round=2, seed=5)
    assert [r["sampled"] for r in history] == [sample_sites(["a", "b", "c"], 2, 5, i) for i in range(4)]
    assert all(r["updates"] == 6 for r in history)
    times = {n: sum(n in r["sampled"] for r in history) for n in "abc"}
    for site in sites:  # step counters continue across rounds (optimizer state kept, not restarted)
        assert (site.updater_state or {"updates": 0})["updates"] == 3 * times[site.name]
    # the global model is the mean of the last round's sampled sites
    last = [x for x in sites if x.name in history[-1]["sampled"]]
    for name, p in model.named_parameters():
        assert torch.allclose(p, torch.stack([x.model.get_parameter(name) for x in last]).mean(0), atol=1e-6)


def test_keep_optimizer_state_false_restarts_counters():
    s = _settings(keep_optimizer_state=False)
    sites = _sites(2)
    simulate_federation(sites, s, rounds=3, local_steps=2, batch_size=4, clients_per_round=None, seed=0)
    assert all(x.updater_state["updates"] == 2 for x in sites)


def test_same_seed_same_factory_and_budget_stops():
    s = _settings()
    a, _ = simulate_federation(_sites(), s, rounds=2, local_steps=2, batch_size=4, seed=3)
    b, _ = simulate_federation(_sites(), s, rounds=2, local_steps=2, batch_size=4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    _, history = simulate_federation(_sites(), s, rounds=None, local_steps=1, batch_size=4, budget_s=0.0)
    assert history == []
    with pytest.raises(ValueError, match="rounds or budget_s"):
        simulate_federation(_sites(), s, rounds=None, local_steps=1, batch_size=4)
    with pytest.raises(ValueError, match="distinct client ids"):
        simulate_federation(_sites()[:1] * 2, s, rounds=1, local_steps=1, batch_size=4)


def test_pooled_reference_mixes_client_ids():
    s = _settings()
    x = torch.rand(10, 1, 16, 16) * 2 - 1
    model, done = train_pooled(x, torch.randint(0, 4, (10,)), torch.arange(10) % 3, s, updates=4, batch_size=4)
    assert done == 4 and isinstance(model, FactoryModel)


def test_each_site_draws_its_own_key_layers_and_refinement_is_refused():
    s = _settings(key={"kind": "histogram", "bins": 8})
    sites = _sites(key_dim=s.config.key_dim)
    simulate_federation(sites, s, rounds=1, local_steps=1, batch_size=4, clients_per_round=1)
    layers = [{n: p for n, p in x.model.named_parameters() if is_key_pathway(n)} for x in sites]
    untouched = [x for x in sites if x.updater_state is None]  # not sampled: still its initial draw
    assert untouched and all(not torch.equal(layers[0][n], layers[1][n]) for n in layers[0] if not n.startswith("g_ema."))
    with pytest.raises(ValueError, match="refine_rounds"):
        simulate_federation(_sites(key_dim=s.config.key_dim), _settings(key={"kind": "histogram", "bins": 8}, refine_rounds=1),
                            rounds=1, local_steps=1, batch_size=4)  # fmt: skip


def test_on_round_sees_each_rounds_aggregate():
    s = _settings()
    seen = []

    def on_round(i, sampled, row, model):
        seen.append((i, sampled, row["updates"], {k: v.clone() for k, v in model.g_ema.state_dict().items()}))

    model, history = simulate_federation(_sites(), s, rounds=3, local_steps=2, batch_size=4, seed=1, on_round=on_round)
    assert [x[0] for x in seen] == [0, 1, 2]
    assert [x[1] for x in seen] == [r["sampled"] for r in history]
    assert all(x[2] == 4 for x in seen)
    assert any(not torch.equal(seen[0][3][k], seen[2][3][k]) for k in seen[0][3])  # the aggregate moves between rounds
    assert all(torch.equal(v, model.g_ema.state_dict()[k]) for k, v in seen[-1][3].items())  # the last one is the result


def test_a_local_discriminator_is_never_averaged_nor_overwritten():
    s = _settings(local_discriminator="all")
    sites = _sites()
    model, history = simulate_federation(sites, s, rounds=3, local_steps=4, batch_size=4, clients_per_round=3, seed=2)
    ds = [{n: p for n, p in x.require_model().named_parameters() if n.startswith("discriminator.")} for x in sites]
    for name, p in model.named_parameters():
        per_site = torch.stack([x.require_model().get_parameter(name) for x in sites])
        if name.startswith("discriminator."):
            # each site's own D, trained on its slices only; the global copy is still the initial one
            assert not torch.allclose(per_site[0], per_site[1])
        else:
            assert torch.allclose(p, per_site.mean(0), atol=1e-6)  # G and G_ema: the uniform mean
    torch.manual_seed(2)
    initial = FactoryModel(s.config)
    assert all(torch.equal(p, initial.get_parameter(n)) for n, p in model.named_parameters() if n.startswith("discriminator."))
    assert all(len(d) > 0 for d in ds)
