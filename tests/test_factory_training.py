"""The data factory's losses and alternating update (pipelines.factory.training)."""

import math

import pytest
import torch

from pipelines.factory.networks import FactoryConfig
from pipelines.factory.training import (
    FactoryModel,
    FactoryUpdater,
    key_alignment_loss,
    lazy_adam_settings,
    make_optimizer,
    parse_factory_args,
    path_length_penalty,
    r1_penalty,
)

CFG = dict(resolution=16, channels=(16, 16, 8), z_dim=16, w_dim=16, mapping_layers=1, n_clients=3, n_bins=4, key_dim=8)


def _settings(**over):
    args = {"factory": {"preset": "tiny", **{k: v for k, v in CFG.items() if k not in ("n_clients", "key_dim")}},
            "key": {"kind": "histogram", "bins": 8}, "client_ids": {"a": 0, "b": 1, "c": 2}, **over}  # fmt: skip
    return parse_factory_args(args)


def _updater(s=None, key=True, refine=False, client=1):
    torch.manual_seed(0)
    s = s or _settings()
    model = FactoryModel(s.config)
    k = torch.nn.functional.normalize(torch.randn(s.config.key_dim), dim=0) if key else None
    dk = None
    if refine:
        from pipelines.factory.domain_key import build_domain_key

        dk = build_domain_key(s.key, s.config.resolution)
    return model, FactoryUpdater(model, s, client, key=k, domain_key=dk, refine=refine), make_optimizer(model, 0.002, s.r1_interval, s.pl_interval)


def _batch(n=4):
    return torch.rand(n, 1, 16, 16) * 2 - 1, torch.randint(0, 4, (n,))


def test_settings_fill_clients_and_key_width_and_name_bad_keys():
    s = _settings()
    assert s.config.n_clients == 3 and s.config.key_dim == 8 and s.config.resolution == 16
    assert parse_factory_args({"key": None}).config.key_dim == 0
    with pytest.raises(ValueError, match="plan_args.r1_gamma"):
        parse_factory_args({"r1_gamma": "x"})
    with pytest.raises(ValueError, match="plan_args.factory.n_clients"):
        parse_factory_args({"factory": {"n_clients": 4}})
    with pytest.raises(ValueError, match="plan_args.bogus"):
        parse_factory_args({"bogus": 1})
    with pytest.raises(ValueError, match="plan_args.factory.resolution"):
        parse_factory_args({"factory": {"resolution": 48}})


def test_lazy_adam_settings_follow_the_interval():
    lr, betas = lazy_adam_settings(0.002, 16)
    assert lr == pytest.approx(0.002 * 16 / 17) and betas == (0.0, pytest.approx(0.99 ** (16 / 17)))
    model, _, opt = _updater()
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["generator"]["lr"] == pytest.approx(0.002 * 4 / 5)
    assert groups["discriminator"]["betas"][1] == pytest.approx(0.99 ** (16 / 17))
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["generator"]["params"]) == ids(model.generator.parameters())
    assert ids(groups["discriminator"]["params"]) == ids(model.discriminator.parameters())
    assert not ids(model.g_ema.parameters()) & (ids(groups["generator"]["params"]) | ids(groups["discriminator"]["params"]))


def test_updates_alternate_and_the_other_network_is_frozen_and_unchanged():
    model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0))
    for i in range(6):
        g0 = [p.detach().clone() for p in model.generator.parameters()]
        d0 = [p.detach().clone() for p in model.discriminator.parameters()]
        phase = up.next_phase
        assert phase == ("D" if i % 2 == 0 else "G")
        opt.zero_grad(set_to_none=True)
        loss = up.loss(*_batch())
        frozen, trained = (model.generator, model.discriminator) if phase == "D" else (model.discriminator, model.generator)
        assert all(not p.requires_grad for p in frozen.parameters())
        assert all(p.requires_grad for p in trained.parameters())
        loss.backward()
        assert all(p.grad is None for p in frozen.parameters())
        opt.step()
        up.after_step()
        g1, d1 = list(model.generator.parameters()), list(model.discriminator.parameters())
        same_g = all(torch.equal(a, b) for a, b in zip(g0, g1))
        same_d = all(torch.equal(a, b) for a, b in zip(d0, d1))
        assert (same_g, same_d) == ((True, False) if phase == "D" else (False, True))
    assert up.d_steps == 3 and up.g_steps == 3


