"""Conditional StyleGAN2-style generator and projection discriminator of the data factory (single channel, pure PyTorch).

Architecture, conditioning, resampling and measured sizes: docs/design/data-factory.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The configuration imports no torch (spec checks); its names stay importable from here.
from pipelines.factory.config import PRESETS, FactoryConfig, preset_values  # noqa: F401

__all__ = [
    "FactoryConfig",
    "PRESETS",
    "Generator",
    "Discriminator",
    "MappingNetwork",
    "SynthesisNetwork",
    "ConditionEmbedding",
    "EqualLinear",
    "EqualConv2d",
    "ModulatedConv2d",
    "Blur",
    "Upsample",
    "Downsample",
    "upsample2d",
    "downsample2d",
    "blur_kernel",
    "blur2d",
    "pixel_norm",
    "PixelNorm",
    "lrelu",
    "minibatch_stddev",
    "label_onehot",
    "requires_grad",
    "count_parameters",
]

NOISE_SEED = 1234
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


# -- small helpers ---------------------------------------------------------------------------


def requires_grad(module: nn.Module, flag: bool) -> None:
    """Set ``requires_grad`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(flag)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lrelu(x: torch.Tensor, gain: float = LRELU_GAIN) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times sqrt(2), StyleGAN2's activation."""
    return F.leaky_relu(x, LRELU_SLOPE) * gain


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) along ``dim``; exactly 0 for x == 0."""
    return x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + eps)


class PixelNorm(nn.Module):
    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x, self.dim, self.eps)


# -- FIR resampling as depthwise convolutions -------------------------------------------------


def blur_kernel(taps: Sequence[float] = (1, 3, 3, 1), scale: float = 1.0) -> torch.Tensor:
    """Normalised separable 2D kernel (outer product of ``taps``), times ``scale``: (k, k)."""
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * scale


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    return kernel.to(x.dtype)[None, None].expand(c, 1, *kernel.shape)


def blur2d(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Depthwise FIR filter: pad (before, after) on both spatial axes, then ``kernel``."""
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, (p0, p1, p0, p1))
    return F.conv2d(x, _depthwise(x, kernel), groups=x.shape[1])


def upsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zero insertion + blur with ``kernel`` (already scaled by 4), as one
    stride-2 transposed depthwise convolution. (B, C, H, W) -> (B, C, 2H, 2W) for a 4-tap kernel."""
    k = kernel.shape[-1]
    # transposed conv pads (k - 1 - padding) on each side of the zero-inserted (2H - 1) signal;
    # upfirdn2d(up=2) pads (k//2, k//2 - 1) around the 2H signal whose last sample is a zero.
    return F.conv_transpose2d(x, _depthwise(x, kernel), stride=2, padding=k // 2 - 1, groups=x.shape[1])


def downsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x downsampling: blur (pad (k-2+1)//2, (k-2)//2) then keep every second sample."""
    p = kernel.shape[-1] - 2
    return blur2d(x, kernel, ((p + 1) // 2, p // 2))[:, :, ::2, ::2]


class Blur(nn.Module):
    """Depthwise [1,3,3,1] blur with explicit padding; kernel in a non-persistent buffer."""

    def __init__(self, pad: tuple[int, int], scale: float = 1.0, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.pad = (int(pad[0]), int(pad[1]))
        self.register_buffer("kernel", blur_kernel(taps, scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur2d(x, self.kernel, self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (used for the skip images)."""

    def __init__(self, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(taps, 4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2d(x, self.kernel)


class Downsample(nn.Module):
    """2x FIR downsampling."""

    def __init__(self, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(taps), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample2d(x, self.kernel)


# -- equalized learning-rate layers -----------------------------------------------------------


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weight * lr_mul / sqrt(fan_in), bias * lr_mul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ):
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"activation must be None or 'lrelu' (got {activation!r})")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, b)
        return lrelu(x) if self.activation == "lrelu" else x

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, lr_mul={self.lr_mul}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate; ``down=True`` blurs then convolves with stride 2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str | None = "lrelu",
        down: bool = False,
    ):
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"activation must be None or 'lrelu' (got {activation!r})")
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation = activation
        self.down = down
        if down:
            p = (4 - 2) + (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2, p // 2))
            self.stride, self.padding = 2, 0
        else:
            self.blur = None
            self.stride, self.padding = 1, kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur is not None:
            x = self.blur(x)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, stride=self.stride, padding=self.padding)
        return lrelu(x) if self.activation == "lrelu" else x


# -- synthesis layers ---------------------------------------------------------------------------


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional demodulation and 2x upsampling.

    ``fused=True`` folds the per-sample styles into the weights and runs one grouped
    convolution over the batch (StyleGAN2's formulation); ``fused=False`` scales the
    activations instead (same result up to rounding; StyleGAN2-ADA also trains this way).
    ``fused=None`` (default) picks per call: fused for batch 1, activation scaling otherwise
    (measured on CPU: as fast or faster, and without oneDNN's per-shape warm-up for grouped
    convolutions whose weights change every call).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        up: bool = False,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate = demodulate
        self.up = up
        if up:
            # transposed conv (k = 3) gives 2H + 1; the blur (pad 1, 1) brings it back to 2H.
            p = (4 - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), scale=4.0)
        else:
            self.blur = None
        self.fused: bool | None = None  # None: automatic

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        styles = self.affine(w)  # (B, in)
        weight = self.weight * self.weight_gain
        fused = self.fused if self.fused is not None else b == 1
        if fused:
            wb = weight[None] * styles[:, None, :, None, None]  # (B, out, in, k, k)
            if self.demodulate:
                wb = wb * torch.rsqrt(wb.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
            h, wd = x.shape[2:]
            x = x.reshape(1, b * self.in_channels, h, wd)
            k = self.kernel_size
            if self.up:
                wt = wb.transpose(1, 2).reshape(b * self.in_channels, self.out_channels, k, k)
                x = F.conv_transpose2d(x, wt, stride=2, padding=0, groups=b)
            else:
                x = F.conv2d(x, wb.reshape(b * self.out_channels, self.in_channels, k, k), padding=k // 2, groups=b)
            x = x.reshape(b, self.out_channels, *x.shape[2:])
            if self.blur is not None:
                x = self.blur(x)
            return x
        x = x * styles[:, :, None, None]
        if self.up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0)
            x = self.blur(x)
        else:
            x = F.conv2d(x, weight, padding=self.kernel_size // 2)
        if self.demodulate:
            dcoefs = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)  # (B, out)
            x = x * dcoefs[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv -> noise * learned strength (init 0) -> bias -> lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.resolution = resolution
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise is not None:
            x = x + noise * self.noise_strength
        return lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 conv (no demodulation) to one channel, plus bias."""

    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 1, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class SynthesisBlock(nn.Module):
    """One resolution: (upsampling conv0,) conv1, ToRGB added to the upsampled skip image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, first: bool):
        super().__init__()
        self.resolution, self.first = resolution, first
        self.conv0 = None if first else SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels if not first else in_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim)
        self.upsample = None if first else Upsample()
        self.num_conv = 1 if first else 2

    def forward(self, x, img, ws: Sequence[torch.Tensor], noises: Sequence[torch.Tensor | None]):
        """``ws``: the num_conv + 1 style vectors (convs, then ToRGB); ``noises``: num_conv maps."""
        if self.conv0 is not None:
            x = self.conv0(x, ws[0], noises[0])
        x = self.conv1(x, ws[self.num_conv - 1], noises[self.num_conv - 1])
        rgb = self.torgb(x, ws[self.num_conv])
        img = rgb if img is None else self.upsample(img) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """Constant 4x4 input -> blocks at 4, 8, ..., resolution -> (B, 1, R, R).

    Style indices: block 4 uses ws[0] (conv) and ws[1] (ToRGB); block i >= 1 uses
    ws[2i - 1] (upsampling conv), ws[2i] (conv) and ws[2i + 1] (ToRGB), so the ToRGB of one
    block shares its index with the next block's first conv (StyleGAN2's layout):
    num_ws = 2 * number of blocks. One noise input per conv: num_noise = num_ws - 1.
    """

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        blocks = []
        for i, res in enumerate(cfg.resolutions):
            blocks.append(SynthesisBlock(ch[max(i - 1, 0)], ch[i], cfg.w_dim, res, first=(i == 0)))
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = 2 * len(blocks)
        self.noise_resolutions: list[int] = []
        for block in blocks:
            self.noise_resolutions += [block.resolution] * block.num_conv
        self.num_noise = len(self.noise_resolutions)
        gen = torch.Generator().manual_seed(NOISE_SEED)
        for j, res in enumerate(self.noise_resolutions):
            self.register_buffer(f"noise_const_{j}", torch.randn(1, 1, res, res, generator=gen), persistent=False)

    def noise_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        return [(batch, 1, r, r) for r in self.noise_resolutions]

    def const_noise(self) -> list[torch.Tensor]:
        return [getattr(self, f"noise_const_{j}") for j in range(self.num_noise)]

    def _noises(self, batch: int, like: torch.Tensor, noise_mode: str, noise) -> list[torch.Tensor | None]:
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none' (got {noise_mode!r})")
        if noise is not None:
            noise = list(noise)
            if len(noise) != self.num_noise:
                raise ValueError(f"noise: expected a list of {self.num_noise} tensors (got {len(noise)})")
        out: list[torch.Tensor | None] = []
        for j, res in enumerate(self.noise_resolutions):
            given = noise[j] if noise is not None else None
            if given is not None:
                if given.shape[-2:] != (res, res) or given.ndim != 4 or given.shape[1] != 1:
                    raise ValueError(f"noise[{j}]: expected shape (B or 1, 1, {res}, {res}) (got {tuple(given.shape)})")
                out.append(given.to(device=like.device, dtype=like.dtype))
            elif noise_mode == "random":
                out.append(torch.randn(batch, 1, res, res, device=like.device, dtype=like.dtype))
            elif noise_mode == "const":
                out.append(getattr(self, f"noise_const_{j}").to(like.dtype))
            else:
                out.append(None)
        return out

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        noise=None,
        return_features: bool = False,
        feature_hook=None,
    ):
        """``feature_hook(resolution, x) -> x``, when given, replaces each block's output feature
        (after that block's ToRGB, before the next block upsamples it); returned features are the
        hooked ones. None leaves the pass unchanged."""
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.cfg.w_dim:
            raise ValueError(f"ws: expected shape (B, {self.num_ws}, {self.cfg.w_dim}) (got {tuple(ws.shape)})")
        b = ws.shape[0]
        noises = self._noises(b, ws, noise_mode, noise)
        x = self.const[None].expand(b, -1, -1, -1).to(ws.dtype)
        img = None
        features = []
        wi = ni = 0
        for block in self.blocks:
            n = block.num_conv
            x, img = block(x, img, [ws[:, wi + k] for k in range(n + 1)], noises[ni : ni + n])
            wi += n
            ni += n
            if feature_hook is not None:
                hooked = feature_hook(block.resolution, x)
                if not isinstance(hooked, torch.Tensor) or hooked.shape != x.shape:
                    got = tuple(hooked.shape) if isinstance(hooked, torch.Tensor) else type(hooked).__name__
                    raise ValueError(f"feature_hook at resolution {block.resolution}: must return a tensor of shape {tuple(x.shape)} (got {got})")
                x = hooked
            features.append(x)
        return (img, features) if return_features else img


# -- conditioning and mapping ------------------------------------------------------------------


def _as_index(value, name: str, batch: int, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: must be integer(s) (got dtype {t.dtype})")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected an int or shape ({batch},) (got {tuple(t.shape)})")
    elif t.shape[0] == 1:
        t = t.expand(batch)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name}: values must be in [0, {n - 1}] (got {t.tolist()})")
    return t


def _batch_of(client_id, slice_bin, key, batch: int | None) -> int:
    sizes = set()
    for v in (client_id, slice_bin):
        if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] != 1:
            sizes.add(int(v.shape[0]))
        elif isinstance(v, (list, tuple)) and len(v) != 1:
            sizes.add(len(v))
    if isinstance(key, torch.Tensor) and key.ndim == 2 and key.shape[0] != 1:
        sizes.add(int(key.shape[0]))
    if batch is not None:
        sizes.add(int(batch))
    if len(sizes) > 1:
        raise ValueError(f"inconsistent batch sizes in client_id / slice_bin / key / z: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def label_onehot(client_id, slice_bin, batch: int, n_clients: int, n_bins: int, device) -> torch.Tensor:
    """onehot(client_id, n_clients) || onehot(slice_bin, n_bins) as (B, n_clients + n_bins) float.

    The bin part is zeros when ``n_bins == 0`` or ``slice_bin is None``."""
    ids = _as_index(client_id, "client_id", batch, n_clients, device)
    out = torch.zeros(batch, n_clients + n_bins, device=device)
    out[torch.arange(batch, device=device), ids] = 1.0
    if n_bins > 0 and slice_bin is not None:
        bins = _as_index(slice_bin, "slice_bin", batch, n_bins, device)
        out[torch.arange(batch, device=device), n_clients + bins] = 1.0
    return out


def _as_key(key, batch: int, key_dim: int, like: torch.Tensor) -> torch.Tensor | None:
    if key is None:
        return None
    if key_dim == 0:
        raise ValueError("key: this factory has no key conditioning (key_dim = 0); pass key=None")
    k = torch.as_tensor(key).to(device=like.device, dtype=like.dtype)
    given = tuple(k.shape)
    if k.ndim == 1:
        k = k[None]
    if k.ndim != 2 or k.shape[1] != key_dim or k.shape[0] not in (1, batch):
        raise ValueError(f"key: expected shape ({key_dim},) or ({batch}, {key_dim}) (got {given})")
    return k.expand(batch, key_dim)


class ConditionEmbedding(nn.Module):
    """condition = PixelNorm(key_mix * PixelNorm(MLP_no_bias(key)) + (1 - key_mix) * PixelNorm(Linear(label)))."""

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        self.cfg = cfg
        self.label_embed = EqualLinear(cfg.label_dim, cfg.w_dim, lr_mul=cfg.label_lr_mul)
        if cfg.key_dim > 0:
            self.key_embed = nn.Sequential(
                EqualLinear(cfg.key_dim, cfg.w_dim, bias=False, activation="lrelu"),
                EqualLinear(cfg.w_dim, cfg.w_dim, bias=False),
            )
        else:
            self.key_embed = None

    def forward(self, client_id, slice_bin=None, key=None, batch: int | None = None) -> torch.Tensor:
        cfg = self.cfg
        like = self.label_embed.weight
        b = _batch_of(client_id, slice_bin, key, batch)
        label = label_onehot(client_id, slice_bin, b, cfg.n_clients, cfg.n_bins, like.device).to(like.dtype)
        label_emb = pixel_norm(self.label_embed(label))
        k = _as_key(key, b, cfg.key_dim, like)
        key_emb = pixel_norm(self.key_embed(k)) if k is not None else torch.zeros_like(label_emb)
        return pixel_norm(cfg.key_mix * key_emb + (1.0 - cfg.key_mix) * label_emb)


class MappingNetwork(nn.Module):
    """[PixelNorm(z) || condition] -> mapping_layers equalized linear layers (lr_mul, lrelu) -> w."""

    def __init__(self, cfg: FactoryConfig):
        super().__init__()
        dims = [cfg.z_dim + cfg.w_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(EqualLinear(dims[i], dims[i + 1], lr_mul=cfg.mapping_lr_mul, activation="lrelu") for i in range(cfg.mapping_layers))

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pixel_norm(z), condition], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


# -- generator ------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Conditional StyleGAN2-style generator: (z, client_id, slice_bin, key) -> (B, 1, R, R)."""

    def __init__(self, cfg: FactoryConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else FactoryConfig()
        self.embed = ConditionEmbedding(self.cfg)
        self.mapping_network = MappingNetwork(self.cfg)
        self.synthesis_network = SynthesisNetwork(self.cfg)
        self.num_ws = self.synthesis_network.num_ws
        self.num_noise = self.synthesis_network.num_noise

    # conditioning / mapping

    def condition(self, client_id, slice_bin=None, key=None, *, batch: int | None = None) -> torch.Tensor:
        """The (B, w_dim) condition vector. ``client_id`` / ``slice_bin``: int or (B,) ints;
        ``key``: (key_dim,) or (B, key_dim). ``batch`` broadcasts scalars to a batch size."""
        return self.embed(client_id, slice_bin, key, batch=batch)

    def _map(self, z: torch.Tensor, cond: torch.Tensor, truncation_psi: float, w_avg: torch.Tensor | None):
        if z.ndim != 2 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.z_dim}) (got {tuple(z.shape)})")
        w = self.mapping_network(z.to(cond.dtype), cond)
        if truncation_psi != 1.0:
            w = w_avg + truncation_psi * (w - w_avg)
        return w

    def _w_avg(self, cond: torch.Tensor, truncation_psi: float, w_avg, n: int = 1024) -> torch.Tensor | None:
        if truncation_psi == 1.0:
            return None
        if w_avg is not None:
            return torch.as_tensor(w_avg, device=cond.device, dtype=cond.dtype)
        return self._mean_w_for(cond, n=n, seed=0)

    @torch.no_grad()
    def _mean_w_for(self, cond: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.z_dim, generator=gen).to(device=cond.device, dtype=cond.dtype)
        out = []
        for c in cond:  # one condition at a time keeps memory at n x w_dim
            out.append(self.mapping_network(z, c[None].expand(n, -1)).mean(0))
        return torch.stack(out)

    def mean_w(self, client_id, slice_bin=None, key=None, n: int = 1024, seed: int = 0, *, batch=None) -> torch.Tensor:
        """Per-condition average w over ``n`` seeded z: (B, w_dim), for truncation."""
        cond = self.condition(client_id, slice_bin, key, batch=batch).detach()
        return self._mean_w_for(cond, n=n, seed=seed)

    def mapping(
        self,
        z: torch.Tensor,
        client_id,
        slice_bin=None,
        key=None,
        truncation_psi: float = 1.0,
        w_avg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """w (B, w_dim). With ``truncation_psi != 1`` w is pulled towards ``w_avg`` (default: the
        per-condition ``mean_w``)."""
        cond = self.condition(client_id, slice_bin, key, batch=z.shape[0])
        return self._map(z, cond, truncation_psi, self._w_avg(cond, truncation_psi, w_avg))

    # synthesis

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        noise=None,
        return_features: bool = False,
        feature_hook=None,
    ):
        """ws (B, num_ws, w_dim) -> img (B, 1, R, R), or (img, features) with one feature map per
        resolution 4..R (channels ``cfg.channels``). ``noise``: list of ``num_noise`` tensors
        (B or 1, 1, r, r), entries None fall back to ``noise_mode``. ``feature_hook``: optional
        ``callable(resolution: int, x: Tensor) -> Tensor`` applied to each block's output feature
        (after its ToRGB, before the next block); the returned features are the hooked ones
        (phase-2 encoders inject their residual features this way)."""
        return self.synthesis_network(ws, noise_mode=noise_mode, noise=noise, return_features=return_features, feature_hook=feature_hook)

    def noise_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        return self.synthesis_network.noise_shapes(batch)

    def const_noise(self) -> list[torch.Tensor]:
        """The fixed noise maps used by ``noise_mode='const'`` (seeded with 1234), (1, 1, r, r)."""
        return self.synthesis_network.const_noise()

    # full pass

    def forward(
        self,
        z: torch.Tensor,
        client_id,
        slice_bin=None,
        key=None,
        noise_mode: str = "random",
        noise=None,
        mix_z: torch.Tensor | None = None,
        return_features: bool = False,
        return_ws: bool = False,
        truncation_psi: float = 1.0,
        w_avg: torch.Tensor | None = None,
    ):
        """img (B, 1, R, R); with ``return_ws`` and/or ``return_features`` a tuple
        ``(img, ws)``, ``(img, features)`` or ``(img, ws, features)``.

        In training mode, with probability ``style_mixing_prob`` (one draw from torch's global
        RNG per call), the styles from a random crossover index on come from a second latent
        (``mix_z`` or fresh ``randn``) with the same condition. Never in eval mode."""
        cond = self.condition(client_id, slice_bin, key, batch=z.shape[0])
        avg = self._w_avg(cond, truncation_psi, w_avg)
        w = self._map(z, cond, truncation_psi, avg)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        p = self.cfg.style_mixing_prob
        if self.training and p > 0 and self.num_ws > 1 and float(torch.rand(())) < p:
            cutoff = int(torch.randint(1, self.num_ws, ()))
            z2 = mix_z if mix_z is not None else torch.randn_like(z)
            w2 = self._map(z2, cond, truncation_psi, avg)
            ws = torch.cat([ws[:, :cutoff], w2[:, None].expand(-1, self.num_ws - cutoff, -1)], dim=1)
        out = self.synthesis(ws, noise_mode=noise_mode, noise=noise, return_features=return_features)
        img, features = out if return_features else (out, None)
        if not (return_ws or return_features):
            return img
        result = [img]
        if return_ws:
            result.append(ws)
        if return_features:
            result.append(features)
        return tuple(result)


# -- discriminator --------------------------------------------------------------------------------


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """Append the mean within-group standard deviation as ``num_channels`` extra channels.

    Group size min(group_size, B), reduced to the largest divisor of B when B is not a
    multiple (so any batch size works). Sample i belongs to group i mod (B / G)."""
    b, c, h, w = x.shape
    g = min(group_size, b)
    while b % g:
        g -= 1
    f = num_channels
    y = x.reshape(g, -1, f, c // f, h, w)
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + 1e-8).sqrt()
    y = y.mean(dim=(2, 3, 4))  # (B/G, F)
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """conv3x3 -> conv3x3 (blur, stride 2); skip: blur, 1x1 stride 2, no bias; sum / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=None, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x)
        x = self.conv1(self.conv0(x))
        return (x + y) * (1.0 / math.sqrt(2.0))


class Discriminator(nn.Module):
    """Residual projection discriminator: (img, client_id, slice_bin, key) -> score (B,).

    score = out(phi) + sum(phi * PixelNorm(E_label(label)) * key_mod, 1) / sqrt(cmap_dim),
    key_mod = 1 + Linear_no_bias(key) (1 when key is None), cmap_dim = w_dim."""

    def __init__(self, cfg: FactoryConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else FactoryConfig()
        cfg = self.cfg
        ch = {res: c for res, c in zip(cfg.resolutions, cfg.channels)}
        self.cmap_dim = cfg.w_dim
        self.from_rgb = EqualConv2d(1, ch[cfg.resolution], 1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(ch[res], ch[res // 2]) for res in reversed(cfg.resolutions[1:]))
        c4 = ch[4]
        self.conv = EqualConv2d(c4 + 1, c4, 3)
        self.fc = EqualLinear(c4 * 16, self.cmap_dim, activation="lrelu")
        self.out = EqualLinear(self.cmap_dim, 1) if cfg.d_unconditional else None
        self.label_embed = EqualLinear(cfg.label_dim, self.cmap_dim, lr_mul=cfg.label_lr_mul)
        self.key_embed = EqualLinear(cfg.key_dim, self.cmap_dim, bias=False) if cfg.key_dim > 0 else None

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """phi (B, cmap_dim): the unconditional image features."""
        r = self.cfg.resolution
        if img.ndim != 4 or img.shape[1:] != (1, r, r):
            raise ValueError(f"img: expected shape (B, 1, {r}, {r}) (got {tuple(img.shape)})")
        x = self.from_rgb(img)
        for block in self.blocks:
            x = block(x)
        x = minibatch_stddev(x, self.cfg.mbstd_group)
        x = self.conv(x)
        return self.fc(x.flatten(1))

    def forward(self, img: torch.Tensor, client_id, slice_bin=None, key=None) -> torch.Tensor:
        return self.score(self.features(img), client_id, slice_bin, key)

    def score(self, phi: torch.Tensor, client_id, slice_bin=None, key=None) -> torch.Tensor:
        """The score of images whose features are ``phi`` under a condition (one feature
        pass can be scored under several conditions)."""
        cfg = self.cfg
        b = _batch_of(client_id, slice_bin, key, phi.shape[0])
        like = self.label_embed.weight
        label = label_onehot(client_id, slice_bin, b, cfg.n_clients, cfg.n_bins, like.device).to(phi.dtype)
        cmap = pixel_norm(self.label_embed(label))
        k = _as_key(key, b, cfg.key_dim, phi)
        key_mod = 1.0 + self.key_embed(k) if k is not None else torch.ones_like(cmap)
        proj = (phi * cmap * key_mod).sum(dim=1) / math.sqrt(self.cmap_dim)
        return proj if self.out is None else self.out(phi).squeeze(1) + proj
