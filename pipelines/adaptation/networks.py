"""Phase-2 networks of the data-factory method: W+ inversion encoder and segmentation branch.

(shared/notes/data-factory-method.md, "Phase 2"; the paper's section 3.2.) A site inverts its
images into W+ of the FROZEN factory generator ``G`` (pipelines/factory/networks.py) and reads
the generator's feature maps with a small per-pixel classifier. Pure PyTorch.

``InversionEncoder`` (a feature-style / pSp-like encoder with domain-specific batch norm)::

    x (B, 1, R, R) in [-1, 1], domain d (int or (B,) long)
    stem   conv3x3 (stride ``stem_stride``) - DSBN - PReLU
    stage k = 1..4: residual blocks (iResNet style: DSBN - conv3x3 - DSBN - PReLU - conv3x3
           (stride 2 in the first block) - DSBN, 1x1 stride-2 DSBN shortcut), resolutions
           R / (stem_stride * 2^k)
    W+     each stage avg-pooled to P x P, concatenated, one linear map per style (one
           nn.Linear to num_ws * w_dim, which is the same function as num_ws separate ones):
           ws = codes * PixelNorm_per_style(EqualLinear(onehot(d))) + latent_avg[d]
    residual features, coarse to fine over the stages at ``inject_resolutions`` (plus the
           next coarser stage, if any, as the initial state): a content head per stage
           (conv3x3 - DSBN - PReLU - conv3x3 - DSBN) and a gated GRU-like skip
               state  = lrelu(trans(up2(h)))           r = sigmoid(reset([state, f]))
               h'     = r * state                      m = tanh(relu(mask([state, f])))
               f_hat  = update([h', f])                (C_G(res) channels, as the generator)
           (the coarsest stage without a coarser state: h' = f, m and f_hat from f alone).
           Content heads and states keep the stage's width; only m and f_hat have the
           generator's width (the authors' heads output the generator width directly: that
           would put the tiny encoder well above 0.5M parameters).
    The style modulation is PixelNorm'ed per style (w_dim entries); the authors normalise the
    whole num_ws * w_dim vector. Either way its scale per style is free to be learnt by the
    codes.

Injection (``feature_hook``): at each injected resolution r the generator block's output
feature x becomes ``x * (1 - s * m) + s * m * f_hat`` with ``s = feature_scale`` in [0, 1]
(ramped by the trainer), after that block's ToRGB and before the next block upsamples it
(so the image changes through the following blocks; the returned features are post-injection).

The same encoder reconstructs (``domain`` = the image's own domain) and translates (the other
domain): flipping the domain switches the DSBN layers, the style modulation and latent_avg.

Domain-specific batch norm keeps one BatchNorm2d per domain; a batch with mixed domains is
sorted by domain once (stable), each DSBN layer normalises each domain's contiguous run with
its own BN, and the outputs are put back in the caller's order. Statistics: batch statistics
in training AND evaluation by default (``bn_running_stats=False``, as the authors:
track_running_stats=False). Reason: translation runs an image of domain t through the BN of
domain s; with running statistics it would be normalised with the other domain's intensity
statistics (off-distribution features), and the translation passes of training would pollute
the other domain's running averages. With batch statistics only the learned affine of the
domain changes, which is what the switch should do. The cost: an output depends on the other
images of the same domain in the batch (also in eval). ``bn_running_stats=True`` gives
ordinary running-statistics BN (batch-independent evaluation) for those who prefer it.

``SegmentationBranch`` (DatasetGAN-style pixel classifier) reads every generator feature map:
per map a 1x1 conv to ``hidden`` channels, bilinear upsampling to R, sum, then ReLU - BN -
1x1 (``mlp``) - ReLU - BN - 1x1 (n_classes): LOGITS (B, n_classes, R, R). It is rebuilt from a
JSON config plus a tensor state dict (``load_branch``, ``validate_branch_files``), which is how
a site publishes it ("only weights, by construction").

Sizes (``count_parameters``, measured with the factory preset of the same name, n_domains 2;
the branch with 2 classes)::

    preset  encoder channels     blocks        P  inject             encoder       branch
    tiny    16, 16, 32, 32       1, 1, 1, 1    2  8, 16                483,632        9,090
    paper   64, 128, 256, 512    3, 4, 14, 3   3  16, 32, 64, 128  123,352,704      394,818

(the paper encoder is dominated by its W+ head, 960 * 9 -> 16 * 512 = 70.8M, as the
authors'.) CPU cost (2 threads): one tiny encoder + synthesis forward/backward at batch 8
~0.06-0.08 s on an idle machine (tests/test_adaptation_networks.py::test_timing_tiny prints it).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.factory.networks import (
    EqualLinear,
    FactoryConfig,
    Generator,
    count_parameters,
    pixel_norm,
    preset_values,
    requires_grad,
)

__all__ = [
    "AdaptConfig",
    "ADAPT_PRESETS",
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
    "validate_branch_config",
    "load_branch",
    "branch_files",
    "validate_branch_files",
    "BRANCH_CONFIG_FILE",
    "BRANCH_WEIGHTS_FILE",
    "BRANCH_FORMAT",
    "requires_grad",
    "count_parameters",
]

N_STAGES = 4


# -- validation helpers ------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(where: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{where}.{key}: must be an integer {bound} (got {_fmt(value)})")
    return int(value)


def _int_list(where: str, key: str, value: Any, length: int | None, low: int, high: int | None = None) -> tuple[int, ...]:
    what = f"a list of {length} integers" if length is not None else "a list of integers"
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{where}.{key}: must be {what} {bound} (got {_fmt(value)})")
    if length is not None and len(value) != length:
        raise ValueError(f"{where}.{key}: must be {what} {bound} (got {len(value)} entries: {_fmt(value)})")
    for v in value:
        if not _is_int(v) or v < low or (high is not None and v > high):
            raise ValueError(f"{where}.{key}: must be {what} {bound} (got {_fmt(value)})")
    return tuple(int(v) for v in value)


# -- configuration -------------------------------------------------------------------------------

ADAPT_PRESETS: dict[str, dict[str, Any]] = {
    # for FactoryConfig "tiny" (64 px): encoder < 0.5M parameters, CPU friendly
    "tiny": {},
    # for FactoryConfig "paper" (512 px): the authors' widths (iResNet-50 stages, 3x3 pooling,
    # stride-2 stem so that the stages sit at 128..16 as theirs do for a 256 input)
    "paper": {
        "encoder_channels": (64, 128, 256, 512),
        "encoder_blocks": (3, 4, 14, 3),
        "stem_channels": 64,
        "stem_stride": 2,
        "pool_size": 3,
        "branch_hidden": 128,
        "branch_mlp": 64,
    },
}


def _check_adapt(values: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["encoder_channels"] = _int_list(where, "encoder_channels", values["encoder_channels"], N_STAGES, 1, 4096)
    out["encoder_blocks"] = _int_list(where, "encoder_blocks", values["encoder_blocks"], N_STAGES, 1, 64)
    out["stem_channels"] = _int(where, "stem_channels", values["stem_channels"], 1, 4096)
    stride = values["stem_stride"]
    if not _is_int(stride) or stride not in (1, 2):
        raise ValueError(f"{where}.stem_stride: must be 1 or 2 (got {_fmt(stride)})")
    out["stem_stride"] = int(stride)
    out["pool_size"] = _int(where, "pool_size", values["pool_size"], 1, 16)
    inject = values["inject_resolutions"]
    if inject is not None:
        inject = _int_list(where, "inject_resolutions", inject, None, 4)
        if any(r & (r - 1) for r in inject) or len(set(inject)) != len(inject):
            raise ValueError(
                f"{where}.inject_resolutions: must be distinct powers of two >= 4, or null for automatic "
                f"(got {_fmt(list(inject))})"
            )
        inject = tuple(sorted(inject))
    out["inject_resolutions"] = inject
    out["branch_hidden"] = _int(where, "branch_hidden", values["branch_hidden"], 1, 1024)
    out["branch_mlp"] = _int(where, "branch_mlp", values["branch_mlp"], 1, 1024)
    out["n_domains"] = _int(where, "n_domains", values["n_domains"], 1, 64)
    bn = values["bn_running_stats"]
    if not isinstance(bn, bool):
        raise ValueError(f"{where}.bn_running_stats: must be true or false (got {_fmt(bn)})")
    out["bn_running_stats"] = bn
    return out


@dataclass(frozen=True)
class AdaptConfig:
    """Sizes of the phase-2 encoder and segmentation branch (validated on construction).

    Whether the sizes fit a given factory (inject resolutions, minimum resolution) is checked
    when an `InversionEncoder` is built (`resolve_inject_resolutions`)."""

    encoder_channels: tuple[int, ...] = (16, 16, 32, 32)  # per stage, fine to coarse
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 1)  # residual blocks per stage
    stem_channels: int = 16
    stem_stride: int = 1  # 1: stages at R/2..R/16; 2: R/4..R/32
    pool_size: int = 2  # W+ head: each stage average-pooled to pool_size x pool_size
    inject_resolutions: tuple[int, ...] | None = None  # None: automatic (R/32..R/4, >= 8); (): none
    branch_hidden: int = 32  # per-map 1x1 projection width
    branch_mlp: int = 32  # width of the branch's middle 1x1 layer
    n_domains: int = 2  # 0 = source, 1 = target
    bn_running_stats: bool = False  # False: DSBN uses batch statistics in train and eval

    def __post_init__(self) -> None:
        checked = _check_adapt({f.name: getattr(self, f.name) for f in fields(self)}, "adaptation")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AdaptConfig":
        """A named preset ("tiny", "paper") with field overrides."""
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "adaptation") -> "AdaptConfig":
        """Build from a plain dict (YAML/JSON): optional ``preset`` plus field overrides; errors
        name ``{where}.{key}``."""
        return cls(**_check_adapt(preset_values(cls, raw, where, ADAPT_PRESETS, "adaptation network settings"), where))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field; ``AdaptConfig.from_dict(cfg.to_dict()) == cfg``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("encoder_channels", "encoder_blocks", "inject_resolutions"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


def stage_resolutions(factory_cfg: FactoryConfig, cfg: AdaptConfig) -> tuple[int, ...]:
    """Spatial size of the four encoder stages, fine to coarse: R / (stem_stride * 2^k)."""
    r = factory_cfg.resolution
    return tuple(r // (cfg.stem_stride * 2**k) for k in range(1, N_STAGES + 1))


def resolve_inject_resolutions(factory_cfg: FactoryConfig, cfg: AdaptConfig) -> tuple[int, ...]:
    """The generator resolutions that receive residual features, ascending.

    Automatic (``inject_resolutions`` None): the stage resolutions within [R/32, R/4] and >= 8
    (R=512: 16, 32, 64, 128 as the authors; R=64: 8, 16). Explicit lists must be consecutive
    stage resolutions that are also generator resolutions. Raises ValueError."""
    r = factory_cfg.resolution
    stages = stage_resolutions(factory_cfg, cfg)
    if stages[-1] < 2:
        raise ValueError(
            f"adaptation: factory resolution {r} is too small for this encoder (stem_stride "
            f"{cfg.stem_stride}: the coarsest stage would be {stages[-1]} px; needs >= 2)"
        )
    gen = set(factory_cfg.resolutions)
    if cfg.inject_resolutions is None:
        return tuple(sorted(s for s in stages if r // 32 <= s <= r // 4 and s >= 8 and s in gen))
    inject = tuple(sorted(cfg.inject_resolutions))
    for res in inject:
        if res not in stages or res not in gen:
            raise ValueError(
                f"adaptation.inject_resolutions: {res} is not available (encoder stages at "
                f"{', '.join(map(str, stages))} px; generator resolutions 4..{r})"
            )
    for lo, hi in zip(inject, inject[1:]):
        if hi != 2 * lo:
            raise ValueError(
                f"adaptation.inject_resolutions: must be consecutive resolutions (got {list(inject)})"
            )
    return inject


# -- domain-specific batch norm -----------------------------------------------------------------

Segments = list[tuple[int, int]]  # (domain, count) runs of a batch sorted by domain


class DomainBatchNorm2d(nn.Module):
    """One BatchNorm2d per domain; ``forward(x, segments)`` normalises each contiguous run of
    ``segments`` = [(domain, count), ...] with that domain's BN (x sorted by domain)."""

    def __init__(self, num_features: int, n_domains: int, running_stats: bool = False):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm2d(num_features, track_running_stats=running_stats) for _ in range(n_domains)
        )

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
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
        self.blocks = nn.ModuleList(
            _ResBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, n_domains, running) for i in range(blocks)
        )

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
    feature: torch.Tensor  # f_hat (B, C_G(r), r, r)
    mask: torch.Tensor  # m in [0, 1), same shape


