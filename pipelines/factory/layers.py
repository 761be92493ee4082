"""The data factory's building blocks: StyleGAN2's activation and normalisation, FIR resampling
as depthwise convolutions, and equalized learning-rate layers (pure PyTorch).

Shared by the generator, the discriminator and the adaptation branches; design:
docs/design/data-factory.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LRELU_GAIN",
    "LRELU_SLOPE",
    "Blur",
    "Downsample",
    "EqualConv2d",
    "EqualLinear",
    "PixelNorm",
    "Upsample",
    "blur2d",
    "blur_kernel",
    "count_parameters",
    "downsample2d",
    "lrelu",
    "pixel_norm",
    "requires_grad",
    "upsample2d",
]

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


# -- small helpers ---------------------------------------------------------------------------


def requires_grad(module: nn.Module, flag: bool) -> None:
    """Set ``requires_grad`` on every parameter of ``module``.

    Args:
        module: the module whose parameters change.
        flag: the new ``requires_grad`` value.
    """
    for p in module.parameters():
        p.requires_grad_(flag)


def count_parameters(module: nn.Module) -> int:
    """Count the scalar parameters of ``module``.

    Args:
        module: any module.

    Returns:
        The total number of elements of its parameters.
    """
    return sum(p.numel() for p in module.parameters())


def lrelu(x: torch.Tensor, gain: float = LRELU_GAIN) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times ``gain``, StyleGAN2's activation.

    Args:
        x: any tensor.
        gain: output scale (default sqrt(2), which keeps the activations' variance).

    Returns:
        The activated tensor, same shape as ``x``.
    """
    return F.leaky_relu(x, LRELU_SLOPE) * gain


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit mean square: x * rsqrt(mean(x^2) + eps) along ``dim``.

    Args:
        x: any tensor.
        dim: the axis that is normalised.
        eps: added to the mean square (exactly 0 out for x == 0).

    Returns:
        The normalised tensor, same shape as ``x``.
    """
    return x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + eps)


class PixelNorm(nn.Module):
    """`pixel_norm` as a module.

    Args:
        dim: the axis that is normalised.
        eps: added to the mean square.
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` along ``dim``.

        Args:
            x: any tensor.

        Returns:
            ``pixel_norm(x, dim, eps)``.
        """
        return pixel_norm(x, self.dim, self.eps)


# -- FIR resampling as depthwise convolutions -------------------------------------------------


def blur_kernel(taps: Sequence[float] = (1, 3, 3, 1), scale: float = 1.0) -> torch.Tensor:
    """Normalised separable 2D kernel (outer product of ``taps``), times ``scale``.

    Args:
        taps: the 1D filter taps.
        scale: the kernel's sum (4 for 2x upsampling, which inserts zeros).

    Returns:
        A (k, k) float32 kernel, k = len(taps).
    """
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * scale


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    return kernel.to(x.dtype)[None, None].expand(c, 1, *kernel.shape)


def blur2d(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Depthwise FIR filter: pad (before, after) on both spatial axes, then ``kernel``.

    Args:
        x: (B, C, H, W) images.
        kernel: (k, k) filter, applied to each channel.
        pad: zero padding before and after, on both spatial axes.

    Returns:
        (B, C, H + sum(pad) - k + 1, W + sum(pad) - k + 1) filtered images.
    """
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, (p0, p1, p0, p1))
    return F.conv2d(x, _depthwise(x, kernel), groups=x.shape[1])


def upsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zero insertion and blur, as one stride-2 transposed depthwise convolution.

    Args:
        x: (B, C, H, W) images.
        kernel: (k, k) filter already scaled by 4.

    Returns:
        (B, C, 2H, 2W) images for a 4-tap kernel.
    """
    k = kernel.shape[-1]
    # transposed conv pads (k - 1 - padding) on each side of the zero-inserted (2H - 1) signal;
    # upfirdn2d(up=2) pads (k//2, k//2 - 1) around the 2H signal whose last sample is a zero.
    return F.conv_transpose2d(x, _depthwise(x, kernel), stride=2, padding=k // 2 - 1, groups=x.shape[1])


def downsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x downsampling: blur (pad (k-2+1)//2, (k-2)//2) then keep every second sample.

    Args:
        x: (B, C, H, W) images.
        kernel: (k, k) filter.

    Returns:
        (B, C, H/2, W/2) images for even H and W.
    """
    p = kernel.shape[-1] - 2
    return blur2d(x, kernel, ((p + 1) // 2, p // 2))[:, :, ::2, ::2]


class Blur(nn.Module):
    """Depthwise [1,3,3,1] blur with explicit padding; the kernel is a non-persistent buffer.

    Args:
        pad: zero padding before and after, on both spatial axes.
        scale: the kernel's sum.
        taps: the 1D filter taps.
    """

    kernel: torch.Tensor

    def __init__(self, pad: tuple[int, int], scale: float = 1.0, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.pad = (int(pad[0]), int(pad[1]))
        self.register_buffer("kernel", blur_kernel(taps, scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur ``x`` (B, C, H, W); see `blur2d`."""
        return blur2d(x, self.kernel, self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (used for the skip images).

    Args:
        taps: the 1D filter taps.
    """

    kernel: torch.Tensor

    def __init__(self, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(taps, 4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W); see `upsample2d`."""
        return upsample2d(x, self.kernel)


class Downsample(nn.Module):
    """2x FIR downsampling.

    Args:
        taps: the 1D filter taps.
    """

    kernel: torch.Tensor

    def __init__(self, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(taps), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2); see `downsample2d`."""
        return downsample2d(x, self.kernel)


# -- equalized learning-rate layers -----------------------------------------------------------


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weight * lr_mul / sqrt(fan_in), bias * lr_mul.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a bias.
        bias_init: initial bias value.
        lr_mul: learning-rate multiplier (the weights are stored divided by it).
        activation: None or ``"lrelu"`` (`lrelu`).

    Raises:
        ValueError: an unknown ``activation``.
    """

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
        """Apply the layer.

        Args:
            x: (..., in_features).

        Returns:
            (..., out_features).
        """
        b = self.bias * self.lr_mul if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, b)
        return lrelu(x) if self.activation == "lrelu" else x

    def extra_repr(self) -> str:
        """The layer's settings, for ``repr``."""
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, lr_mul={self.lr_mul}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate; ``down=True`` blurs then convolves with stride 2.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel side.
        bias: whether the layer has a bias.
        activation: None or ``"lrelu"`` (`lrelu`).
        down: 2x downsampling (blur, then stride 2, no padding).

    Raises:
        ValueError: an unknown ``activation``.
    """

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
        self.blur: Blur | None
        if down:
            p = (4 - 2) + (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2, p // 2))
            self.stride, self.padding = 2, 0
        else:
            self.blur = None
            self.stride, self.padding = 1, kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: (B, in_channels, H, W).

        Returns:
            (B, out_channels, H, W), or (B, out_channels, H/2, W/2) with ``down``.
        """
        if self.blur is not None:
            x = self.blur(x)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, stride=self.stride, padding=self.padding)
        return lrelu(x) if self.activation == "lrelu" else x
