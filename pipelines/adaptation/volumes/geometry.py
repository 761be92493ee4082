"""The 2D slice geometry of the data factory (`pipelines.factory.slices`) for labels and dense maps:
squaring a slice (symmetric pad) and its inverse."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms.croppad.array import SpatialPad
from monai.transforms.spatial.array import Resize

from pipelines.factory import slices as _slices

_KEYS = ("image", "label")
_IMAGE_KEYS = ("image",)


# The factory's chain options: the images must be those of `dataset_slices`, bit for bit.
_CHAIN_OPTIONS = _slices._CHAIN_OPTIONS


def pad_widths(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The symmetric padding that squares an ``X x Y`` slice, as MONAI's `SpatialPad` (method="symmetric") computes it.

    Args:
        width: the slice's X size.
        height: the slice's Y size.

    Returns:
        ``((before_x, after_x), (before_y, after_y))``.
    """
    side = max(width, height)
    # one (before, after) per axis, channel first (MONAI annotates it as a 1-tuple)
    pad: Sequence[tuple[int, int]] = SpatialPad(spatial_size=(side, side), method="symmetric").compute_pad_width((width, height))
    (bx, ax), (by, ay) = pad[1], pad[2]
    return (int(bx), int(ax)), (int(by), int(ay))


def square_labels(stack: torch.Tensor, size: int) -> torch.Tensor:
    """Label slices on the geometry of `square_slices`, so only input values occur.

    Padded symmetrically with 0 (background), resized with nearest neighbour at pixel
    centres ("nearest-exact").

    Args:
        stack: integer label slices ``(N, X, Y)``.
        size: the side of the squared slices.

    Returns:
        ``(N, size, size)`` int64.
    """
    if stack.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=torch.long)
    side = max(stack.shape[1], stack.shape[2])
    x = torch.as_tensor(stack).float()  # label ids (<= 255) are exact in float32
    if stack.shape[1] != stack.shape[2]:
        x = SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant", value=0.0)(x)
    x = Resize(spatial_size=(size, size), mode="nearest-exact", anti_aliasing=False)(x)
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.round().long().contiguous()


def unsquare(maps: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Inverse geometry of `square_slices` for dense maps (e.g. one class' probabilities of every slice).

    Resized to the padded square (bilinear, align_corners False), then the symmetric
    padding cropped.

    Args:
        maps: ``(N, size, size)`` maps.
        width: the original slices' X size.
        height: the original slices' Y size.

    Returns:
        ``(N, width, height)`` float32.
    """
    side = max(width, height)
    x = Resize(spatial_size=(side, side), mode="bilinear", align_corners=False, anti_aliasing=False)(maps.float())
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    (bx, _), (by, _) = pad_widths(width, height)
    return x[:, bx : bx + width, by : by + height]
