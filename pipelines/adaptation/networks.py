"""Phase-2 networks of the data-factory method: the W+ inversion encoder, and its use with the generator.

A site inverts its images into W+ of the FROZEN factory generator (`pipelines.factory.networks`)
with `InversionEncoder` (domain-specific batch norm, gated residual features injected into the
generator by `feature_hook`; `invert` does both) and reads the generator's feature maps with
`SegmentationBranch` (`pipelines.adaptation.branch`), a small per-pixel classifier. Pure
PyTorch. Their sizes: `pipelines.adaptation.config`; the branch's published file format:
`pipelines.adaptation.branch_file`. The names of those three modules stay importable from
here (their old home). Design, shapes and sizes: docs/design/adaptation-networks.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedimg_core.config import short
from pipelines.adaptation.branch import SegmentationBranch
from pipelines.adaptation.branch_file import (
    BRANCH_CONFIG_FILE,
    BRANCH_WEIGHTS_FILE,
    branch_files,
    load_branch,
    validate_branch_config,
    validate_branch_files,
)
from pipelines.adaptation.config import (
    ADAPT_PRESETS,
    BRANCH_FORMAT,
    FACTORY_KEYS,
    N_STAGES,
    AdaptConfig,
    BranchConfig,
    resolve_inject_resolutions,
    stage_resolutions,
)
from pipelines.adaptation.latents import domain_latent_avg, latent_avgs
from pipelines.config_fields import is_int
from pipelines.factory.networks import EqualLinear, FactoryConfig, Generator, count_parameters, pixel_norm, requires_grad

__all__ = [  # with the names re-exported from their new homes (config, branch, branch_file)
    "AdaptConfig",
    "ADAPT_PRESETS",
    "BRANCH_CONFIG_FILE",
    "BRANCH_WEIGHTS_FILE",
    "FACTORY_KEYS",
    "N_STAGES",
    "BranchConfig",
    "branch_files",
    "load_branch",
    "validate_branch_config",
    "validate_branch_files",
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
    """One BatchNorm2d per domain; ``forward(x, segments)`` normalises each contiguous run of a batch sorted by domain with that domain's BN.

    Args:
        num_features: the channels.
        n_domains: the domains (one BN each).
        running_stats: whether the BNs track running statistics (False: batch statistics in train and eval).
    """

    def __init__(self, num_features: int, n_domains: int, running_stats: bool = False) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features, track_running_stats=running_stats) for _ in range(n_domains))

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Normalise each domain's contiguous run of ``x`` with that domain's BN.

        Args:
            x: ``(B, C, H, W)``, sorted by domain.
            segments: ``[(domain, count), ...]``, the runs of ``x`` in order.

        Returns:
            The normalised batch, same shape.
        """
        if len(segments) == 1:
            single: torch.Tensor = self.bns[segments[0][0]](x)
            return single
        parts = torch.split(x, [n for _, n in segments])
        return torch.cat([self.bns[d](p) for (d, _), p in zip(segments, parts)])


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, n_domains: int, running: bool, stride: int = 1, act: bool = True) -> None:
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

    def __init__(self, cin: int, cout: int, stride: int, n_domains: int, running: bool) -> None:
        super().__init__()
        self.bn0 = DomainBatchNorm2d(cin, n_domains, running)
        self.conv1 = _ConvBN(cin, cout, n_domains, running)
        self.conv2 = _ConvBN(cout, cout, n_domains, running, stride=stride, act=False)
        self.short: nn.Conv2d | None = None
        self.short_bn: DomainBatchNorm2d | None = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.short_bn = DomainBatchNorm2d(cout, n_domains, running)

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        y: torch.Tensor = self.conv2(self.conv1(self.bn0(x, seg), seg), seg)
        s = self.short_bn(self.short(x), seg) if self.short is not None and self.short_bn is not None else x
        return y + s


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, n_domains: int, running: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ResBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, n_domains, running) for i in range(blocks))

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, seg)
        return x


class _ContentHead(nn.Module):
    """conv3x3 - DSBN - PReLU - conv3x3 - DSBN (same width)."""

    def __init__(self, channels: int, n_domains: int, running: bool) -> None:
        super().__init__()
        self.a = _ConvBN(channels, channels, n_domains, running)
        self.b = _ConvBN(channels, channels, n_domains, running, act=False)

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x, seg), seg)
        return out


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")