def test_r1_and_path_length_run_at_their_intervals():
    model, up, opt = _updater(_settings(r1_interval=4, pl_interval=2))
    kinds = []
    for _ in range(16):  # 8 D and 8 G updates
        before = dict(up.counts)
        up.train_step(opt, *_batch())
        new = {k for k in up.counts if up.counts[k] != before.get(k, 0)} - {"key_used", "update_s", "d_real", "d_fake"}
        kinds.append(sorted(new))
    d_kinds, g_kinds = kinds[0::2], kinds[1::2]
    assert [k == ["r1"] for k in d_kinds] == [i % 4 == 0 for i in range(8)]
    assert [k == ["path_length", "pl_penalty"] for k in g_kinds] == [i % 2 == 0 for i in range(8)]
    assert all(k == ["d_loss"] for i, k in enumerate(d_kinds) if i % 4)
    assert all(k == ["g_loss"] for i, k in enumerate(g_kinds) if i % 2)
    assert up.counts["r1"] == 2 and up.counts["pl_penalty"] == 4
    assert up.pl_mean > 0  # the running mean moved


def test_g_ema_follows_g_only_after_g_updates():
    model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0, ema_decay=0.5))
    e0 = [p.detach().clone() for p in model.g_ema.parameters()]
    up.train_step(opt, *_batch())  # D update: G and G_ema unchanged
    assert all(torch.equal(a, b) for a, b in zip(e0, model.g_ema.parameters()))
    up.train_step(opt, *_batch())  # G update: G_ema = 0.5 * old + 0.5 * G
    for old, ema, g in zip(e0, model.g_ema.parameters(), model.generator.parameters()):
        assert torch.allclose(ema, 0.5 * old + 0.5 * g.detach(), atol=1e-6)
    assert all(not p.requires_grad for p in model.g_ema.parameters())


def test_key_is_dropped_for_about_half_of_the_updates():
    model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0))
    torch.manual_seed(1)
    for _ in range(60):
        up.loss(*_batch(2)).detach()
    assert 0.3 < up.means()["key_used"] < 0.7
    _, up_none, _ = _updater(key=False)
    up_none.loss(*_batch(2))
    assert up_none.means()["key_used"] == 0.0


def test_refinement_adds_the_key_alignment_loss_on_key_updates():
    model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0, key_drop=0.0), refine=True)
    up.train_step(opt, *_batch())
    up.train_step(opt, *_batch())
    assert "key_align" in up.means() and 0 <= up.means()["key_align"] <= math.pi**2
    _, plain, opt2 = _updater(_settings(r1_gamma=0, pl_weight=0, key_drop=0.0))
    plain.train_step(opt2, *_batch())
    plain.train_step(opt2, *_batch())
    assert "key_align" not in plain.means()


def test_state_round_trip_restores_counters_and_path_length_mean():
    model, up, opt = _updater()
    for _ in range(5):
        up.train_step(opt, *_batch())
    _, fresh, _ = _updater()
    fresh.load_state_dict(up.state_dict())
    assert fresh.state_dict() == up.state_dict() and fresh.next_phase == up.next_phase == "G"


def test_penalties_on_known_functions():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    pred = (2 * x).flatten(1).sum(1)  # gradient 2 everywhere: ||g||^2 = 4 * 16
    assert float(r1_penalty(pred, x)) == pytest.approx(64.0)
    ws = torch.randn(2, 3, 5, requires_grad=True)
    img = ws.sum(2, keepdim=True).unsqueeze(-1).expand(2, 3, 1, 1).reshape(2, 1, 3, 1) * 1.0
    penalty, new_mean, length = path_length_penalty(img, ws, mean_length=0.0, decay=0.5)
    assert length > 0 and new_mean == pytest.approx(0.5 * length, rel=1e-5) and float(penalty) >= 0
    key = torch.nn.functional.normalize(torch.randn(6), dim=0)
    assert float(key_alignment_loss(key.expand(3, 6), key)) < 1e-4
    assert float(key_alignment_loss(-key.expand(3, 6), key)) == pytest.approx(math.pi**2, rel=1e-2)


def test_factory_model_has_parameters_only():
    s = _settings()
    model = FactoryModel(s.config)
    names = set(model.state_dict())
    assert names == {n for n, _ in model.named_parameters()}  # nothing else is ever sent
    assert {n.split(".")[0] for n in names} == {"generator", "discriminator", "g_ema"}
    assert FactoryConfig.preset("tiny").resolution == 64


