"""Phase-2 networks of the data-factory method: the W+ inversion encoder and the segmentation branch.

A site inverts its images into W+ of the FROZEN factory generator (`pipelines.factory.networks`)
with `InversionEncoder` (domain-specific batch norm, gated residual features injected into the
generator by `feature_hook`) and reads the generator's feature maps with `SegmentationBranch`,
a small per-pixel classifier. Pure PyTorch. Their sizes: `pipelines.adaptation.config`; the
branch's published file format: `pipelines.adaptation.branch_file` (its names stay importable
from here). Design, shapes and sizes: docs/design/adaptation-networks.md.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedimg_core.config import short
from pipelines.adaptation.config import (  # noqa: F401  (re-exported: the configs' old home)
    ADAPT_PRESETS,
    BRANCH_FORMAT,
    FACTORY_KEYS,
    N_STAGES,
    AdaptConfig,
    BranchConfig,
    resolve_inject_resolutions,
    stage_resolutions,
)
from pipelines.config_fields import check_model, is_int
from pipelines.factory.networks import EqualLinear, FactoryConfig, Generator, count_parameters, pixel_norm, requires_grad

__all__ = [
    "AdaptConfig",
    "ADAPT_PRESETS",
    "BranchConfig",
    "InversionEncoder",
    "EncoderOutput",
    "Residual",
    "DomainBatchNorm2d",
    "GatedSkip",
    "feature_hook",
    "invert",
    "domain_latent_avg",
    "latent_avgs",
    "resolve_inject_resolutions",
    "stage_resolutions",
    "SegmentationBranch",
    "BRANCH_FORMAT",
    "requires_grad",
    "count_parameters",
]


# -- domain-specific batch norm -----------------------------------------------------------------

Segments = list[tuple[int, int]]  # (domain, count) runs of a batch sorted by domain


class DomainBatchNorm2d(nn.Module):
    """One BatchNorm2d per domain; ``forward(x, segments)`` normalises each contiguous run of
    ``segments`` = [(domain, count), ...] with that domain's BN (x sorted by domain)."""

    def __init__(self, num_features: int, n_domains: int, running_stats: bool = False):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features, track_running_stats=running_stats) for _ in range(n_domains))

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Normalise each domain's contiguous run of ``x`` with that domain's BN."""
        if len(segments) == 1:
            return self.bns[segments[0][0]](x)
        parts = x.split([n for _, n in segments])
        return torch.cat([self.bns[d](p) for (d, _), p in zip(segments, parts)])


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, n_domains: int, running: bool, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = DomainBatchNorm2d(cout, n_domains, running)
        self.act = nn.PReLU(cout) if act else None

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        x = self.bn(self.conv(x), seg)
        return self.act(x) if self.act is not None else x


class _ResBlock(nn.Module):
    """iResNet basic block: DSBN - conv3x3 - DSBN - PReLU - conv3x3(stride) - DSBN, plus a
    1x1 (stride) conv - DSBN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, n_domains: int, running: bool):
        super().__init__()
        self.bn0 = DomainBatchNorm2d(cin, n_domains, running)
        self.conv1 = _ConvBN(cin, cout, n_domains, running)
        self.conv2 = _ConvBN(cout, cout, n_domains, running, stride=stride, act=False)
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.short_bn = DomainBatchNorm2d(cout, n_domains, running)
        else:
            self.short = self.short_bn = None

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        y = self.conv2(self.conv1(self.bn0(x, seg), seg), seg)
        s = self.short_bn(self.short(x), seg) if self.short is not None else x
        return y + s


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, n_domains: int, running: bool):
        super().__init__()
        self.blocks = nn.ModuleList(_ResBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, n_domains, running) for i in range(blocks))

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, seg)
        return x


class _ContentHead(nn.Module):
    """conv3x3 - DSBN - PReLU - conv3x3 - DSBN (same width)."""

    def __init__(self, channels: int, n_domains: int, running: bool):
        super().__init__()
        self.a = _ConvBN(channels, channels, n_domains, running)
        self.b = _ConvBN(channels, channels, n_domains, running, act=False)

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        return self.b(self.a(x, seg), seg)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")


