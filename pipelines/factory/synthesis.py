"""The data factory's synthesis network: style-modulated convolutions, noise and skip images from a
constant 4x4 input up to the image (single channel, pure PyTorch).

`pipelines.factory.generator` feeds it the styles; style and noise layout: docs/design/data-factory.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.factory.config import FactoryConfig
from pipelines.factory.layers import Blur, EqualLinear, Upsample, lrelu

__all__ = ["NOISE_SEED", "FeatureHook", "ModulatedConv2d", "NoiseInput", "SynthesisBlock", "SynthesisLayer", "SynthesisNetwork", "ToRGB"]

NOISE_SEED = 1234

# ``hook(resolution, x) -> x``: replaces a synthesis block's output feature.
FeatureHook = Callable[[int, torch.Tensor], torch.Tensor]
# Per-conv noise maps; None entries fall back to the noise mode.
NoiseInput = Sequence[torch.Tensor | None]


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional demodulation and 2x upsampling.

    ``fused=True`` folds the per-sample styles into the weights and runs one grouped
    convolution over the batch (StyleGAN2's formulation); ``fused=False`` scales the
    activations instead (same result up to rounding; StyleGAN2-ADA also trains this way).
    ``fused=None`` (default) picks per call: fused for batch 1, activation scaling otherwise
    (measured on CPU: as fast or faster, and without oneDNN's per-shape warm-up for grouped
    convolutions whose weights change every call).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel side.
        w_dim: style vector size.
        demodulate: normalise each output channel's weights per sample.
        up: 2x upsampling (transposed convolution, then blur).
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
        self.blur: Blur | None
        if up:
            # transposed conv (k = 3) gives 2H + 1; the blur (pad 1, 1) brings it back to 2H.
            p = (4 - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), scale=4.0)
        else:
            self.blur = None
        self.fused: bool | None = None  # None: automatic

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with weights modulated by the styles of ``w``.

        Args:
            x: (B, in_channels, H, W) features.
            w: (B, w_dim) style vectors.

        Returns:
            (B, out_channels, H, W), or (B, out_channels, 2H, 2W) with ``up``.
        """
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
            if self.blur is not None:  # always, with up
                x = self.blur(x)
        else:
            x = F.conv2d(x, weight, padding=self.kernel_size // 2)
        if self.demodulate:
            dcoefs = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)  # (B, out)
            x = x * dcoefs[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv -> noise * learned strength (init 0) -> bias -> lrelu.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        w_dim: style vector size.
        resolution: the output resolution.
        up: 2x upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.resolution = resolution
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: (B, in_channels, H, W) features.
            w: (B, w_dim) style vectors.
            noise: (B or 1, 1, resolution, resolution) noise, or None for none.

        Returns:
            (B, out_channels, resolution, resolution) features.
        """
        x = self.conv(x, w)
        if noise is not None:
            x = x + noise * self.noise_strength
        return lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 conv (no demodulation) to one channel, plus bias.

    Args:
        in_channels: input channels.
        w_dim: style vector size.
    """

    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 1, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Project features to an image.

        Args:
            x: (B, in_channels, H, W) features.
            w: (B, w_dim) style vectors.

        Returns:
            (B, 1, H, W).
        """
        out: torch.Tensor = self.conv(x, w) + self.bias[None, :, None, None]
        return out


class SynthesisBlock(nn.Module):
    """One resolution: (upsampling conv0,) conv1, ToRGB added to the upsampled skip image.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        w_dim: style vector size.
        resolution: the block's resolution.
        first: the 4x4 block (no upsampling conv, no skip image yet).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, first: bool):
        super().__init__()
        self.resolution, self.first = resolution, first
        self.conv0 = None if first else SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels if not first else in_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim)
        self.upsample = None if first else Upsample()
        self.num_conv = 1 if first else 2

    def forward(
        self, x: torch.Tensor, img: torch.Tensor | None, ws: Sequence[torch.Tensor], noises: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the block.

        Args:
            x: (B, C, r, r) features of the previous block (the constant for the first).
            img: the skip image so far, None for the first block.
            ws: the num_conv + 1 style vectors (convs, then ToRGB), each (B, w_dim).
            noises: num_conv noise maps (or None).

        Returns:
            The block's features and the skip image at its resolution.
        """
        if self.conv0 is not None:
            x = self.conv0(x, ws[0], noises[0])
        x = self.conv1(x, ws[self.num_conv - 1], noises[self.num_conv - 1])
        rgb = self.torgb(x, ws[self.num_conv])
        # img is None exactly for the first block, which has no upsample
        img = rgb if img is None or self.upsample is None else self.upsample(img) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """Constant 4x4 input -> blocks at 4, 8, ..., resolution -> (B, 1, R, R).

    Style indices: block 4 uses ws[0] (conv) and ws[1] (ToRGB); block i >= 1 uses
    ws[2i - 1] (upsampling conv), ws[2i] (conv) and ws[2i + 1] (ToRGB), so the ToRGB of one
    block shares its index with the next block's first conv (StyleGAN2's layout):
    num_ws = 2 * number of blocks. One noise input per conv: num_noise = num_ws - 1.

    Args:
        cfg: the factory configuration (resolutions, channels, ``w_dim``).
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
        """The shapes of the ``num_noise`` noise inputs.

        Args:
            batch: B.

        Returns:
            One (B, 1, r, r) shape per conv.
        """
        return [(batch, 1, r, r) for r in self.noise_resolutions]

    def const_noise(self) -> list[torch.Tensor]:
        """The fixed noise maps of ``noise_mode='const'`` (seeded with `NOISE_SEED`), each (1, 1, r, r)."""
        return [getattr(self, f"noise_const_{j}") for j in range(self.num_noise)]

    def _noises(self, batch: int, like: torch.Tensor, noise_mode: str, noise: NoiseInput | None) -> list[torch.Tensor | None]:
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
        noise: NoiseInput | None = None,
        return_features: bool = False,
        feature_hook: FeatureHook | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Synthesise images from styles.

        Args:
            ws: (B, num_ws, w_dim) styles.
            noise_mode: ``"random"``, ``"const"`` (`const_noise`) or ``"none"``.
            noise: ``num_noise`` noise maps (B or 1, 1, r, r); None entries fall back to ``noise_mode``.
            return_features: also return each block's output feature.
            feature_hook: ``hook(resolution, x) -> x``, when given, replaces each block's output
                feature (after that block's ToRGB, before the next block upsamples it); returned
                features are the hooked ones. None leaves the pass unchanged.

        Returns:
            img (B, 1, R, R), or (img, features) with ``return_features``.

        Raises:
            ValueError: misshapen ``ws`` or noise, an unknown ``noise_mode``, or a hook that
                changes a feature's shape.
        """
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.cfg.w_dim:
            raise ValueError(f"ws: expected shape (B, {self.num_ws}, {self.cfg.w_dim}) (got {tuple(ws.shape)})")
        b = ws.shape[0]
        noises = self._noises(b, ws, noise_mode, noise)
        x = self.const[None].expand(b, -1, -1, -1).to(ws.dtype)
        img: torch.Tensor | None = None
        features = []
        wi = ni = 0
        for block in cast("Iterable[SynthesisBlock]", self.blocks):
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
        assert img is not None  # there is always a 4x4 block
        return (img, features) if return_features else img