def test_round_seed_differs_per_round_and_site_and_the_mixin_uses_the_experiment_seed():
    from pipelines.plans.seeding import PerRoundSeed
    from pipelines.site_state import round_seed

    assert round_seed(0, 1, "A") == round_seed(0, 1, "A")
    assert len({round_seed(0, r, s) for r in range(5) for s in "AB"} | {round_seed(1, 0, "A")}) == 11

    class Base:
        def post_init(self, model_args, training_args):
            self.seen = training_args

        def node_id(self):
            return "NODE_A"

    class Plan(PerRoundSeed, Base):
        pass

    plan = Plan()
    plan.post_init({}, {"random_seed": 7})
    draws = []
    for r in (0, 1, 0):
        plan.reseed_for_round(r)
        draws.append(float(torch.rand(())))
    assert draws[0] == draws[2] != draws[1]


def test_key_layers_would_leak_the_key_so_they_are_site_local():
    from pipelines.factory.training import KEY_PATHWAY, is_key_pathway, key_pathway_state, load_key_pathway, reinit_key_pathway

    s = _settings(r1_gamma=0, pl_weight=0, key_drop=0.0)
    model, up, opt = _updater(s)
    before = key_pathway_state(model)
    for _ in range(6):
        up.train_step(opt, *_batch())
    # the threat: with a constant key, the first key layer's update is rank one and its
    # input-side factor has the key's sign pattern
    delta = model.generator.embed.key_embed[0].weight.detach() - before["generator.embed.key_embed.0.weight"]
    _, sv, vh = torch.linalg.svd(delta)
    assert sv[1] / sv[0] < 1e-2
    agree = (torch.sign(vh[0]) == torch.sign(up.key)).float().mean()
    assert max(agree, 1 - agree) == 1.0
    # so exactly the layers that read the key are local
    names = {n for n, _ in model.named_parameters() if is_key_pathway(n)}
    expected = {f"generator.embed.key_embed.{n}" for n, _ in model.generator.embed.key_embed.named_parameters()}
    expected |= {f"g_ema.embed.key_embed.{n}" for n, _ in model.g_ema.embed.key_embed.named_parameters()}
    expected |= {f"discriminator.key_embed.{n}" for n, _ in model.discriminator.key_embed.named_parameters()}
    assert names == expected and all(n.startswith(KEY_PATHWAY) for n in names)
    # a site's own layers: secret init (G_ema starts as G), saved and loaded back
    reinit_key_pathway(model, torch.Generator().manual_seed(123))
    state = key_pathway_state(model)
    assert torch.equal(state["g_ema.embed.key_embed.0.weight"], state["generator.embed.key_embed.0.weight"])
    assert not torch.equal(state["generator.embed.key_embed.0.weight"], before["generator.embed.key_embed.0.weight"])
    other = FactoryModel(s.config)
    assert load_key_pathway(other, state) and all(torch.equal(v, key_pathway_state(other)[k]) for k, v in state.items())
    assert not load_key_pathway(other, {"generator.embed.key_embed.0.weight": torch.zeros(1)})


def test_pooled_batches_condition_each_fake_on_a_client_id_of_the_batch():
    model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0), key=False)
    seen = []
    forward = model.generator.forward

    def spy(z, client_id, *a, **kw):
        seen.append(client_id.clone())
        return forward(z, client_id, *a, **kw)

    model.generator.forward = spy
    real, bins = _batch(6)
    ids = torch.tensor([0, 0, 0, 2, 2, 2])
    for _ in range(4):
        up.train_step(opt, real, bins, ids)
    assert seen and all(set(c.tolist()) <= {0, 2} for c in seen)
    assert any(len(set(c.tolist())) == 2 for c in seen)  # mixed ids within one batch
    seen.clear()
    up.train_step(opt, real, bins)  # a site's own update: its client id only
    up.train_step(opt, real, bins)
    assert seen and all(set(c.tolist()) == {1} for c in seen)


def test_mismatch_term_teaches_d_the_other_client_ids_from_the_sites_own_slices():
    # a site's batch carries only its own client id, so without the term D's embedding of
    # the other ids never gets a gradient at that site; with it, they do (as negatives)
    for weight in (0.0, 1.0):
        model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0, mismatch_weight=weight), key=False, client=1)
        opt.zero_grad(set_to_none=True)
        up.loss(*_batch(8)).backward()
        grad = model.discriminator.label_embed.weight.grad  # (cmap, n_clients + n_bins): ids first
        assert grad[:, 1].abs().sum() > 0
        assert bool(grad[:, [0, 2]].abs().sum() > 0) == (weight > 0)
        assert ("d_mismatch" in up.counts) == (weight > 0)


