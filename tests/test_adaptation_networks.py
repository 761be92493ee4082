"""Phase-2 networks (pipelines.adaptation.networks): inversion encoder, feature hook, branch."""

import io
import json
import math
import time

import pytest
import torch

from pipelines.adaptation.networks import (
    AdaptConfig,
    DomainBatchNorm2d,
    EncoderOutput,
    InversionEncoder,
    SegmentationBranch,
    branch_files,
    count_parameters,
    domain_latent_avg,
    feature_hook,
    invert,
    latent_avgs,
    load_branch,
    requires_grad,
    resolve_inject_resolutions,
    validate_branch_config,
    validate_branch_files,
)
from pipelines.factory.networks import FactoryConfig, Generator

CLASSES = ["background", "liver", "spleen"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fcfg():
    return FactoryConfig.preset("tiny")


@pytest.fixture(scope="module")
def gen(fcfg):
    torch.manual_seed(1)
    g = Generator(fcfg).eval()
    requires_grad(g, False)
    return g


def _encoder(fcfg, seed=2, **overrides):
    torch.manual_seed(seed)
    enc = InversionEncoder(fcfg, AdaptConfig.preset("tiny", **overrides), torch.randn(2, fcfg.w_dim) * 0.1)
    # distinct affine per domain in every DSBN layer, so that the domain visibly matters
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return enc


def _x(batch=4, seed=0, r=64):
    return torch.rand(batch, 1, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _ws(gen, batch=2, seed=0):
    z = torch.randn(batch, gen.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gen.mapping(z, 0, 14)[:, None].expand(-1, gen.num_ws, -1).contiguous()


# -- configuration ----------------------------------------------------------------------------------


def test_config_presets_round_trip():
    for name in ("tiny", "paper"):
        cfg = AdaptConfig.preset(name)
        raw = json.loads(json.dumps(cfg.to_dict()))
        assert AdaptConfig.from_dict(raw) == cfg
    assert AdaptConfig.from_dict(None) == AdaptConfig()
    assert AdaptConfig.preset("tiny", inject_resolutions=[16, 8]).inject_resolutions == (8, 16)
    assert AdaptConfig.preset("tiny", inject_resolutions=[]).inject_resolutions == ()


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"bogus": 1}, r"adaptation\.bogus: unknown key"),
        ({"preset": "huge"}, r"adaptation\.preset"),
        ({"encoder_channels": [16, 16, 32]}, r"adaptation\.encoder_channels"),
        ({"encoder_blocks": [1, 0, 1, 1]}, r"adaptation\.encoder_blocks"),
        ({"stem_stride": 3}, r"adaptation\.stem_stride"),
        ({"pool_size": 0}, r"adaptation\.pool_size"),
        ({"inject_resolutions": [12]}, r"adaptation\.inject_resolutions"),
        ({"inject_resolutions": [8, 8]}, r"adaptation\.inject_resolutions"),
        ({"n_domains": True}, r"adaptation\.n_domains"),
        ({"branch_hidden": 0}, r"adaptation\.branch_hidden"),
        ({"bn_running_stats": 1}, r"adaptation\.bn_running_stats"),
    ],
)
def test_config_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        AdaptConfig.from_dict(raw)
    with pytest.raises(ValueError, match="site.adapt"):
        AdaptConfig.from_dict({"bogus": 1}, where="site.adapt")


def test_inject_resolutions(fcfg):
    assert resolve_inject_resolutions(fcfg, AdaptConfig()) == (8, 16)
    paper = FactoryConfig.preset("paper")
    assert resolve_inject_resolutions(paper, AdaptConfig.preset("paper")) == (16, 32, 64, 128)
    assert resolve_inject_resolutions(fcfg, AdaptConfig(inject_resolutions=(16,))) == (16,)
    with pytest.raises(ValueError, match="consecutive"):
        resolve_inject_resolutions(FactoryConfig.preset("small"), AdaptConfig(inject_resolutions=(8, 32)))
    with pytest.raises(ValueError, match="64 is not available"):
        resolve_inject_resolutions(fcfg, AdaptConfig(inject_resolutions=(64,)))
    with pytest.raises(ValueError, match="too small"):
        InversionEncoder(FactoryConfig(resolution=16, channels=(8, 8, 8)), AdaptConfig())


