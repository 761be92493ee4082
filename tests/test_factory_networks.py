"""Factory networks (pipelines.factory.networks): conditional StyleGAN2-style G and projection D."""

import json
import math
import time

import pytest
import torch

from pipelines.factory.networks import (
    Discriminator,
    FactoryConfig,
    Generator,
    ModulatedConv2d,
    blur2d,
    blur_kernel,
    count_parameters,
    downsample2d,
    minibatch_stddev,
    pixel_norm,
    requires_grad,
    upsample2d,
)

KEY_DIM = 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cfg():
    return FactoryConfig.preset("tiny", n_clients=3, key_dim=KEY_DIM)


@pytest.fixture(scope="module")
def nets(cfg):
    torch.manual_seed(1)
    return Generator(cfg).eval(), Discriminator(cfg).eval()


def _key(seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (KEY_DIM,) if batch is None else (batch, KEY_DIM)
    k = torch.randn(shape, generator=g)
    return k / k.norm(dim=-1, keepdim=True)


def _z(batch=4, seed=0, dim=64):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


# -- shapes and conditioning ------------------------------------------------------------------


def test_shapes_finite(nets):
    G, D = nets
    with torch.no_grad():
        img = G(_z(), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 5, 28, 3]), _key())
        score = D(img, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 5, 28, 3]), _key(batch=4))
    assert img.shape == (4, 1, 64, 64) and torch.isfinite(img).all()
    assert img.std() > 0.01
    assert score.shape == (4,) and torch.isfinite(score).all()
    assert G.num_ws == 10 and G.num_noise == 9


def test_generator_output_depends_on_condition(nets):
    G, _ = nets
    z = _z()
    with torch.no_grad():
        base = G(z, 0, 3, None, noise_mode="const")
        other_client = G(z, 1, 3, None, noise_mode="const")
        other_bin = G(z, 0, 20, None, noise_mode="const")
        no_bin = G(z, 0, None, None, noise_mode="const")
        with_key = G(z, 0, 3, _key(), noise_mode="const")
        other_key = G(z, 0, 3, _key(seed=1), noise_mode="const")
    for other in (other_client, other_bin, no_bin, with_key, other_key):
        assert (base - other).abs().max() > 1e-3
    assert (with_key - other_key).abs().max() > 1e-3


def test_discriminator_score_depends_on_condition(nets):
    G, D = nets
    img = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        base = D(img, 0, 3)
        assert not torch.allclose(base, D(img, 1, 3), atol=1e-5)
        assert not torch.allclose(base, D(img, 0, 7), atol=1e-5)
        assert not torch.allclose(base, D(img, 0, 3, _key()), atol=1e-5)
        # per-sample conditions: changing sample 0's client changes only score 0 (mbstd aside,
        # which does not depend on the condition)
        a = D(img, torch.tensor([0, 1, 2, 0]))
        b = D(img, torch.tensor([2, 1, 2, 0]))
    assert a[0] != b[0] and torch.equal(a[1:], b[1:])


def test_projection_only_discriminator(cfg):
    torch.manual_seed(2)
    full = Discriminator(cfg)
    proj = Discriminator(FactoryConfig.from_dict({**cfg.to_dict(), "d_unconditional": False}))
    assert not any(k.startswith("out.") for k in proj.state_dict())
    proj.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("out.")})
    img = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        phi = full.features(img)
        # the full score is the unconditional head plus the projection; without the head, the projection alone
        assert torch.allclose(full(img, 1, 3), full.out(phi).squeeze(1) + proj(img, 1, 3), atol=1e-5)
        assert not torch.allclose(proj(img, 0, 3), proj(img, 1, 3), atol=1e-5)