def test_mismatch_term_is_a_logistic_negative_on_real_slices_under_wrong_ids():
    s = _settings(r1_gamma=0, pl_weight=0, mismatch_weight=0.5)
    model, up, _ = _updater(s, key=False, client=1)
    real, bins = _batch(8)
    draws = []
    randint = torch.randint

    def spy(*a, **kw):
        out = randint(*a, **kw)
        if a[:2] == (1, 3):  # the offset that turns the own id into another one
            draws.append(out.clone())
        return out

    torch.manual_seed(3)
    torch.randint = spy
    try:
        loss = up.loss(real, bins)
    finally:
        torch.randint = randint
    (offset,) = draws
    wrong = (1 + offset) % 3
    assert (wrong != 1).all() and set(wrong.tolist()) <= {0, 2}
    with torch.no_grad():
        expected = torch.nn.functional.softplus(model.discriminator(real, wrong, bins, None)).mean()
    assert up.means()["d_mismatch"] == pytest.approx(float(expected), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(up.means()["d_loss"] + 0.5 * float(expected), rel=1e-5)


def test_mismatch_term_needs_another_client_and_a_valid_weight():
    args = {"factory": {"preset": "tiny", **{k: v for k, v in CFG.items() if k not in ("n_clients", "key_dim")}},
            "key": None, "client_ids": {"a": 0}, "r1_gamma": 0, "pl_weight": 0, "mismatch_weight": 1.0}  # fmt: skip
    s = parse_factory_args(args)
    model = FactoryModel(s.config)
    up = FactoryUpdater(model, s, 0)
    up.train_step(make_optimizer(model), *_batch())
    assert "d_mismatch" not in up.counts  # one site: there is no other id to mismatch
    with pytest.raises(ValueError, match="plan_args.mismatch_weight"):
        parse_factory_args({"mismatch_weight": -1})
    with pytest.raises(ValueError, match="plan_args.mismatch_weight"):
        parse_factory_args({"mismatch_weight": "high"})


def test_diff_augment_shifts_and_cuts_but_never_changes_an_intensity():
    from pipelines.factory.training import diff_augment

    torch.manual_seed(0)
    x = torch.full((16, 1, 32, 32), -1.0)
    x[:, 0, 16, 16] = 0.75  # one bright pixel per image (exact in float32)
    y = diff_augment(x, translation=0.125, cutout=0.0)
    for img in y[:, 0]:
        (pos,) = (img == 0.75).nonzero().tolist()  # still exactly one, same intensity
        assert abs(pos[0] - 16) <= 4 and abs(pos[1] - 16) <= 4
        assert set(img.unique().tolist()) == {-1.0, 0.75}
    assert len({tuple((img == 0.75).nonzero()[0].tolist()) for img in y[:, 0]}) > 1  # shifts differ per image
    z = torch.rand(16, 1, 32, 32) * 2 - 1
    c = diff_augment(z, translation=0.0, cutout=0.5)
    changed = c != z
    assert (c[changed] == -1).all()  # cut pixels become background, the rest is untouched
    frac = changed.float().mean(dim=(1, 2, 3))
    assert (frac > 0).all() and (frac <= 0.25 + 1e-6).all()  # at most one 16 x 16 square
    assert torch.equal(diff_augment(z), z)
    z.requires_grad_(True)
    diff_augment(z, 0.125, 0.5).sum().backward()
    assert 0 < z.grad.sum() < z.numel()  # differentiable; cut-out pixels get no gradient


def test_discriminator_sees_augmented_slices_when_diff_augment_is_on():
    for aug in (None, {"translation": 0.25, "cutout": 0.5}):
        model, up, opt = _updater(_settings(r1_gamma=0, pl_weight=0, diff_augment=aug), key=False)
        seen = []
        features = model.discriminator.features
        model.discriminator.features = lambda img: seen.append(img.detach().clone()) or features(img)
        real = torch.rand(4, 1, 16, 16) * 2 - 1
        up.train_step(opt, real, torch.randint(0, 4, (4,)))  # D update: real batch first
        assert torch.equal(seen[0], real) == (aug is None)
    with pytest.raises(ValueError, match="plan_args.diff_augment.cutout"):
        parse_factory_args({"diff_augment": {"cutout": 2}})
    with pytest.raises(ValueError, match="plan_args.diff_augment.colour"):
        parse_factory_args({"diff_augment": {"colour": 0.5}})
    assert parse_factory_args({"diff_augment": True}).diff_augment == {"translation": 0.125, "cutout": 0.5}


# -- the proximal term (issue 25, option 1) ----------------------------------------------------------


def _prox_model():
    from pipelines.factory.config import FactoryConfig
    from pipelines.factory.training import FactoryModel

    torch.manual_seed(0)
    return FactoryModel(FactoryConfig.preset("tiny", n_clients=3, key_dim=0, n_bins=29))


def test_proximal_term_is_zero_at_the_global_weights_and_spares_the_conditional_pathway():
    from pipelines.factory.training import is_conditional_pathway, is_key_pathway, proximal_anchor, proximal_term

    model = _prox_model()
    anchor = proximal_anchor(model)
    assert anchor and not any(is_conditional_pathway(n) or is_key_pathway(n) or n.startswith("g_ema.") for n in anchor)
    assert "generator.embed.label_embed.weight" not in anchor and "discriminator.label_embed.weight" not in anchor
    for network in ("generator", "discriminator"):
        assert float(proximal_term(model, anchor, network)) == 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.01)
    term = proximal_term(model, anchor, "generator")
    shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith("generator.") and n in anchor)
    assert float(term) == pytest.approx(0.5 * shared * 0.01**2, rel=1e-3)
    model.zero_grad()
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["generator.embed.label_embed.weight"] is None  # the client id's path is free
    assert all(grads[n] is None for n in grads if n.startswith("discriminator."))  # only the trained network is pulled
    assert any(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith("generator.mapping_network."))