class EncoderOutput(NamedTuple):
    ws: torch.Tensor  # (B, num_ws, w_dim)
    residuals: dict[int, Residual]  # generator resolution -> residual feature (empty: none)


def _domain_index(domain, batch: int, n_domains: int, device) -> torch.Tensor:
    if isinstance(domain, torch.Tensor):
        t = domain.to(device)
    elif _is_int(domain):
        t = torch.tensor(domain, device=device)
    elif isinstance(domain, Sequence) and not isinstance(domain, (str, bytes)) and all(_is_int(v) for v in domain):
        t = torch.tensor(list(domain), device=device, dtype=torch.long)
    else:
        raise ValueError(f"domain: must be an int or a (B,) integer tensor (got {_fmt(domain)})")
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
        t = torch.as_tensor(latent_avg)
        if t.shape != (self.n_domains, self.w_dim) or not t.dtype.is_floating_point or not torch.isfinite(t).all():
            raise ValueError(
                f"latent_avg: expected a finite float tensor of shape ({self.n_domains}, {self.w_dim}) "
                f"(got {tuple(t.shape)}, {t.dtype})"
            )
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
        raise ValueError(f"feature_scale: must be a number in [0, 1] (got {_fmt(feature_scale)})")
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
            raise ValueError(
                f"residual feature at resolution {resolution}: shape {tuple(f_hat.shape)} does not match "
                f"the generator feature {tuple(x.shape)}"
            )
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
    n = _int("domain_latent_avg", "n", n, 1)
    if client_id is None:
        clients = list(range(cfg.n_clients))
    else:
        clients = [_int("domain_latent_avg", "client_id", client_id, 0, cfg.n_clients - 1)]
    if cfg.n_bins == 0:
        if bins:
            raise ValueError("domain_latent_avg.bins: this factory has no slice bins (n_bins = 0)")
        bin_list: list[int | None] = [None]
    else:
        chosen = _middle_bins(cfg.n_bins) if bins is None else _int_list("domain_latent_avg", "bins", bins, None, 0, cfg.n_bins - 1)
        if not chosen:
            raise ValueError("domain_latent_avg.bins: must not be empty")
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

