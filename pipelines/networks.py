"""Segmentation backbones from MONAI, built from a small dict of plain arguments.

The dict travels in the experiment spec (`plan_args.network`), so the researcher chooses
the size without touching plan code.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet

NETWORKS = ("basic_unet", "dynunet")


def build_network(
    name: str = "basic_unet",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: tuple[int, ...] | list[int] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build a MONAI segmentation network.

    - ``basic_unet``: MONAI BasicUNet; ``features`` has 6 entries (tiny default for CPU tests).
    - ``dynunet``: MONAI DynUNet (nnU-Net style); ``features`` are the filters per level.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if name == "basic_unet":
        feats = tuple(features) if features else (4, 4, 8, 16, 32, 4)
        if len(feats) != 6:
            raise ValueError(f"basic_unet needs 6 feature sizes, got {len(feats)}")
        return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=feats, **kwargs)
    if name == "dynunet":
        feats = list(features) if features else [8, 16, 32]
        levels = len(feats)
        kernels = [[3] * spatial_dims] * levels
        strides = [[1] * spatial_dims] + [[2] * spatial_dims] * (levels - 1)
        return DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=feats,
            **kwargs,
        )
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