def test_updater_adds_the_proximal_term_only_when_asked():
    from pipelines.factory.plan_args import parse_factory_args
    from pipelines.factory.training import FactoryUpdater, make_optimizer

    real, bins = torch.rand(4, 1, 64, 64) * 2 - 1, torch.randint(0, 29, (4,))
    for mu, expect in ((0.0, False), (0.5, True)):
        model = _prox_model()
        settings = parse_factory_args({"key": None, "prox_mu": mu, "r1_gamma": 0, "pl_weight": 0})
        updater = FactoryUpdater(model, settings, client_id=1)
        optimizer = make_optimizer(model)
        for _ in range(4):
            updater.train_step(optimizer, real, bins)
        means = updater.means()
        assert ("prox" in means) is expect
        if expect:
            assert means["prox"] > 0  # the site moved away from the round's start, and is pulled back


def _offset_generator(**over):
    from pipelines.factory.config import FactoryConfig
    from pipelines.factory.generator import Generator

    torch.manual_seed(0)
    return Generator(FactoryConfig.preset("tiny", resolution=16, channels=[8, 8, 8], n_clients=3, key_dim=0, n_bins=4, w_offset=True, **over)).eval()


def test_w_offset_starts_at_zero_and_changes_outputs_only_through_its_id():
    from pipelines.factory.config import FactoryConfig
    from pipelines.factory.generator import Generator

    g = _offset_generator()
    z = torch.randn(4, g.cfg.z_dim)
    torch.manual_seed(0)
    plain = Generator(FactoryConfig.preset("tiny", resolution=16, channels=[8, 8, 8], n_clients=3, key_dim=0, n_bins=4)).eval()
    plain.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("id_offset.")})
    # zero at the start: the factory begins exactly as one without the offset
    assert torch.equal(g.mapping(z, 1, 2), plain.mapping(z, 1, 2))
    with torch.no_grad():
        g.id_offset.weight[:, 1] = torch.randn(g.cfg.w_dim)  # id 1's offset only
    # id 1's styles move by exactly its offset; ids 0 and 2 are untouched
    assert torch.allclose(g.mapping(z, 1, 2) - plain.mapping(z, 1, 2), g.w_offset(1, 4), atol=1e-6)
    assert float(g.w_offset(1, 4).abs().sum()) > 0
    for other in (0, 2):
        assert torch.equal(g.mapping(z, other, 2), plain.mapping(z, other, 2))
    noise = g.const_noise()
    assert not torch.allclose(g(z, 1, 2, noise=noise), plain(z, 1, 2, noise=noise))
    assert torch.equal(g(z, 0, 2, noise=noise), plain(z, 0, 2, noise=noise))
    # truncation pulls towards the id's own centre, offset included
    assert torch.allclose(g.mean_w(1, 2) - plain.mean_w(1, 2), g.w_offset(1, 1), atol=1e-5)
    w_half = g.mapping(z, 1, 2, truncation_psi=0.5)
    assert torch.allclose(w_half, g.mean_w(1, 2) + 0.5 * (g.mapping(z, 1, 2) - g.mean_w(1, 2)), atol=1e-5)


