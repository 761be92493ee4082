"""The data factory's residual projection discriminator: image features, then a score under a
condition (client id, slice bin, domain key); single channel, pure PyTorch.

Architecture and projection: docs/design/data-factory.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.factory.conditioning import IndexLike, KeyLike, as_key, batch_of, label_onehot
from pipelines.factory.config import FactoryConfig
from pipelines.factory.layers import EqualConv2d, EqualLinear, pixel_norm

__all__ = ["Discriminator", "DiscriminatorBlock", "minibatch_stddev"]


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """Append the mean within-group standard deviation as ``num_channels`` extra channels.

    Group size min(group_size, B), reduced to the largest divisor of B when B is not a
    multiple (so any batch size works). Sample i belongs to group i mod (B / G).

    Args:
        x: (B, C, H, W) features, C divisible by ``num_channels``.
        group_size: the largest group size.
        num_channels: number of statistics channels (channel groups).

    Returns:
        (B, C + num_channels, H, W).
    """
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
    """conv3x3 -> conv3x3 (blur, stride 2); skip: blur, 1x1 stride 2, no bias; sum / sqrt(2).

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=None, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution.

        Args:
            x: (B, in_channels, H, W) features.

        Returns:
            (B, out_channels, H/2, W/2) features.
        """
        y: torch.Tensor = self.skip(x)
        x = self.conv1(self.conv0(x))
        return (x + y) * (1.0 / math.sqrt(2.0))


class Discriminator(nn.Module):
    """Residual projection discriminator: (img, client_id, slice_bin, key) -> score (B,).

    score = out(phi) + sum(phi * PixelNorm(E_label(label)) * key_mod, 1) / sqrt(cmap_dim),
    key_mod = 1 + Linear_no_bias(key) (1 when key is None), cmap_dim = w_dim.

    Args:
        cfg: the factory configuration (default: ``FactoryConfig()``).
    """

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
        """The unconditional image features phi.

        Args:
            img: (B, 1, R, R) images.

        Returns:
            (B, cmap_dim) features.

        Raises:
            ValueError: misshapen ``img``.
        """
        r = self.cfg.resolution
        if img.ndim != 4 or img.shape[1:] != (1, r, r):
            raise ValueError(f"img: expected shape (B, 1, {r}, {r}) (got {tuple(img.shape)})")
        x = self.from_rgb(img)
        for block in self.blocks:
            x = block(x)
        x = minibatch_stddev(x, self.cfg.mbstd_group)
        x = self.conv(x)
        phi: torch.Tensor = self.fc(x.flatten(1))
        return phi

    def forward(self, img: torch.Tensor, client_id: IndexLike, slice_bin: IndexLike | None = None, key: KeyLike | None = None) -> torch.Tensor:
        """Score images under a condition: ``score(features(img), ...)``.

        Args:
            img: (B, 1, R, R) images.
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.

        Returns:
            (B,) scores.

        Raises:
            ValueError: misshapen images or an invalid condition.
        """
        return self.score(self.features(img), client_id, slice_bin, key)

    def score(self, phi: torch.Tensor, client_id: IndexLike, slice_bin: IndexLike | None = None, key: KeyLike | None = None) -> torch.Tensor:
        """The score of images whose features are ``phi`` under a condition (one feature
        pass can be scored under several conditions).

        Args:
            phi: (B, cmap_dim) features (`features`).
            client_id: int or (B,) client ids.
            slice_bin: int or (B,) slice bins, or None.
            key: (key_dim,) or (B, key_dim) domain key, or None.

        Returns:
            (B,) scores.

        Raises:
            ValueError: an invalid condition.
        """
        cfg = self.cfg
        b = batch_of(client_id, slice_bin, key, phi.shape[0])
        like = self.label_embed.weight
        label = label_onehot(client_id, slice_bin, b, cfg.n_clients, cfg.n_bins, like.device).to(phi.dtype)
        cmap = pixel_norm(self.label_embed(label))
        k = as_key(key, b, cfg.key_dim, phi)
        # as_key refuses a key when key_dim == 0, so k is None whenever key_embed is
        key_mod = 1.0 + self.key_embed(k) if k is not None and self.key_embed is not None else torch.ones_like(cmap)
        proj = (phi * cmap * key_mod).sum(dim=1) / math.sqrt(self.cmap_dim)
        return proj if self.out is None else self.out(phi).squeeze(1) + proj