def test_key_none_equals_zero_key_exactly(nets, cfg):
    G, D = nets
    z = _z()
    zero = torch.zeros(KEY_DIM)
    with torch.no_grad():
        assert torch.equal(G.condition(0, 3, None, batch=4), G.condition(0, 3, zero, batch=4))
        assert torch.equal(G.condition(0, 3, None, batch=4), G.condition(0, 3, torch.zeros(4, KEY_DIM)))
        img_none = G(z, torch.tensor([0, 1, 2, 0]), 3, None, noise_mode="const")
        img_zero = G(z, torch.tensor([0, 1, 2, 0]), 3, zero, noise_mode="const")
        assert torch.equal(img_none, img_zero)
        x = torch.randn(4, 1, 64, 64)
        assert torch.equal(D(x, 1, 5, None), D(x, 1, 5, torch.zeros(4, KEY_DIM)))
        # a model without key conditioning (same other weights) gives the same condition
        G0 = Generator(FactoryConfig.preset("tiny", n_clients=3, key_dim=0)).eval()
        missing, unexpected = G0.load_state_dict(G.state_dict(), strict=False)
        assert not missing and all(k.startswith("embed.key_embed.") for k in unexpected)
        assert torch.equal(G0.condition(2, 7, batch=4), G.condition(2, 7, None, batch=4))
        assert torch.equal(G0(z, 2, 7, noise_mode="const"), G(z, 2, 7, None, noise_mode="const"))


def test_condition_is_pixel_normed_mix(nets, cfg):
    G, _ = nets
    key = _key()
    with torch.no_grad():
        c = G.condition(torch.tensor([0, 2]), torch.tensor([4, 9]), key)
        label = torch.zeros(2, cfg.n_clients + cfg.n_bins)
        label[0, 0] = label[1, 2] = 1
        label[0, cfg.n_clients + 4] = label[1, cfg.n_clients + 9] = 1
        label_emb = pixel_norm(G.embed.label_embed(label))
        key_emb = pixel_norm(G.embed.key_embed(key[None].expand(2, -1)))
        expected = pixel_norm(0.8 * key_emb + 0.2 * label_emb)
    assert c.shape == (2, cfg.w_dim)
    torch.testing.assert_close(c, expected)
    torch.testing.assert_close(c.square().mean(1), torch.ones(2))


def test_bad_condition_inputs_raise(nets):
    G, D = nets
    with pytest.raises(ValueError, match="client_id"):
        G.condition(3, batch=2)
    with pytest.raises(ValueError, match="slice_bin"):
        G.condition(0, 29, batch=2)
    with pytest.raises(ValueError, match="key"):
        G.condition(0, None, torch.zeros(KEY_DIM + 1), batch=2)
    with pytest.raises(ValueError, match="batch"):
        G(_z(4), torch.tensor([0, 1]))
    G0 = Generator(FactoryConfig(key_dim=0))
    with pytest.raises(ValueError, match="key_dim = 0"):
        G0.condition(0, None, torch.zeros(4))
    with pytest.raises(ValueError, match="img"):
        D(torch.zeros(2, 1, 32, 32), 0)


# -- determinism, noise, mixing ---------------------------------------------------------------


def test_determinism_and_noise_modes(cfg):
    G = Generator(cfg).eval()
    z, key = _z(), _key()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)  # learned strength starts at 0: make the noise visible
        a = G(z, 1, 2, key, noise_mode="const")
        b = G(z, 1, 2, key, noise_mode="const")
        assert torch.equal(a, b)
        explicit = [torch.randn(s) for s in G.noise_shapes(4)]
        c = G(z, 1, 2, key, noise=explicit)
        d = G(z, 1, 2, key, noise_mode="random", noise=explicit)
        assert torch.equal(c, d)
        assert (c - a).abs().max() > 1e-3
        # const noise == passing the const maps explicitly
        assert torch.equal(a, G(z, 1, 2, key, noise=G.const_noise()))
        r1 = G(z, 1, 2, key, noise_mode="random")
        r2 = G(z, 1, 2, key, noise_mode="random")
        assert not torch.equal(r1, r2)
        n1 = G(z, 1, 2, key, noise_mode="none")
        assert torch.equal(n1, G(z, 1, 2, key, noise_mode="none"))
    assert [s[-1] for s in G.noise_shapes(4)] == [4, 8, 8, 16, 16, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="noise"):
        G(z, 0, noise=explicit[:-1])
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, 0, noise_mode="zeros")