def test_w_offset_learns_at_its_lr_multiplier_and_is_on_the_conditional_pathway():
    from pipelines.factory.training import CONDITIONAL_PATHWAY, is_conditional_pathway

    grads = {}
    for lr_mul in (1.0, 0.01):
        g = _offset_generator(w_offset_lr_mul=lr_mul).train()
        g.mapping(torch.randn(4, g.cfg.z_dim), torch.tensor([0, 0, 2, 2])).sum().backward()
        grad = g.id_offset.weight.grad
        assert float(grad[:, 1].abs().sum()) == 0.0  # an id not in the batch gets nothing
        grads[lr_mul] = float(grad[:, 0].abs().sum())
    # equalized lr: the stored weight is scaled by lr_mul, so its gradient (and Adam's step in w) is too
    assert grads[0.01] == pytest.approx(grads[1.0] * 0.01, rel=1e-4)
    assert "generator.id_offset." in CONDITIONAL_PATHWAY and is_conditional_pathway("g_ema.id_offset.weight")


def test_local_discriminator_parts_stay_at_the_site():
    from pipelines.factory.plan_args import parse_factory_args
    from pipelines.factory.training import is_key_pathway, proximal_anchor, site_local_predicate

    model = _prox_model()
    names = [n for n, _ in model.named_parameters()]
    expect = {
        "none": set(),
        "projection": {n for n in names if n.startswith("discriminator.label_embed.")},
        "all": {n for n in names if n.startswith("discriminator.")},
    }
    for choice, local_d in expect.items():
        settings = parse_factory_args({"key": {"kind": "histogram", "bins": 8}, "local_discriminator": choice, "prox_mu": 1.0})
        is_local = site_local_predicate(settings)
        keys = {n for n in names if is_key_pathway(n)}
        assert {n for n in names if is_local(n)} == keys | local_d
        assert not any(is_local(n) for n in names if n.startswith(("generator.", "g_ema.")) and not is_key_pathway(n))
        assert not any(is_local(n) for n in proximal_anchor(model, is_local))  # a local network is not pulled to the others
    with pytest.raises(ValueError, match="plan_args.local_discriminator"):
        parse_factory_args({"local_discriminator": "half"})


def test_plan_keeps_a_local_discriminator_at_the_site_between_rounds(tmp_path, monkeypatch):
    from fedbiomed.common.training_args import TrainingArgs

    from coordinator.plans import model_args_for
    from pipelines.plans.data_factory import DataFactoryPlan

    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path))

    def plan_for(local_d: str):
        args = model_args_for("data_factory", {"schema": "abdominal-ct", "key": None, "local_discriminator": local_d})
        args.update(run_id="run-a", rounds_total=3, local_steps=1, client_ids={"NODE_A": 0, "NODE_B": 1})
        ta = TrainingArgs({"optimizer_args": {"lr": 1e-3}, "num_updates": 1, "random_seed": 3}, only_required=False)
        plan = DataFactoryPlan()
        plan.post_init(args, ta, node_id="NODE_A", round=0)
        return plan

    plan = plan_for("all")
    names = list(plan.model().state_dict())
    local = {n for n in names if plan.tag_parameters(n) == {"local"}}
    assert local == {n for n in names if n.startswith("discriminator.")}  # Fed-BioMed never sends them
    assert not plan._restore_key_pathway()  # the run's first round: D as initialised
    with torch.no_grad():
        plan.model().discriminator.fc.weight.fill_(0.25)
    plan._save_key_pathway()
    later = plan_for("all")  # Fed-BioMed rebuilds the model every round: the site's own D comes back from its folder
    assert later._restore_key_pathway() and torch.all(later.model().discriminator.fc.weight == 0.25)
    shared = plan_for("projection")
    assert {n for n in names if shared.tag_parameters(n) == {"local"}} == {n for n in names if n.startswith("discriminator.label_embed.")}
    assert plan_for("none").tag_parameters("discriminator.fc.weight") == set()