class GatedSkip(nn.Module):
    """Gated GRU-like skip (the authors' DynamicSkipLayer), one per injected resolution.

    ``forward(f, h) -> (mask, f_hat, new_state)``: ``f`` the stage's content (C, r, r), ``h``
    the coarser state (C_h, r/2, r/2) or None for the root (then new_state = f and mask /
    f_hat come from f alone). ``mask`` in [0, 1) and ``f_hat`` have ``out_channels`` (the
    generator's channels at r)."""

    def __init__(self, state_channels: int | None, channels: int, out_channels: int):
        super().__init__()
        self.root = state_channels is None
        if self.root:
            self.trans = self.reset = None
            cin = channels
        else:
            self.trans = _conv3(state_channels, channels)
            self.reset = _conv3(2 * channels, channels)
            cin = 2 * channels
        self.mask = _conv3(cin, out_channels)
        self.update = _conv3(cin, out_channels)

    def forward(self, f: torch.Tensor, h: torch.Tensor | None):
        """(mask m, residual feature f_hat, state) from the stage feature ``f`` and the coarser state ``h`` (None at the coarsest)."""
        if self.root:
            m = torch.tanh(F.relu(self.mask(f)))
            return m, self.update(f), f
        state = F.leaky_relu(self.trans(F.interpolate(h, scale_factor=2.0, mode="nearest")), 0.2)
        hf = torch.cat([state, f], dim=1)
        new_state = torch.sigmoid(self.reset(hf)) * state
        m = torch.tanh(F.relu(self.mask(hf)))
        f_hat = self.update(torch.cat([new_state, f], dim=1))
        return m, f_hat, new_state


# -- the encoder ---------------------------------------------------------------------------------


class Residual(NamedTuple):
    """A residual feature for one generator resolution and the gate that mixes it in."""

    feature: torch.Tensor  # f_hat (B, C_G(r), r, r)
    mask: torch.Tensor  # m in [0, 1), same shape


class EncoderOutput(NamedTuple):
    """What `InversionEncoder` returns: W+ codes and the residual features per generator resolution."""

    ws: torch.Tensor  # (B, num_ws, w_dim)
    residuals: dict[int, Residual]  # generator resolution -> residual feature (empty: none)


def _domain_index(domain, batch: int, n_domains: int, device) -> torch.Tensor:
    if isinstance(domain, torch.Tensor):
        t = domain.to(device)
    elif is_int(domain):
        t = torch.tensor(domain, device=device)
    elif isinstance(domain, Sequence) and not isinstance(domain, (str, bytes)) and all(is_int(v) for v in domain):
        t = torch.tensor(list(domain), device=device, dtype=torch.long)
    else:
        raise ValueError(f"domain: must be an int or a (B,) integer tensor (got {short(domain)})")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"domain: must be integer(s) (got dtype {t.dtype})")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"domain: expected an int or shape ({batch},) (got {tuple(t.shape)})")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_domains):
        raise ValueError(f"domain: values must be in [0, {n_domains - 1}] (got {t.tolist()})")
    return t


