"""Domain key of the data factory: reproducibility, freezing, gradients, domain separation, config."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipelines.artifact_approval import STORE_ENV, ApprovalStore
from pipelines.factory.domain_key import (
    ConcatKey,
    DomainKey,
    KeyConfigError,
    KeyFunction,
    RandomCNNKey,
    SoftHistogramKey,
    TorchScriptKey,
    build_domain_key,
    smooth_random_fields,
    validate_key_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


# --------------------------------------------------------------------------- reproducibility


def test_random_cnn_checksum_reproducible_in_process_and_subprocess():
    a, b = RandomCNNKey(seed=0), RandomCNNKey(seed=0)
    assert a.checksum() == b.checksum()
    assert len(a.checksum()) == 64
    code = "from pipelines.factory.domain_key import RandomCNNKey; print(RandomCNNKey(seed=0).checksum())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == a.checksum()
    assert RandomCNNKey(seed=1).checksum() != a.checksum()
    # The config is part of the checksum, not only the weights.
    assert RandomCNNKey(seed=0, proj_dim=32).checksum() != a.checksum()
    # Same weights, same embedding.
    x = _images(3)
    assert torch.equal(a.embed(x), b.embed(x))


def test_checksum_changes_when_a_weight_changes():
    k = RandomCNNKey(seed=0)
    before = k.checksum()
    with torch.no_grad():
        k.convs[1].weight[0, 0, 0, 0] += 1e-3
    assert k.checksum() != before


def test_building_does_not_touch_global_rng():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    RandomCNNKey(seed=5, widths=(8, 8))
    DomainKey(ConcatKey([RandomCNNKey(seed=0), SoftHistogramKey(16)]), reference_size=32, reference_count=8)
    assert torch.equal(torch.get_rng_state(), state)


def test_domain_key_checksum_covers_reference_settings():
    fn = RandomCNNKey(seed=0, widths=(8, 16))
    a = DomainKey(fn, reference_size=32, reference_count=8)
    assert a.checksum() == DomainKey(RandomCNNKey(seed=0, widths=(8, 16)), reference_size=32, reference_count=8).checksum()
    assert a.checksum() != DomainKey(fn, reference_seed=1, reference_size=32, reference_count=8).checksum()
    assert a.checksum() != DomainKey(fn, reference_size=32, reference_count=9).checksum()
    assert a.describe()["fn"] == fn.describe()


# --------------------------------------------------------------------------- frozen, differentiable, unit norm


@pytest.mark.parametrize(
    "fn",
    [RandomCNNKey(seed=0), SoftHistogramKey(32), ConcatKey([RandomCNNKey(seed=0), SoftHistogramKey(32)])],
    ids=["cnn", "hist", "concat"],
)
def test_frozen_differentiable_unit_norm(fn: KeyFunction):
    params = list(fn.parameters())
    assert all(not p.requires_grad for p in params)
    fn.train()  # a parent's .train() must not take a key function out of eval mode
    assert not fn.training and all(not m.training for m in fn.modules())
    x = _images(4, 32).requires_grad_(True)
    e = fn.embed(x)
    assert e.shape == (4, fn.dim)
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    (e * torch.randn_like(e)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_centred_is_differentiable_and_unit_norm():
    dk = DomainKey(RandomCNNKey(seed=0, widths=(8, 16)), reference_size=32, reference_count=8)
    x = _images(3, 32).requires_grad_(True)
    c = dk.centred(x)
    assert c.shape == (3, dk.dim)
    assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
    key = dk.site_key([_images(5, 32, seed=9)])
    # The key-alignment loss of the method: arccos(cos(embed(fake), key))^2.
    loss = torch.arccos((c @ key).clamp(-1 + 1e-6, 1 - 1e-6)).pow(2).mean()
    loss.backward()
    assert x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- domain separation


def _anatomy(n: int, size: int = 64, seed: int = 123) -> torch.Tensor:
    """(n, 1, size, size) in [0, 1]: an elliptic body with two organs and smooth texture on a noisy floor."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    texture = smooth_random_fields(n, size, seed + 1)[:, 0]
    out = []
    for i in range(n):
        r = 0.6 + 0.15 * torch.rand(1, generator=g)
        body = ((xx / (1.1 * r)) ** 2 + (yy / r) ** 2 < 1).float()
        organ1 = (((xx - 0.25 * torch.rand(1, generator=g)) / 0.2) ** 2 + ((yy + 0.1) / 0.3) ** 2 < 1).float()
        organ2 = (((xx + 0.3) / 0.15) ** 2 + ((yy - 0.2 * torch.rand(1, generator=g)) / 0.15) ** 2 < 1).float()
        img = body * (0.4 + 0.05 * texture[i] + 0.3 * organ1 + 0.5 * organ2)
        img = F.avg_pool2d(F.pad(img[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
        img = img + 0.03 + 0.03 * torch.randn(size, size, generator=g).abs()  # the scanner's noise floor
        out.append(img.clamp(0, 1))
    return torch.stack(out)[:, None]


def _three_scanners(n: int = 32) -> dict[str, torch.Tensor]:
    u = _anatomy(n)  # the same anatomy seen by three scanners
    return {
        "identity": u * 2 - 1,
        "gamma0.5": u.sqrt() * 2 - 1,
        "inverted": (1 - u**2) * 2 - 1,
    }


def test_domain_separation_on_three_scanner_phantom():
    dk = build_domain_key({}, image_size=64)
    assert isinstance(dk.fn, ConcatKey)
    domains = _three_scanners(32)
    halves = {d: (x[:16], x[16:]) for d, x in domains.items()}
    centred = {d: (dk.site_key([a]), dk.site_key([b])) for d, (a, b) in halves.items()}
    raw = {d: tuple(F.normalize(dk.fn.embed(h).mean(0), dim=0) for h in hs) for d, hs in halves.items()}
    names = list(domains)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def cos(keys, a, b, i=0, j=1):
        return float(keys[a][i] @ keys[b][j])

    within_c = {d: cos(centred, d, d) for d in names}
    within_r = {d: cos(raw, d, d) for d in names}
    across_c = {p: max(cos(centred, *p, i, j) for i in (0, 1) for j in (0, 1)) for p in pairs}
    across_r = {p: max(cos(raw, *p, i, j) for i in (0, 1) for j in (0, 1)) for p in pairs}
    print("\nwithin-domain cosine  raw:", {d: round(v, 4) for d, v in within_r.items()})
    print("within-domain cosine  centred:", {d: round(v, 4) for d, v in within_c.items()})
    print("across-domain cosine (max over halves)  raw:", {"/".join(p): round(v, 3) for p, v in across_r.items()})
    print("across-domain cosine (max over halves)  centred:", {"/".join(p): round(v, 3) for p, v in across_c.items()})
    assert min(within_c.values()) >= 0.8
    assert max(across_c.values()) <= 0.7
    for p in pairs:  # centring is what separates the domains
        assert across_c[p] < across_r[p], p
    assert max(across_c.values()) < min(across_r.values())


def test_site_key_streams_any_batch_sizes():
    dk = DomainKey(ConcatKey([RandomCNNKey(seed=0), SoftHistogramKey(16)]), reference_size=32, reference_count=8)
    x = _images(13, 32, seed=3)
    one = dk.site_key([x])
    streamed = dk.site_key(iter([x[:1], x[1:6], x[6:6], x[6:13]]))  # a generator; an empty batch too
    assert one.shape == (dk.dim,)
    assert torch.allclose(one, streamed, atol=1e-5)
    assert abs(float(one.norm()) - 1) < 1e-5
    # Every image counts: dropping some changes the key.
    assert not torch.allclose(one, dk.site_key([x[:6]]), atol=1e-4)
    with pytest.raises(ValueError, match="at least one image"):
        dk.site_key([])
    with pytest.raises(ValueError, match="32x32"):
        dk.site_key([_images(2, 16)])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        dk.site_key([torch.zeros(2, 3, 32, 32)])


def test_reference_is_site_independent_and_seeded():
    a = smooth_random_fields(4, 32, seed=0)
    assert torch.equal(a, smooth_random_fields(4, 32, seed=0))
    assert not torch.equal(a, smooth_random_fields(4, 32, seed=1))
    assert float(a.min()) == pytest.approx(-1.0) and float(a.max()) == pytest.approx(1.0)
    fn = RandomCNNKey(seed=0, widths=(8,))
    assert torch.equal(DomainKey(fn, reference_size=32, reference_count=4).reference, DomainKey(fn, reference_size=32, reference_count=4).reference)


# --------------------------------------------------------------------------- soft histogram


def test_soft_histogram_follows_intensity_shift_and_has_gradient():
    h = SoftHistogramKey(bins=16)
    x = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0)) * 0.4 - 0.6  # in [-0.6, -0.2]
    hist = h.histogram(x)
    assert torch.allclose(hist.sum(1), torch.ones(2), atol=1e-5)
    centres = h.centres
    mean_before = float((hist * centres).sum(1).mean())
    shifted = h.histogram(x + 0.8)
    mean_after = float((shifted * centres).sum(1).mean())
    assert mean_after - mean_before == pytest.approx(0.8, abs=0.05)
    assert float(h.embed(x)[0] @ h.embed(x + 0.8)[0]) < 0.2
    assert float(h.embed(x)[0] @ h.embed(x + 0.01)[0]) > 0.99
    # Out-of-range pixels land in the edge bins instead of vanishing.
    edge = h.histogram(torch.full((1, 1, 4, 4), 3.0))
    assert float(edge[0, -1]) > 0.5 and torch.isfinite(edge).all()
    xg = x.clone().requires_grad_(True)
    (h.embed(xg) * torch.randn(2, 16, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert xg.grad.abs().sum() > 0


# --------------------------------------------------------------------------- TorchScript encoder


class _TinyEncoder(torch.nn.Module):
    def __init__(self, c_in: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, 12)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def _approvals(tmp_path, monkeypatch):
    """TorchScript loads only with the site's approval: each test has its own store."""
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))


def _approve(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ApprovalStore.from_env().decide(digest, True, kind="torchscript")
    return digest


def _save_encoder(path: Path, c_in: int = 3) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(_TinyEncoder(c_in)).save(str(path))
    return _approve(path)


def test_torchscript_key_through_build(tmp_path):
    digest = _save_encoder(tmp_path / "registry" / "tiny.pt")
    raw = {"kind": "encoder", "file": "registry/tiny.pt", "sha256": digest, "input_size": 40, "channels": 3}
    dk = build_domain_key(raw, image_size=32, models_dir=tmp_path)
    fn = dk.fn
    assert isinstance(fn, TorchScriptKey) and fn.dim == 12 and dk.dim == 12
    assert all(not p.requires_grad for p in fn.parameters())
    x = _images(3, 32).requires_grad_(True)
    e = fn.embed(x)
    assert e.shape == (3, 12) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    dk.centred(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert dk.site_key([x.detach()]).shape == (12,)
    # The checksum is the file's digest plus the config, never the site-specific path.
    assert fn.describe()["sha256"] == digest and str(tmp_path) not in str(fn.describe())
    other = tmp_path / "elsewhere"
    (other / "registry").mkdir(parents=True)
    (other / "registry" / "tiny.pt").write_bytes((tmp_path / "registry" / "tiny.pt").read_bytes())
    assert build_domain_key(raw, image_size=32, models_dir=other).checksum() == dk.checksum()
    # models_dir defaults to FEDIMG_MODELS_DIR
    import os

    old = os.environ.get("FEDIMG_MODELS_DIR")
    os.environ["FEDIMG_MODELS_DIR"] = str(other)
    try:
        assert build_domain_key(raw, image_size=32).checksum() == dk.checksum()
    finally:
        if old is None:
            del os.environ["FEDIMG_MODELS_DIR"]
        else:
            os.environ["FEDIMG_MODELS_DIR"] = old


def test_torchscript_key_errors(tmp_path, monkeypatch):
    digest = _save_encoder(tmp_path / "registry" / "tiny.pt")
    wrong = "0" * 64
    with pytest.raises(KeyConfigError) as e:
        build_domain_key({"kind": "encoder", "file": "registry/tiny.pt", "sha256": wrong, "channels": 3}, 32, models_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "registry" / "tiny.pt") in msg and wrong in msg and digest in msg and msg.startswith("key")
    with pytest.raises(KeyConfigError, match="weights on disk") as e:
        build_domain_key({"kind": "encoder", "file": "registry/missing.pt"}, 32, models_dir=tmp_path)
    assert str(tmp_path / "registry" / "missing.pt") in str(e.value) and "key.file" in str(e.value)
    with pytest.raises(KeyConfigError, match="weights on disk") as e:
        build_domain_key({"kind": "encoder", "file": "registry/tiny.pt"}, 32, models_dir=tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    monkeypatch.delenv("FEDIMG_MODELS_DIR", raising=False)
    with pytest.raises(KeyConfigError, match="FEDIMG_MODELS_DIR"):
        build_domain_key({"kind": "encoder", "file": "registry/tiny.pt"}, 32)
    with pytest.raises(KeyConfigError, match="dim 7"):
        TorchScriptKey(tmp_path / "registry" / "tiny.pt", channels=3, dim=7)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    _approve(tmp_path / "junk.pt")
    with pytest.raises(KeyConfigError, match="TorchScript"):
        TorchScriptKey(tmp_path / "junk.pt")
    with pytest.raises(KeyConfigError, match="does not exist"):
        TorchScriptKey(tmp_path / "absent.pt")


# --------------------------------------------------------------------------- configuration


def test_build_defaults_and_kinds():
    assert build_domain_key(None, 32) is None
    assert build_domain_key({"kind": "none"}, 32) is None
    default = build_domain_key({}, 32)
    assert isinstance(default, DomainKey) and isinstance(default.fn, ConcatKey)
    cnn, hist = default.fn.parts
    assert isinstance(cnn, RandomCNNKey) and cnn.seed == 0 and cnn.widths == (16, 32, 64)
    assert isinstance(hist, SoftHistogramKey) and hist.bins == 32
    assert default.dim == 64 + 32 and default.reference_size == 32
    explicit = build_domain_key({"kind": "random_cnn+histogram", "seed": 0, "bins": 32}, 32)
    assert explicit.checksum() == default.checksum()
    k = build_domain_key({"kind": "random_cnn", "seed": 3, "widths": [8, 8], "proj_dim": 16, "reference_seed": 2}, 32)
    assert isinstance(k.fn, RandomCNNKey) and k.dim == 16 and k.reference_seed == 2
    h = build_domain_key({"kind": "histogram", "bins": 8}, 32)
    assert isinstance(h.fn, SoftHistogramKey) and h.dim == 8


def test_validate_normalises():
    assert validate_key_config(None) == {"kind": "none"}
    assert validate_key_config({"kind": "none"}) == {"kind": "none"}
    d = validate_key_config({})
    assert d["kind"] == "random_cnn+histogram" and d["seed"] == 0 and d["widths"] == [16, 32, 64]
    assert d["bins"] == 32 and d["reference_seed"] == 0
    e = validate_key_config({"kind": "encoder", "file": "registry/clip.pt", "sha256": "AB" * 32})
    assert e["sha256"] == "ab" * 32 and e["channels"] == 1 and e["input_size"] is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "clip"}, "key.kind"),
        ({"kind": "random_cnn", "bins": 8}, "key.bins"),
        ({"kind": "none", "seed": 1}, "key.seed"),
        ({"colour": 1}, "key.colour"),
        ({"seed": -1}, "key.seed"),
        ({"seed": True}, "key.seed"),
        ({"widths": []}, "key.widths"),
        ({"widths": [16, 0]}, "key.widths[1]"),
        ({"widths": "16"}, "key.widths"),
        ({"proj_dim": 0}, "key.proj_dim"),
        ({"bins": 1}, "key.bins"),
        ({"bins": 8.5}, "key.bins"),
        ({"bandwidth": 0}, "key.bandwidth"),
        ({"lo": 1.0, "hi": 0.0}, "key.hi"),
        ({"reference_count": 0}, "key.reference_count"),
        ({"kind": "encoder"}, "key.file"),
        ({"kind": "encoder", "file": "/abs/x.pt"}, "key.file"),
        ({"kind": "encoder", "file": "../x.pt"}, "key.file"),
        ({"kind": "encoder", "file": "registry/x.pt", "sha256": "abc"}, "key.sha256"),
        ({"kind": "encoder", "file": "registry/x.pt", "channels": 2}, "key.channels"),
        ({"kind": "encoder", "file": "registry/x.pt", "input_size": 0}, "key.input_size"),
    ],
)
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(KeyConfigError) as e:
        validate_key_config(raw)
    assert str(e.value).startswith(field + ":"), str(e.value)
    with pytest.raises(KeyConfigError) as e:
        build_domain_key(raw, 32, where="factory.key")
    assert str(e.value).startswith("factory." + field + ":"), str(e.value)


def test_config_must_be_a_mapping():
    with pytest.raises(KeyConfigError, match=r"^key: must be a mapping"):
        validate_key_config(["random_cnn"])
    assert issubclass(KeyConfigError, ValueError)