def test_paper_preset_builds_on_meta():
    fc, ac = FactoryConfig.preset("paper"), AdaptConfig.preset("paper")
    with torch.device("meta"):
        enc = InversionEncoder(fc, ac)
        branch = SegmentationBranch.for_factory(fc, CLASSES, ac)
    assert enc.inject_resolutions == (16, 32, 64, 128)
    assert enc.stage_resolutions == (128, 64, 32, 16)
    assert [s.update.out_channels for s in enc.skips] == [512, 512, 512, 256]  # 16, 32, 64, 128
    print(f"\nparameters paper: encoder {count_parameters(enc):,}, branch {count_parameters(branch):,}")


# -- encoder -------------------------------------------------------------------------------------------


def test_encoder_shapes(fcfg, gen):
    enc = _encoder(fcfg)
    assert count_parameters(enc) < 500_000
    with torch.no_grad():
        out = enc(_x(4), 0)
    assert isinstance(out, EncoderOutput)
    assert out.ws.shape == (4, gen.num_ws, fcfg.w_dim)
    assert sorted(out.residuals) == [8, 16]
    for r, (f, m) in out.residuals.items():
        c = dict(zip(fcfg.resolutions, fcfg.channels))[r]
        assert f.shape == m.shape == (4, c, r, r)
        assert float(m.min()) >= 0.0 and float(m.max()) < 1.0
    assert all(torch.isfinite(t).all() for t in [out.ws, *[v.feature for v in out.residuals.values()]])