BRANCH_FORMAT = "fedimg-segmentation-branch"
BRANCH_CONFIG_FILE = "branch.json"
BRANCH_WEIGHTS_FILE = "branch.pt"
_BRANCH_KEYS = ("format", "version", "class_names", "feature_channels", "resolution", "hidden", "mlp", "factory")
_FACTORY_KEYS = ("name", "version", "sha256")
_MAX_STR = 256


def validate_branch_config(config: Any, where: str = "branch") -> dict[str, Any]:
    """Check a branch config (every key, type and range); returns a normalised copy.
    Raises ValueError naming the offending key."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: must be a JSON object (got {type(config).__name__})")
    keys = set(config)
    extra = sorted(map(str, keys - set(_BRANCH_KEYS)))
    missing = [k for k in _BRANCH_KEYS if k not in keys]
    if extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(_BRANCH_KEYS)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    if config["format"] != BRANCH_FORMAT:
        raise ValueError(f"{where}.format: must be {BRANCH_FORMAT!r} (got {_fmt(config['format'])})")
    if not _is_int(config["version"]) or config["version"] != 1:
        raise ValueError(f"{where}.version: must be 1 (got {_fmt(config['version'])})")
    names = config["class_names"]
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not 2 <= len(names) <= 64:
        raise ValueError(f"{where}.class_names: must be a list of 2..64 class names, background first (got {_fmt(names)})")
    for name in names:
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ValueError(f"{where}.class_names: every name must be a non-empty string of <= 64 characters (got {_fmt(name)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}.class_names: names must be unique (got {_fmt(list(names))})")
    res = config["resolution"]
    if not _is_int(res) or not 8 <= res <= 1024 or res & (res - 1):
        raise ValueError(f"{where}.resolution: must be a power of two in [8, 1024] (got {_fmt(res)})")
    n_maps = int(math.log2(res)) - 1
    channels = _int_list(where, "feature_channels", config["feature_channels"], n_maps, 1, 4096)
    hidden = _int(where, "hidden", config["hidden"], 1, 1024)
    mlp = _int(where, "mlp", config["mlp"], 1, 1024)
    factory = config["factory"]
    if not isinstance(factory, Mapping) or set(factory) != set(_FACTORY_KEYS):
        got = sorted(map(str, factory)) if isinstance(factory, Mapping) else type(factory).__name__
        raise ValueError(f"{where}.factory: must be an object with exactly the keys {', '.join(_FACTORY_KEYS)} (got {got})")
    for key in _FACTORY_KEYS:
        v = factory[key]
        if not isinstance(v, str) or len(v) > _MAX_STR:
            raise ValueError(f"{where}.factory.{key}: must be a string of <= {_MAX_STR} characters (got {_fmt(v)})")
    return {
        "format": BRANCH_FORMAT,
        "version": 1,
        "class_names": [str(n) for n in names],
        "feature_channels": list(channels),
        "resolution": int(res),
        "hidden": hidden,
        "mlp": mlp,
        "factory": {k: str(factory[k]) for k in _FACTORY_KEYS},
    }


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
        if set(fac) <= set(_FACTORY_KEYS):  # missing identity fields default to ""
            fac = {k: fac.get(k, "") for k in _FACTORY_KEYS}
        self._config = validate_branch_config(
            {
                "format": BRANCH_FORMAT,
                "version": 1,
                "class_names": list(class_names),
                "feature_channels": list(feature_channels),
                "resolution": resolution,
                "hidden": hidden,
                "mlp": mlp,
                "factory": fac,
            }
        )
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
        cfg = validate_branch_config(config)
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


def load_branch(config: Mapping[str, Any], state: Mapping[str, Any]) -> SegmentationBranch:
    """Rebuild a published branch from its config and tensor state dict, refusing anything but
    exactly the expected weights (ValueError naming the problem). Returned in eval mode."""
    branch = SegmentationBranch.from_config(config)
    if not isinstance(state, Mapping):
        raise ValueError(f"branch weights: must be a mapping of names to tensors (got {type(state).__name__})")
    expected = branch.state_dict()
    keys = set(state)
    bad_names = [k for k in keys if not isinstance(k, str)]
    if bad_names:
        raise ValueError(f"branch weights: non-string key(s) {_fmt(bad_names)}")
    extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
    if extra:
        raise ValueError(f"branch weights: unexpected key(s) {', '.join(extra[:10])}")
    if missing:
        raise ValueError(f"branch weights: missing key(s) {', '.join(missing[:10])}")
    clean: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"branch weights: {name} is not a tensor (got {type(t).__name__})")
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise ValueError(f"branch weights: {name} must be a dense tensor (got layout {t.layout})")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"branch weights: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if ref.dtype.is_floating_point:
            if not t.dtype.is_floating_point:
                raise ValueError(f"branch weights: {name} must be floating point (got {t.dtype})")
            if not torch.isfinite(t).all():
                raise ValueError(f"branch weights: {name} has non-finite values")
            if name.endswith("running_var") and bool((t < 0).any()):
                raise ValueError(f"branch weights: {name} has negative variances")
        else:
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"branch weights: {name} must be an integer tensor (got {t.dtype})")
            if bool((t < 0).any()):
                raise ValueError(f"branch weights: {name} must be >= 0")
        clean[name] = t.detach().to("cpu", ref.dtype)
    branch.load_state_dict(clean, strict=True)
    return branch.eval()


def branch_files(branch: SegmentationBranch) -> dict[str, bytes]:
    """{"branch.json": config (UTF-8 JSON), "branch.pt": state dict, CPU tensors only}."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().clone().contiguous() for k, v in branch.state_dict().items()}, buf)
    text = json.dumps(branch.config(), indent=2, sort_keys=True) + "\n"
    return {BRANCH_CONFIG_FILE: text.encode("utf-8"), BRANCH_WEIGHTS_FILE: buf.getvalue()}