def test_const_noise_is_seeded_and_not_in_state_dict(cfg):
    a, b = Generator(cfg), Generator(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.const_noise(), b.const_noise()))
    assert not any(k.startswith("synthesis_network.noise_const") for k in a.state_dict())


def test_noise_strength_is_used():
    G = Generator(FactoryConfig()).eval()
    z = _z()
    with torch.no_grad():
        assert torch.equal(G(z, 0, noise_mode="const"), G(z, 0, noise_mode="none"))  # strength init 0
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
        assert not torch.equal(G(z, 0, noise_mode="const"), G(z, 0, noise_mode="none"))


def test_style_mixing_train_only(cfg):
    G = Generator(FactoryConfig.preset("tiny", n_clients=3, key_dim=KEY_DIM, style_mixing_prob=1.0))
    z, z2 = _z(), _z(seed=5)
    G.train()
    for _ in range(3):
        _, ws = G(z, 1, 2, _key(), noise_mode="const", mix_z=z2, return_ws=True)
        assert ws.shape == (4, G.num_ws, cfg.w_dim)
        assert not torch.equal(ws[:, 0], ws[:, -1])  # crossover index in [1, num_ws)
        w1 = G.mapping(z, 1, 2, _key())
        w2 = G.mapping(z2, 1, 2, _key())
        cutoff = next(i for i in range(G.num_ws) if not torch.equal(ws[:, i], ws[:, 0]))
        assert 1 <= cutoff < G.num_ws
        torch.testing.assert_close(ws[:, :cutoff], w1[:, None].expand(-1, cutoff, -1))
        torch.testing.assert_close(ws[:, cutoff:], w2[:, None].expand(-1, G.num_ws - cutoff, -1))
    _, ws = G(z, 1, 2, _key(), return_ws=True)  # fresh random second latent
    assert not torch.equal(ws[:, 0], ws[:, -1])
    G.eval()
    for _ in range(3):
        _, ws = G(z, 1, 2, _key(), mix_z=z2, return_ws=True)
        assert torch.equal(ws, ws[:, :1].expand_as(ws))
    G.train()
    G_nomix = Generator(FactoryConfig(style_mixing_prob=0.0)).train()
    _, ws = G_nomix(_z(), 0, return_ws=True)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))


def test_truncation(nets):
    G, _ = nets
    z = _z()
    with torch.no_grad():
        avg = G.mean_w(1, 2, None, n=256, batch=4)
        assert avg.shape == (4, 64)
        torch.testing.assert_close(G.mapping(z, 1, 2, truncation_psi=0.0, w_avg=avg), avg)
        torch.testing.assert_close(G.mapping(z, 1, 2, truncation_psi=0.0), G.mean_w(1, 2, n=1024, batch=4))
        assert torch.equal(G.mapping(z, 1, 2), G.mapping(z, 1, 2, truncation_psi=1.0))


# -- gradients, state dict, features ----------------------------------------------------------


def test_gradients_reach_every_parameter(cfg):
    G, D = Generator(cfg).train(), Discriminator(cfg).train()
    cid, bins, key = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 4]), _key()
    img = G(_z(), cid, bins, key, noise_mode="random")
    D(img, cid, bins, key).mean().backward()
    for net in (G, D):
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    prefixes = {n.split(".")[0] for n, _ in G.named_parameters()}
    assert prefixes == {"embed", "mapping_network", "synthesis_network"}
    requires_grad(G, False)
    assert not any(p.requires_grad for p in G.parameters())
    requires_grad(G, True)
    assert all(p.requires_grad for p in G.parameters())


def test_state_dict_holds_parameters_only(nets):
    for net in nets:
        params = {n for n, _ in net.named_parameters()}
        assert set(net.state_dict()) == params
        assert len(list(net.named_buffers())) > 0  # the blur kernels / const noise exist, unsaved