def test_encoder_input_errors(fcfg):
    enc = _encoder(fcfg)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 64, 64\)"):
        enc(torch.zeros(2, 1, 32, 32), 0)
    with pytest.raises(ValueError, match=r"domain: values must be in \[0, 1\]"):
        enc(_x(2), 2)
    with pytest.raises(ValueError, match="domain: must be integer"):
        enc(_x(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"domain: expected an int or shape \(2,\)"):
        enc(_x(2), torch.zeros(3, dtype=torch.long))


def test_domain_changes_output(fcfg):
    enc = _encoder(fcfg)
    x = _x(4)
    a, b = enc(x, 0), enc(x, 1)
    assert not torch.allclose(a.ws, b.ws)
    for r in (8, 16):
        assert not torch.allclose(a.residuals[r].feature, b.residuals[r].feature)
    # the same domain twice is deterministic
    assert torch.equal(enc(x, 0).ws, a.ws)


def test_ws_composition_uses_latent_avg(fcfg):
    enc = _encoder(fcfg)
    with torch.no_grad():
        enc.head.weight.zero_()
        enc.head.bias.zero_()
    out = enc(_x(3), torch.tensor([1, 0, 1]))
    expect = enc.latent_avg[torch.tensor([1, 0, 1])][:, None].expand(-1, enc.num_ws, -1)
    assert torch.equal(out.ws, expect)


def test_dsbn_mixed_batch_equals_separate_runs(fcfg):
    enc = _encoder(fcfg).train()
    x = _x(6)
    dom = torch.tensor([1, 0, 0, 1, 0, 1])
    mixed = enc(x, dom)
    i0, i1 = (dom == 0).nonzero().squeeze(1), (dom == 1).nonzero().squeeze(1)
    sep0, sep1 = enc(x[i0], 0), enc(x[i1], 1)
    for idx, sep in ((i0, sep0), (i1, sep1)):
        torch.testing.assert_close(mixed.ws[idx], sep.ws, rtol=1e-5, atol=1e-5)
        for r in (8, 16):
            torch.testing.assert_close(mixed.residuals[r].feature[idx], sep.residuals[r].feature, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed.residuals[r].mask[idx], sep.residuals[r].mask, rtol=1e-5, atol=1e-5)
    # and running everything under one domain gives something else
    assert not torch.allclose(enc(x, 0).ws[i1], sep1.ws)


def test_dsbn_picks_bn_per_sample():
    bn = DomainBatchNorm2d(3, 2)
    with torch.no_grad():
        bn.bns[0].bias.fill_(10.0)
        bn.bns[1].bias.fill_(-10.0)
    x = torch.randn(4, 3, 5, 5)
    y = bn(x, [(0, 2), (1, 2)])
    y = y.detach()
    assert float(y[:2].mean()) == pytest.approx(10.0, abs=1e-4)
    assert float(y[2:].mean()) == pytest.approx(-10.0, abs=1e-4)
    assert not any(n.endswith("running_mean") for n in bn.state_dict())  # batch statistics by default


def test_batch_stats_in_eval_and_running_stats_option(fcfg):
    x = _x(4)
    enc = _encoder(fcfg).eval()
    # batch statistics also in eval: a sample's code depends on its batch
    assert not torch.allclose(enc(x, 0).ws[:2], enc(x[:2], 0).ws)
    enc_rs = _encoder(fcfg, bn_running_stats=True)
    enc_rs.train()
    enc_rs(x, 0)
    enc_rs.eval()
    torch.testing.assert_close(enc_rs(x, 0).ws[:2], enc_rs(x[:2], 0).ws, rtol=1e-5, atol=1e-5)


def test_encoder_state_dict_round_trip(fcfg):
    enc = _encoder(fcfg)
    state = enc.state_dict()
    assert "latent_avg" in state
    other = InversionEncoder(fcfg, AdaptConfig())
    other.load_state_dict(state)
    x = _x(2)
    assert torch.equal(other(x, 1).ws, enc(x, 1).ws)
    with pytest.raises(ValueError, match="latent_avg"):
        enc.set_latent_avg(torch.zeros(3, fcfg.w_dim))


def test_no_injection_option(fcfg, gen):
    enc = _encoder(fcfg, inject_resolutions=[])
    out = enc(_x(2), 0)
    assert out.residuals == {}
    assert len(enc.skips) == 0 and len(enc.content_heads) == 0
    img, _, ws = invert(gen, enc, _x(2), 0)
    assert torch.equal(img, gen.synthesis(ws, noise_mode="const"))


def test_root_skip_when_coarsest_stage_is_injected(fcfg):
    enc = _encoder(fcfg, inject_resolutions=[4, 8, 16])
    assert enc.skips[0].root and not enc.skips[1].root
    out = enc(_x(2), 0)
    assert sorted(out.residuals) == [4, 8, 16]


# -- generator feature hook --------------------------------------------------------------------------


def _reference_synthesis(gen, ws, noise_mode="const"):
    """The synthesis loop as it was before the hook existed."""
    net = gen.synthesis_network
    noises = net._noises(ws.shape[0], ws, noise_mode, None)
    x = net.const[None].expand(ws.shape[0], -1, -1, -1)
    img, feats, wi, ni = None, [], 0, 0
    for block in net.blocks:
        n = block.num_conv
        x, img = block(x, img, [ws[:, wi + k] for k in range(n + 1)], noises[ni : ni + n])
        wi += n
        ni += n
        feats.append(x)
    return img, feats


def test_hook_none_is_unchanged(gen):
    ws = _ws(gen)
    with torch.no_grad():
        ref_img, ref_feats = _reference_synthesis(gen, ws)
        img, feats = gen.synthesis(ws, noise_mode="const", return_features=True, feature_hook=None)
        img2, feats2 = gen.synthesis(ws, noise_mode="const", return_features=True, feature_hook=lambda r, x: x)
        plain = gen.synthesis(ws, noise_mode="const")
    assert torch.equal(img, ref_img) and torch.equal(plain, ref_img) and torch.equal(img2, ref_img)
    assert all(torch.equal(a, b) for a, b in zip(feats, ref_feats))
    assert all(torch.equal(a, b) for a, b in zip(feats2, ref_feats))


def test_hook_must_keep_shape(gen):
    with pytest.raises(ValueError, match="feature_hook at resolution 4"):
        gen.synthesis(_ws(gen), feature_hook=lambda r, x: x[:, :1])


def test_hook_scale_zero_and_one(fcfg, gen):
    enc = _encoder(fcfg).eval()
    x = _x(2)
    with torch.no_grad():
        out = enc(x, 0)
        base_img, base = gen.synthesis(out.ws, noise_mode="const", return_features=True)
        img0, f0 = gen.synthesis(out.ws, noise_mode="const", return_features=True, feature_hook=feature_hook(out.residuals, 0.0))
        img1, f1 = gen.synthesis(out.ws, noise_mode="const", return_features=True, feature_hook=enc.feature_hook(out, 1.0))
        imgh, fh = gen.synthesis(out.ws, noise_mode="const", return_features=True, feature_hook=feature_hook(out.residuals, 0.5))
    assert torch.equal(img0, base_img) and all(torch.equal(a, b) for a, b in zip(f0, base))
    resolutions = fcfg.resolutions
    for r, a, b, h in zip(resolutions, base, f1, fh):
        if r < 8:
            assert torch.equal(a, b), r  # before the first injected block: untouched
        else:
            assert not torch.allclose(a, b), r  # injected at 8 and 16, and everything after
            assert not torch.allclose(h, b), r
    assert not torch.allclose(img1, base_img)
    # exactly the blend at an injected resolution
    # the block-8 output before injection is the unhooked one; after injection, the blend
    f8, m8 = out.residuals[8]
    torch.testing.assert_close(f1[1], base[1] * (1 - m8) + m8 * f8)
    torch.testing.assert_close(fh[1], base[1] * (1 - 0.5 * m8) + 0.5 * m8 * f8)
    with pytest.raises(ValueError, match="feature_scale"):
        feature_hook(out.residuals, 1.5)


def test_invert_gradients_reach_encoder_through_frozen_generator(fcfg, gen):
    enc = _encoder(fcfg).train()
    x = _x(4)
    img, feats, ws = invert(gen, enc, x, torch.tensor([0, 1, 0, 1]), feature_scale=1.0)
    assert img.shape == (4, 1, 64, 64) and len(feats) == len(fcfg.resolutions) and ws.shape == (4, gen.num_ws, 64)
    loss = (img - x).square().mean() + sum(f.square().mean() for f in feats) * 1e-3
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    named = dict(enc.named_parameters())
    for name in [
        "stem.conv.weight",
        "head.weight",
        "domain_embed.weight",
        "content_heads.0.a.conv.weight",
        "skips.0.update.weight",
        "skips.0.mask.weight",
        "skips.1.reset.weight",
        "skips.1.trans.weight",
    ]:
        g = named[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name
    for bn in ("stem.bn.bns.0.weight", "stem.bn.bns.1.weight"):
        assert float(named[bn].grad.abs().sum()) > 0, bn


def test_invert_checks_generator(fcfg):
    enc = _encoder(fcfg)
    other = Generator(FactoryConfig.preset("tiny", w_dim=32))
    with pytest.raises(ValueError, match="encoder and generator do not match"):
        invert(other, enc, _x(1), 0)


# -- per-domain mean w -----------------------------------------------------------------------------------


def test_domain_latent_avg(gen):
    a = domain_latent_avg(gen, 0, n=256, seed=3)
    assert a.shape == (gen.cfg.w_dim,) and torch.isfinite(a).all()
    assert torch.equal(a, domain_latent_avg(gen, 0, n=256, seed=3))
    assert not torch.equal(a, domain_latent_avg(gen, 0, n=256, seed=4))
    b = domain_latent_avg(gen, 1, n=256, seed=3)
    assert not torch.allclose(a, b)
    both = domain_latent_avg(gen, None, n=256, seed=3)
    torch.testing.assert_close(both, (a + b) / 2)
    stack = latent_avgs(gen, [0, None], n=256, seed=3)
    assert stack.shape == (2, gen.cfg.w_dim) and torch.equal(stack[0], a)
    single = domain_latent_avg(gen, 0, n=256, bins=[14], seed=3)
    z = torch.randn(256, gen.cfg.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(single, gen.mapping(z, 0, 14).mean(0))
    with pytest.raises(ValueError, match="client_id"):
        domain_latent_avg(gen, 5, n=8)
    with pytest.raises(ValueError, match="bins"):
        domain_latent_avg(gen, 0, n=8, bins=[29])


# -- segmentation branch --------------------------------------------------------------------------------


IDENTITY = {"name": "factory-a", "version": "3", "sha256": "ab" * 32}


@pytest.fixture
def branch(fcfg):
    torch.manual_seed(5)
    b = SegmentationBranch.for_factory(fcfg, CLASSES, AdaptConfig(), factory=IDENTITY)
    b.train()
    with torch.no_grad():  # non-trivial running statistics
        b([torch.randn(4, c, r, r) for r, c in zip(fcfg.resolutions, fcfg.channels)])
    return b.eval()


def _feats(fcfg, gen, enc=None, batch=2):
    with torch.no_grad():
        if enc is None:
            return gen.synthesis(_ws(gen, batch), noise_mode="const", return_features=True)[1]
        return invert(gen, enc, _x(batch), 0)[1]


def test_branch_shapes_and_config(fcfg, gen, branch):
    logits = branch(_feats(fcfg, gen))
    assert logits.shape == (2, 3, 64, 64) and torch.isfinite(logits).all()
    cfg = branch.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["class_names"] == CLASSES and cfg["feature_channels"] == list(fcfg.channels)
    assert cfg["resolution"] == 64 and cfg["factory"] == IDENTITY
    again = SegmentationBranch.from_config(cfg)
    assert again.config() == cfg
    again.load_state_dict(branch.state_dict())
    again.eval()
    feats = _feats(fcfg, gen)
    assert torch.equal(again(feats), branch(feats))
    with pytest.raises(ValueError, match="features: expected 5 maps"):
        branch(feats[:-1])
    with pytest.raises(ValueError, match=r"features\[0\]"):
        branch([feats[1], *feats[1:]])
    # a branch trains: gradients reach its parameters and (through features) the encoder
    enc = _encoder(fcfg)
    branch.train()
    _, feats, _ = invert(gen, enc, _x(2), 0)
    branch(feats).logsumexp(1).mean().backward()
    assert branch.proj[0].weight.grad is not None and enc.skips[1].update.weight.grad is not None


def test_branch_default_identity(fcfg):
    b = SegmentationBranch.for_factory(fcfg, ["bg", "fg"])
    assert b.config()["factory"] == {"name": "", "version": "", "sha256": ""}
    assert b.config()["hidden"] == AdaptConfig().branch_hidden


def _bad_configs(cfg):
    def edit(**kv):
        out = json.loads(json.dumps(cfg))
        for k, v in kv.items():
            if v is KeyError:
                del out[k]
            else:
                out[k] = v
        return out

    return [
        (edit(extra=1), "unknown key"),
        (edit(hidden=KeyError), "missing key"),
        (edit(format="other"), r"branch\.format"),
        (edit(version=2), r"branch\.version"),
        (edit(hidden=0), r"branch\.hidden"),
        (edit(hidden=True), r"branch\.hidden"),
        (edit(mlp=100000), r"branch\.mlp"),
        (edit(resolution=48), r"branch\.resolution"),
        (edit(feature_channels=[64, 64, 64, 32]), r"branch\.feature_channels"),
        (edit(feature_channels=[64, 64, 64, 32, 0]), r"branch\.feature_channels"),
        (edit(class_names=["background"]), r"branch\.class_names"),
        (edit(class_names=["bg", "bg"]), r"branch\.class_names"),
        (edit(class_names=["bg", 3]), r"branch\.class_names"),
        (edit(factory={"name": "a", "version": "1"}), r"branch\.factory"),
        (edit(factory={"name": "a", "version": 1, "sha256": ""}), r"branch\.factory\.version"),
        ("not a dict", "JSON object"),
    ]


def test_load_branch_refuses_bad_config(branch):
    state = branch.state_dict()
    for bad, match in _bad_configs(branch.config()):
        with pytest.raises(ValueError, match=match):
            load_branch(bad, state)


def test_load_branch_refuses_bad_weights(fcfg, gen, branch):
    cfg, good = branch.config(), branch.state_dict()
    loaded = load_branch(cfg, good)
    assert not loaded.training
    feats = _feats(fcfg, gen)
    assert torch.equal(loaded(feats), branch(feats))

    def edited(**kv):
        s = {k: v.clone() for k, v in good.items()}
        s.update(kv)
        return s

    nan = good["fc2.weight"].clone()
    nan[0, 0] = float("nan")
    inf = good["fc1.bias"].clone()
    inf[0] = float("inf")
    neg = good["bn1.running_var"].clone()
    neg[0] = -1.0
    cases = [
        (edited(extra=torch.zeros(1)), "unexpected key"),
        ({k: v for k, v in good.items() if k != "fc2.bias"}, "missing key"),
        (edited(**{"fc2.weight": torch.zeros(4, 32, 1, 1)}), r"fc2\.weight has shape"),
        (edited(**{"fc2.weight": nan}), "non-finite"),
        (edited(**{"fc1.bias": inf}), "non-finite"),
        (edited(**{"bn1.running_var": neg}), "negative"),
        (edited(**{"fc2.bias": [0.0, 0.0, 0.0]}), "not a tensor"),
        (edited(**{"fc2.bias": torch.zeros(3, dtype=torch.long)}), "floating point"),
        (edited(**{"bn1.num_batches_tracked": torch.tensor(1.5)}), "integer"),
        ("weights", "mapping"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            load_branch(cfg, state)
    # the state must match the config it comes with
    with pytest.raises(ValueError, match="shape"):
        load_branch({**cfg, "hidden": 16}, good)


def test_branch_files_round_trip(fcfg, gen, branch):
    files = branch_files(branch)
    assert set(files) == {"branch.json", "branch.pt"} and all(isinstance(v, bytes) for v in files.values())
    assert json.loads(files["branch.json"]) == branch.config()
    loaded = validate_branch_files(files)
    feats = _feats(fcfg, gen)
    assert torch.equal(loaded(feats), branch(feats))
    assert loaded.class_names == CLASSES


class _Payload:
    """Any non-tensor object: a weights-only load must refuse to build it."""


def test_validate_branch_files_refuses(branch):
    files = branch_files(branch)
    evil = io.BytesIO()
    torch.save({"x": _Payload()}, evil)
    small = io.BytesIO()
    torch.save({k: v for k, v in branch.state_dict().items() if k != "fc2.bias"}, small)
    cases = [
        ({"branch.json": files["branch.json"]}, r"missing branch\.pt"),
        ({**files, "run.py": b"print(1)"}, r"unexpected run\.py"),
        ({**files, "branch.json": b"{nope"}, r"branch\.json: not valid UTF-8 JSON"),
        ({**files, "branch.json": b"[1, 2]"}, r"branch\.json: must be a JSON object"),
        ({**files, "branch.json": json.dumps({**branch.config(), "hidden": -1}).encode()}, r"branch\.json\.hidden"),
        ({**files, "branch.pt": b"garbage"}, r"branch\.pt: not a weights-only torch file"),
        ({**files, "branch.pt": evil.getvalue()}, r"branch\.pt: not a weights-only torch file"),
        ({**files, "branch.pt": small.getvalue()}, r"branch\.pt: .*missing key"),
        ({**files, "branch.pt": "text"}, r"branch\.pt: must be bytes"),
        ("files", "must map file names"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            validate_branch_files(bad)


def test_validate_branch_config_normalises(branch):
    cfg = branch.config()
    assert validate_branch_config(cfg) == cfg


# -- timing ----------------------------------------------------------------------------------------------


def test_timing_tiny(fcfg, gen):
    """One tiny encoder + synthesis forward/backward at batch 8 (printed, not asserted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enc = _encoder(fcfg).train()
        opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
        x = _x(8)
        times = []
        for i in range(11):
            t0 = time.perf_counter()
            img, feats, ws = invert(gen, enc, x, torch.tensor([0, 1] * 4), feature_scale=1.0)
            loss = (img - x).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        print(
            f"\ntiny encoder ({count_parameters(enc):,} params) + synthesis fwd/bwd, batch 8, 2 threads: "
            f"median {sorted(times[1:])[len(times[1:]) // 2]:.3f} s, best {best:.3f} s"
        )
        assert math.isfinite(loss.item())
    finally:
        torch.set_num_threads(threads)