_MAX_CONFIG_BYTES = 1 << 20


def validate_branch_files(files: Mapping[str, bytes]) -> SegmentationBranch:
    """Check a published branch: exactly branch.json + branch.pt, the JSON a valid config,
    the weights a weights-only torch file matching it (`load_branch`). Returns the branch (eval
    mode); raises ValueError naming the file and the problem."""
    if not isinstance(files, Mapping):
        raise ValueError(f"branch files: must map file names to bytes (got {type(files).__name__})")
    expected = {BRANCH_CONFIG_FILE, BRANCH_WEIGHTS_FILE}
    names = set(files)
    if names != expected:
        extra = sorted(map(str, names - expected))
        missing = sorted(expected - names)
        parts = ([f"unexpected {', '.join(extra)}"] if extra else []) + ([f"missing {', '.join(missing)}"] if missing else [])
        raise ValueError(f"branch files: expected exactly {BRANCH_CONFIG_FILE} and {BRANCH_WEIGHTS_FILE} ({'; '.join(parts)})")
    for name in sorted(expected):
        if not isinstance(files[name], (bytes, bytearray, memoryview)):
            raise ValueError(f"{name}: must be bytes (got {type(files[name]).__name__})")
    raw = bytes(files[BRANCH_CONFIG_FILE])
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{BRANCH_CONFIG_FILE}: too large ({len(raw)} bytes)")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{BRANCH_CONFIG_FILE}: not valid UTF-8 JSON ({exc})") from None
    validate_branch_config(config, where=BRANCH_CONFIG_FILE)
    try:
        state = torch.load(io.BytesIO(bytes(files[BRANCH_WEIGHTS_FILE])), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{BRANCH_WEIGHTS_FILE}: not a weights-only torch file ({first})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{BRANCH_WEIGHTS_FILE}: must hold a dict of tensors (got {type(state).__name__})")
    try:
        return load_branch(config, state)
    except ValueError as exc:
        raise ValueError(f"{BRANCH_WEIGHTS_FILE}: {exc}") from None