def test_return_features(nets, cfg):
    G, _ = nets
    with torch.no_grad():
        img, features = G(_z(2), 0, noise_mode="const", return_features=True)
        img2, ws, features2 = G(_z(2), 0, noise_mode="const", return_features=True, return_ws=True)
    assert torch.equal(img, img2) and ws.shape == (2, 10, 64)
    assert [tuple(f.shape) for f in features] == [(2, c, r, r) for c, r in zip(cfg.channels, (4, 8, 16, 32, 64))]
    assert all(torch.equal(a, b) for a, b in zip(features, features2))


def test_synthesis_checks_ws_shape(nets):
    G, _ = nets
    with pytest.raises(ValueError, match="ws"):
        G.synthesis(torch.zeros(2, 9, 64))


def test_fused_and_unfused_modconv_agree():
    torch.manual_seed(3)
    for up in (False, True):
        conv = ModulatedConv2d(8, 6, 3, 16, up=up)
        x, w = torch.randn(3, 8, 8, 8), torch.randn(3, 16)
        conv.fused = True
        a = conv(x, w)
        conv.fused = False
        b = conv(x, w)
        assert a.shape == b.shape == (3, 6, 16 if up else 8, 16 if up else 8)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    G = Generator(FactoryConfig()).eval()
    with torch.no_grad():
        batched = G(_z(2), 0, noise_mode="const")
        single = G(_z(2)[1:], 0, noise_mode="const")  # batch 1 takes the fused path
    torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=1e-4)


# -- resampling, mbstd --------------------------------------------------------------------------


def test_blur_and_resampling():
    k = blur_kernel()
    assert k.shape == (4, 4) and math.isclose(float(k.sum()), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(k, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    x = torch.full((2, 3, 16, 16), 2.5)
    y = blur2d(x, k, (1, 2))
    assert y.shape == (2, 3, 16, 16)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.full_like(y[..., 2:-2, 2:-2], 2.5))
    assert y[0, 0, 0, 0] < 2.5  # zero padding shows at the border
    d = downsample2d(x, k)
    assert d.shape == (2, 3, 8, 8)
    torch.testing.assert_close(d[..., 1:-1, 1:-1], torch.full_like(d[..., 1:-1, 1:-1], 2.5))
    u = upsample2d(x, blur_kernel(scale=4.0))
    assert u.shape == (2, 3, 32, 32)
    torch.testing.assert_close(u[..., 2:-2, 2:-2], torch.full_like(u[..., 2:-2, 2:-2], 2.5))
    # the transposed-conv upsampling is exactly zero insertion + blur (pad 2, 1)
    r = torch.randn(2, 3, 5, 7)
    inserted = torch.zeros(2, 3, 10, 14)
    inserted[..., ::2, ::2] = r
    torch.testing.assert_close(upsample2d(r, blur_kernel(scale=4.0)), blur2d(inserted, blur_kernel(scale=4.0), (2, 1)))
    # channels are filtered independently (depthwise)
    r[:, 1] = 0
    dr = downsample2d(r, k)
    assert dr.shape == (2, 3, 2, 3) and (dr[:, 1] == 0).all() and (dr[:, 0] != 0).all()


def test_minibatch_stddev():
    x = torch.randn(6, 5, 4, 4)
    y = minibatch_stddev(x, 4)  # 6 is not a multiple of 4: groups of 3
    assert y.shape == (6, 6, 4, 4) and torch.equal(y[:, :5], x)
    groups = [[0, 2, 4], [1, 3, 5]]  # sample i is in group i mod (B / G)
    for g in groups:
        expected = x[g].std(dim=0, unbiased=False).mean()
        torch.testing.assert_close(y[g[0], 5, 0, 0], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(y[g, 5], y[g[0], 5].expand(3, 4, 4))
    one = minibatch_stddev(torch.randn(1, 5, 4, 4), 4)
    assert one.shape == (1, 6, 4, 4) and torch.isfinite(one).all()


def test_discriminator_any_batch_size(nets):
    _, D = nets
    with torch.no_grad():
        for b in (1, 3, 5, 8):
            assert D(torch.randn(b, 1, 64, 64), 0).shape == (b,)


# -- config ---------------------------------------------------------------------------------------


def test_config_presets_and_round_trip():
    tiny = FactoryConfig.preset("tiny")
    assert tiny == FactoryConfig()
    small = FactoryConfig.preset("small", n_clients=4)
    assert (small.resolution, small.channels, small.z_dim, small.mapping_layers, small.n_clients) == (
        128,
        (128, 128, 128, 64, 32, 16),
        128,
        4,
        4,
    )
    paper = FactoryConfig.from_dict({"preset": "paper", "key_dim": 512, "n_clients": 3})
    assert paper.resolution == 512 and paper.w_dim == 512 and paper.key_dim == 512 and paper.mapping_layers == 8
    for c in (tiny, small, paper, FactoryConfig.from_dict({"channels": [8, 8, 8, 8, 8], "key_mix": 1})):
        raw = json.loads(json.dumps(c.to_dict()))
        assert FactoryConfig.from_dict(raw) == c
    assert FactoryConfig.from_dict({"channels": [8, 8, 8, 8, 8]}).channels == (8, 8, 8, 8, 8)
    assert FactoryConfig.from_dict({"resolution": 32, "channels": [16, 16, 16, 8]}).resolutions == (4, 8, 16, 32)
    assert FactoryConfig.from_dict(None) == FactoryConfig()


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"resolution": 48}, "factory.resolution"),
        ({"resolution": 4, "channels": [8]}, "factory.resolution"),
        ({"resolution": 128}, "factory.channels"),  # channels no longer match
        ({"channels": [8, 8, 0, 8, 8]}, "factory.channels"),
        ({"channels": "64"}, "factory.channels"),
        ({"z_dim": 0}, "factory.z_dim"),
        ({"w_dim": 1.5}, "factory.w_dim"),
        ({"mapping_layers": True}, "factory.mapping_layers"),
        ({"mapping_lr_mul": 0}, "factory.mapping_lr_mul"),
        ({"n_clients": 0}, "factory.n_clients"),
        ({"n_bins": -1}, "factory.n_bins"),
        ({"key_dim": "64"}, "factory.key_dim"),
        ({"key_mix": 1.5}, "factory.key_mix"),
        ({"style_mixing_prob": float("nan")}, "factory.style_mixing_prob"),
        ({"mbstd_group": 0}, "factory.mbstd_group"),
        ({"label_lr_mul": 0}, "factory.label_lr_mul"),
        ({"d_unconditional": "no"}, "factory.d_unconditional"),
        ({"preset": "huge"}, "factory.preset"),
        ({"resolutoin": 64}, "factory.resolutoin: unknown key"),
    ],
)
def test_config_errors_name_the_key(raw, where):
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        FactoryConfig.from_dict(raw)