class InversionEncoder(nn.Module):
    """Image -> (W+ codes, residual features) for the frozen factory generator.

    ``latent_avg``: (n_domains, w_dim) per-domain mean w (see `latent_avgs`); None = zeros
    (load a state dict or call `set_latent_avg` later). It is a persistent buffer, so a saved
    encoder carries it."""

    def __init__(self, factory_cfg: FactoryConfig, cfg: AdaptConfig | None = None, latent_avg: torch.Tensor | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else AdaptConfig()
        self.factory_cfg, self.cfg = factory_cfg, cfg
        self.resolution = factory_cfg.resolution
        self.num_ws = 2 * len(factory_cfg.resolutions)  # as SynthesisNetwork.num_ws
        self.w_dim = factory_cfg.w_dim
        self.n_domains = nd = cfg.n_domains
        run = cfg.bn_running_stats
        self.stage_resolutions = stage_resolutions(factory_cfg, cfg)
        self.inject_resolutions = resolve_inject_resolutions(factory_cfg, cfg)
        gen_ch = dict(zip(factory_cfg.resolutions, factory_cfg.channels))
        ch = cfg.encoder_channels

        self.stem = _ConvBN(1, cfg.stem_channels, nd, run, stride=cfg.stem_stride)
        cins = (cfg.stem_channels, *ch[:-1])
        self.stages = nn.ModuleList(_Stage(cins[k], ch[k], cfg.encoder_blocks[k], nd, run) for k in range(N_STAGES))

        p = cfg.pool_size
        self.head = nn.Linear(sum(ch) * p * p, self.num_ws * self.w_dim)  # one linear map per style
        self.domain_embed = EqualLinear(nd, self.num_ws * self.w_dim)
        self.register_buffer("latent_avg", torch.zeros(nd, self.w_dim))
        if latent_avg is not None:
            self.set_latent_avg(latent_avg)

        # residual chain: stage indices, coarse to fine
        idx = [self.stage_resolutions.index(r) for r in sorted(self.inject_resolutions)]  # ascending res
        self._inject_stages = sorted(idx, reverse=True)  # coarse -> fine (descending index)
        chain = list(self._inject_stages)
        if chain and chain[0] + 1 < N_STAGES:
            chain.insert(0, chain[0] + 1)  # the next coarser stage gives the initial state
        self._chain = chain
        self.content_heads = nn.ModuleList(_ContentHead(ch[k], nd, run) for k in chain)
        skips = []
        for j, k in enumerate(chain):
            if k not in self._inject_stages:
                continue  # state-only start of the chain
            prev = ch[chain[j - 1]] if j > 0 else None
            skips.append(GatedSkip(prev, ch[k], gen_ch[self.stage_resolutions[k]]))
        self.skips = nn.ModuleList(skips)

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Set the per-domain mean latents (n_domains, w_dim) the W+ codes are offset by."""
        t = torch.as_tensor(latent_avg)
        if t.shape != (self.n_domains, self.w_dim) or not t.dtype.is_floating_point or not torch.isfinite(t).all():
            raise ValueError(f"latent_avg: expected a finite float tensor of shape ({self.n_domains}, {self.w_dim}) (got {tuple(t.shape)}, {t.dtype})")
        with torch.no_grad():
            self.latent_avg.copy_(t)

    def forward(self, x: torch.Tensor, domain) -> EncoderOutput:
        """x (B, 1, R, R) in [-1, 1]; domain: int or (B,) long in [0, n_domains)."""
        r = self.resolution
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, r, r):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, 1, {r}, {r}) (got {got})")
        b = x.shape[0]
        if b == 0:
            raise ValueError("x: empty batch")
        dom = _domain_index(domain, b, self.n_domains, x.device)
        # sort by domain once (stable); DSBN then works on contiguous runs
        counts = torch.bincount(dom, minlength=self.n_domains).tolist()
        segments = [(d, n) for d, n in enumerate(counts) if n > 0]
        order = inverse = None
        if len(segments) > 1 and bool((dom[1:] < dom[:-1]).any()):
            order = torch.argsort(dom, stable=True)
            inverse = torch.argsort(order)
            x, dom = x[order], dom[order]

        h = self.stem(x, segments)
        feats = []
        for stage in self.stages:
            h = stage(h, segments)
            feats.append(h)

        p = self.cfg.pool_size
        pooled = torch.cat([F.adaptive_avg_pool2d(f, p).flatten(1) for f in feats], dim=1)
        codes = self.head(pooled).view(b, self.num_ws, self.w_dim)
        onehot = F.one_hot(dom, self.n_domains).to(codes.dtype)
        mod = pixel_norm(self.domain_embed(onehot).view(b, self.num_ws, self.w_dim), dim=2)
        ws = codes * mod + self.latent_avg.to(codes.dtype)[dom][:, None, :]

        residuals: dict[int, Residual] = {}
        state = None
        si = 0
        for head, k in zip(self.content_heads, self._chain):
            f = head(feats[k], segments)
            if k not in self._inject_stages:
                state = f
                continue
            m, f_hat, state = self.skips[si](f, state)
            si += 1
            residuals[self.stage_resolutions[k]] = Residual(f_hat, m)

        if inverse is not None:
            ws = ws[inverse]
            residuals = {res: Residual(v.feature[inverse], v.mask[inverse]) for res, v in residuals.items()}
        return EncoderOutput(ws, residuals)

    def feature_hook(self, out: EncoderOutput, feature_scale: float = 1.0):
        """The generator hook injecting ``out.residuals`` with strength ``feature_scale``."""
        return feature_hook(out.residuals, feature_scale)

    def check_generator(self, generator: Generator) -> None:
        """ValueError unless ``generator`` has the architecture this encoder was built for."""
        g, f = generator.cfg, self.factory_cfg
        if (g.resolution, tuple(g.channels), g.w_dim) != (f.resolution, tuple(f.channels), f.w_dim):
            raise ValueError(
                "encoder and generator do not match: encoder built for resolution "
                f"{f.resolution}, channels {list(f.channels)}, w_dim {f.w_dim}; generator has "
                f"{g.resolution}, {list(g.channels)}, {g.w_dim}"
            )


def _scale(feature_scale) -> float:
    ok = not isinstance(feature_scale, bool) and isinstance(feature_scale, (int, float))
    if ok:
        feature_scale = float(feature_scale)
        ok = math.isfinite(feature_scale) and 0.0 <= feature_scale <= 1.0
    if not ok:
        raise ValueError(f"feature_scale: must be a number in [0, 1] (got {short(feature_scale)})")
    return feature_scale


def feature_hook(residuals: Mapping[int, Residual], feature_scale: float = 1.0) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``hook(resolution, x)`` for ``Generator.synthesis(..., feature_hook=hook)``: at each
    resolution in ``residuals``, ``x * (1 - s * m) + s * m * f_hat``; elsewhere (and for s = 0)
    x unchanged (the same tensor)."""
    s = _scale(feature_scale)
    res = dict(residuals)

    def hook(resolution: int, x: torch.Tensor) -> torch.Tensor:
        item = res.get(resolution)
        if item is None or s == 0.0:
            return x
        f_hat, m = item
        if f_hat.shape != x.shape:
            raise ValueError(f"residual feature at resolution {resolution}: shape {tuple(f_hat.shape)} does not match the generator feature {tuple(x.shape)}")
        sm = m * s
        return x * (1.0 - sm) + sm * f_hat

    return hook


def invert(
    generator: Generator,
    encoder: InversionEncoder,
    x: torch.Tensor,
    domain,
    feature_scale: float = 1.0,
    noise_mode: str = "const",
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Encode ``x`` under ``domain`` (own: reconstruction, other: translation) and synthesise.

    Returns ``(image (B, 1, R, R), features [one (B, C_r, r, r) per resolution 4..R, post
    injection], ws (B, num_ws, w_dim))``. Gradients reach the encoder through the generator
    whatever the generator's ``requires_grad``."""
    encoder.check_generator(generator)
    out = encoder(x, domain)
    hook = feature_hook(out.residuals, feature_scale)
    img, features = generator.synthesis(out.ws, noise_mode=noise_mode, return_features=True, feature_hook=hook)
    return img, features, out.ws


# -- per-domain mean w ---------------------------------------------------------------------------


def _middle_bins(n_bins: int) -> list[int]:
    q = n_bins // 4
    return list(range(q, n_bins - q))


@torch.no_grad()
def domain_latent_avg(
    generator: Generator,
    client_id: int | None,
    n: int = 4096,
    bins: Sequence[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Mean w (w_dim,) of the generator's mapping for one client id, key None, over ``n``
    seeded z (the same z for every condition) and the slice ``bins`` (default: the middle half
    of the bins, n_bins//4 .. n_bins - n_bins//4 - 1; no bin when the factory has none).
    ``client_id`` None averages the per-client means over all client ids equally (a target
    site that was not a factory member)."""
    cfg = generator.cfg
    if not is_int(n) or n < 1:
        raise ValueError(f"domain_latent_avg.n: must be an integer >= 1 (got {short(n)})")
    if client_id is None:
        clients = list(range(cfg.n_clients))
    elif not is_int(client_id) or not 0 <= client_id < cfg.n_clients:
        raise ValueError(f"domain_latent_avg.client_id: must be an integer in [0, {cfg.n_clients - 1}] (got {short(client_id)})")
    else:
        clients = [int(client_id)]
    if cfg.n_bins == 0:
        if bins:
            raise ValueError("domain_latent_avg.bins: this factory has no slice bins (n_bins = 0)")
        bin_list: list[int | None] = [None]
    else:
        chosen = _middle_bins(cfg.n_bins) if bins is None else list(bins)
        if not chosen:
            raise ValueError("domain_latent_avg.bins: must not be empty")
        if not all(is_int(b) and 0 <= b < cfg.n_bins for b in chosen):
            raise ValueError(f"domain_latent_avg.bins: must be a list of integers in [0, {cfg.n_bins - 1}] (got {short(bins)})")
        bin_list = list(chosen)
    param = next(generator.parameters())
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(int(seed))).to(param.device, param.dtype)
    total = torch.zeros(cfg.w_dim, device=param.device, dtype=torch.float64)
    for c in clients:
        for b in bin_list:
            total += generator.mapping(z, c, b, None).double().mean(0)
    return (total / (len(clients) * len(bin_list))).to(param.dtype)


def latent_avgs(
    generator: Generator,
    client_ids: Sequence[int | None],
    n: int = 4096,
    bins: Sequence[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(len(client_ids), w_dim): `domain_latent_avg` per domain, e.g. ``[source_id, None]``."""
    return torch.stack([domain_latent_avg(generator, c, n=n, bins=bins, seed=seed) for c in client_ids])


# -- segmentation branch -------------------------------------------------------------------------


class SegmentationBranch(nn.Module):
    """Per-pixel classifier over the generator's feature maps -> logits (B, n_classes, R, R).

    ``feature_channels``: one entry per generator resolution 4..R (``FactoryConfig.channels``);
    ``class_names``: background first; ``factory``: {name, version, sha256} of the factory
    whose features it reads (recorded, not checked here)."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        resolution: int,
        class_names: Sequence[str],
        hidden: int = 128,
        mlp: int = 64,
        factory: Mapping[str, str] | None = None,
    ):
        super().__init__()
        fac = dict(factory) if factory is not None else {}
        if set(fac) <= set(FACTORY_KEYS):  # missing identity fields default to ""
            fac = {k: fac.get(k, "") for k in FACTORY_KEYS}
        self._config = check_model(
            BranchConfig,
            {
                "format": BRANCH_FORMAT,
                "version": 1,
                "class_names": list(class_names),
                "feature_channels": list(feature_channels),
                "resolution": resolution,
                "hidden": hidden,
                "mlp": mlp,
                "factory": fac,
            },
            "branch",
        ).to_dict()
        cfg = self._config
        self.resolution = cfg["resolution"]
        self.class_names = list(cfg["class_names"])
        self.n_classes = len(self.class_names)
        self.map_resolutions = tuple(2**i for i in range(2, int(math.log2(self.resolution)) + 1))
        self.feature_channels = tuple(cfg["feature_channels"])
        self.proj = nn.ModuleList(nn.Conv2d(c, cfg["hidden"], 1) for c in self.feature_channels)
        self.bn1 = nn.BatchNorm2d(cfg["hidden"])
        self.fc1 = nn.Conv2d(cfg["hidden"], cfg["mlp"], 1)
        self.bn2 = nn.BatchNorm2d(cfg["mlp"])
        self.fc2 = nn.Conv2d(cfg["mlp"], self.n_classes, 1)

    @classmethod
    def for_factory(
        cls,
        factory_cfg: FactoryConfig,
        class_names: Sequence[str],
        cfg: AdaptConfig | None = None,
        factory: Mapping[str, str] | None = None,
    ) -> "SegmentationBranch":
        """A branch for a factory's generator, widths from ``cfg`` (default tiny)."""
        cfg = cfg if cfg is not None else AdaptConfig()
        return cls(factory_cfg.channels, factory_cfg.resolution, class_names, cfg.branch_hidden, cfg.branch_mlp, factory)

    def config(self) -> dict[str, Any]:
        """JSON-able description; ``SegmentationBranch.from_config(b.config())`` rebuilds it."""
        return json.loads(json.dumps(self._config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SegmentationBranch":
        """Rebuild a branch from its `config` (checked as `BranchConfig`; the file format's own checks are in `branch_file`)."""
        cfg = check_model(BranchConfig, config, "branch").to_dict()
        return cls(cfg["feature_channels"], cfg["resolution"], cfg["class_names"], cfg["hidden"], cfg["mlp"], cfg["factory"])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: one (B, C_r, r, r) map per resolution 4..R -> logits (B, n_classes, R, R)."""
        if len(features) != len(self.proj):
            raise ValueError(f"features: expected {len(self.proj)} maps (resolutions 4..{self.resolution}) (got {len(features)})")
        size = (self.resolution, self.resolution)
        acc = None
        for i, (f, proj) in enumerate(zip(features, self.proj)):
            r, c = self.map_resolutions[i], self.feature_channels[i]
            if f.ndim != 4 or tuple(f.shape[1:]) != (c, r, r):
                raise ValueError(f"features[{i}]: expected shape (B, {c}, {r}, {r}) (got {tuple(f.shape)})")
            y = proj(f)
            if r != self.resolution:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            acc = y if acc is None else acc + y
        x = self.bn1(F.relu(acc))
        x = self.bn2(F.relu(self.fc1(x)))
        return self.fc2(x)


# The uploaded-branch file format moved to pipelines.adaptation.branch_file (it imports this
# module for SegmentationBranch, so its names are re-exported lazily, PEP 562).
_MOVED_TO_BRANCH_FILE = ("BRANCH_CONFIG_FILE", "BRANCH_WEIGHTS_FILE", "branch_files", "load_branch", "validate_branch_config", "validate_branch_files")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_BRANCH_FILE:
        return getattr(importlib.import_module("pipelines.adaptation.branch_file"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