class GatedSkip(nn.Module):
    """Gated GRU-like skip (the authors' DynamicSkipLayer), one per injected resolution.

    ``forward(f, h) -> (mask, f_hat, new_state)``; ``mask`` in [0, 1) and ``f_hat`` have
    ``out_channels`` (the generator's channels at r).

    Args:
        state_channels: channels of the coarser state, or None for the root of the chain
            (then new_state = f and mask / f_hat come from f alone).
        channels: channels of the stage's content.
        out_channels: the generator's channels at this resolution.
    """

    def __init__(self, state_channels: int | None, channels: int, out_channels: int) -> None:
        super().__init__()
        self.root = state_channels is None
        self.trans: nn.Conv2d | None = None
        self.reset: nn.Conv2d | None = None
        if state_channels is None:
            cin = channels
        else:
            self.trans = _conv3(state_channels, channels)
            self.reset = _conv3(2 * channels, channels)
            cin = 2 * channels
        self.mask = _conv3(cin, out_channels)
        self.update = _conv3(cin, out_channels)

    def forward(self, f: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate the stage's content against the coarser state.

        Args:
            f: the stage's content ``(B, C, r, r)``.
            h: the coarser state ``(B, C_h, r/2, r/2)``; None at the root.

        Returns:
            ``(mask m, residual feature f_hat, new state)``.

        Raises:
            ValueError: a non-root skip without a coarser state.
        """
        if self.trans is None or self.reset is None:  # the root
            m = torch.tanh(F.relu(self.mask(f)))
            return m, self.update(f), f
        if h is None:
            raise ValueError("GatedSkip: a skip below the root needs the coarser state h")
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


Domain = int | Sequence[int] | torch.Tensor
"""A batch's domain: one index for every sample, or one per sample."""


def _domain_index(domain: Domain, batch: int, n_domains: int, device: torch.device) -> torch.Tensor:
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

    Args:
        factory_cfg: the factory whose generator it inverts.
        cfg: its sizes (default: the tiny preset).
        latent_avg: ``(n_domains, w_dim)`` per-domain mean w (see `latent_avgs`); None = zeros
            (load a state dict or call `set_latent_avg` later). It is a persistent buffer, so a
            saved encoder carries it.

    Raises:
        ValueError: the sizes do not fit the factory (`resolve_inject_resolutions`), or a bad ``latent_avg``.
    """

    latent_avg: torch.Tensor  # the registered buffer

    def __init__(self, factory_cfg: FactoryConfig, cfg: AdaptConfig | None = None, latent_avg: torch.Tensor | None = None) -> None:
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
        """Set the per-domain mean latents the W+ codes are offset by.

        Args:
            latent_avg: ``(n_domains, w_dim)`` finite floats.

        Raises:
            ValueError: another shape, dtype or non-finite values.
        """
        t = torch.as_tensor(latent_avg)
        if t.shape != (self.n_domains, self.w_dim) or not t.dtype.is_floating_point or not torch.isfinite(t).all():
            raise ValueError(f"latent_avg: expected a finite float tensor of shape ({self.n_domains}, {self.w_dim}) (got {tuple(t.shape)}, {t.dtype})")
        with torch.no_grad():
            self.latent_avg.copy_(t)

    def forward(self, x: torch.Tensor, domain: Domain) -> EncoderOutput:
        """Encode a batch under its domain(s).

        Args:
            x: ``(B, 1, R, R)`` in [-1, 1].
            domain: an int, or ``(B,)`` integers, in [0, n_domains).

        Returns:
            The W+ codes and the residual features.

        Raises:
            ValueError: a bad shape or domain.
        """
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
        inverse: torch.Tensor | None = None
        if len(segments) > 1 and bool((dom[1:] < dom[:-1]).any()):
            order = torch.argsort(dom, stable=True)
            inverse = torch.argsort(order)
            x, dom = x[order], dom[order]

        h = self.stem(x, segments)
        feats: list[torch.Tensor] = []
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
        state: torch.Tensor | None = None
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

    def feature_hook(self, out: EncoderOutput, feature_scale: float = 1.0) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The generator hook injecting ``out.residuals`` (see the module function `feature_hook`).

        Args:
            out: what `forward` returned.
            feature_scale: the injection strength in [0, 1].

        Returns:
            ``hook(resolution, x)``.
        """
        return feature_hook(out.residuals, feature_scale)

    def check_generator(self, generator: Generator) -> None:
        """Refuse a generator of another architecture than this encoder was built for.

        Args:
            generator: the generator to invert with.

        Raises:
            ValueError: resolution, channels or w_dim differ.
        """
        g, f = generator.cfg, self.factory_cfg
        if (g.resolution, tuple(g.channels), g.w_dim) != (f.resolution, tuple(f.channels), f.w_dim):
            raise ValueError(
                "encoder and generator do not match: encoder built for resolution "
                f"{f.resolution}, channels {list(f.channels)}, w_dim {f.w_dim}; generator has "
                f"{g.resolution}, {list(g.channels)}, {g.w_dim}"
            )


def _scale(feature_scale: object) -> float:
    if isinstance(feature_scale, (int, float)) and not isinstance(feature_scale, bool):
        value = float(feature_scale)
        if math.isfinite(value) and 0.0 <= value <= 1.0:
            return value
    raise ValueError(f"feature_scale: must be a number in [0, 1] (got {short(feature_scale)})")


def feature_hook(residuals: Mapping[int, Residual], feature_scale: float = 1.0) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The hook for ``Generator.synthesis(..., feature_hook=hook)`` that injects residual features.

    At each resolution in ``residuals``, ``x * (1 - s * m) + s * m * f_hat``; elsewhere (and
    for s = 0) x unchanged (the same tensor).

    Args:
        residuals: generator resolution -> residual feature and gate.
        feature_scale: the injection strength s in [0, 1].

    Returns:
        ``hook(resolution, x)``; it raises ValueError for a residual whose shape does not match x.

    Raises:
        ValueError: ``feature_scale`` is not a number in [0, 1].
    """
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
    domain: Domain,
    feature_scale: float = 1.0,
    noise_mode: str = "const",
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Encode ``x`` under ``domain`` (own: reconstruction, other: translation) and synthesise.

    Gradients reach the encoder through the generator whatever the generator's ``requires_grad``.

    Args:
        generator: the frozen factory generator.
        encoder: the inversion encoder.
        x: ``(B, 1, R, R)`` in [-1, 1].
        domain: the domain(s) to encode under.
        feature_scale: the injection strength in [0, 1].
        noise_mode: the generator's noise mode.

    Returns:
        ``(image (B, 1, R, R), features [one (B, C_r, r, r) per resolution 4..R, post
        injection], ws (B, num_ws, w_dim))``.

    Raises:
        ValueError: encoder and generator do not match, or a bad input.
    """
    encoder.check_generator(generator)
    out = encoder(x, domain)
    hook = feature_hook(out.residuals, feature_scale)
    img, features = generator.synthesis(out.ws, noise_mode=noise_mode, return_features=True, feature_hook=hook)
    return img, features, out.ws