def test_config_error_prefix_and_direct_construction():
    with pytest.raises(ValueError, match=r"plan_args\.factory\.n_bins: must be"):
        FactoryConfig.from_dict({"n_bins": -2}, where="plan_args.factory")
    with pytest.raises(ValueError, match="allowed: preset, resolution"):
        FactoryConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"factory\.channels"):
        FactoryConfig(resolution=32)
    with pytest.raises(ValueError, match="mapping"):
        FactoryConfig.from_dict([1, 2])


# -- sizes ----------------------------------------------------------------------------------------


def test_parameter_counts_tiny(nets):
    G, D = nets
    g, d = count_parameters(G), count_parameters(D)
    print(f"tiny (n_clients 3, n_bins 29, key_dim 64): G {g:,} D {d:,}")
    assert 150_000 <= g <= 500_000
    assert 150_000 <= d <= 500_000


def test_parameter_counts_paper():
    t = time.perf_counter()
    cfg = FactoryConfig.preset("paper")
    g, d = count_parameters(Generator(cfg)), count_parameters(Discriminator(cfg))
    print(f"paper: G {g:,} D {d:,} (built in {time.perf_counter() - t:.1f} s)")
    assert 20_000_000 <= g <= 40_000_000
    assert 20_000_000 <= d <= 40_000_000
    assert abs(g - 30.6e6) < 1e6 and abs(d - 29.7e6) < 1.5e6
