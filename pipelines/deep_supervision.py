"""A loss applied to every deep-supervision head of a segmentation network, weights halving per level (no FL code).

MONAI's `DeepSupervisionLoss` does the weighting and the label resizing; this module fixes the
weights and the conventions of `pipelines.losses` (integer labels, main head first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.losses.ds_loss import DeepSupervisionLoss
from torch.nn.modules.loss import _Loss

__all__ = ["deep_supervision_loss"]


def deep_supervision_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    label: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``loss_fn`` on every deep-supervision head, weights ``2**-i`` normalised to sum 1.

    ``outputs``: a list/tuple of ``(B, C, *spatial_i)`` heads, main (full resolution) head
    first, or a stacked tensor ``(B, heads, C, *spatial)`` as MONAI's DynUNet returns in
    training with ``deep_supervision=True`` (all heads already at the label's size; a
    plain tensor is always read as stacked). 3 heads -> 4/7, 2/7, 1/7; no head is zeroed.

    A head at lower resolution than the label gets the label downsampled to its size by
    nearest-neighbour interpolation (``nearest-exact``, as nnU-Net and MONAI's
    DeepSupervisionLoss do: logits are not upsampled). Label values, including the ignore
    label, are preserved by nearest interpolation. ConDist applies to the main head only.

    The weighting and resizing are MONAI's `DeepSupervisionLoss` (with these weights), which
    hands ``loss_fn`` float32 heads; the losses here compute in float32 anyway.

    Args:
        outputs: the heads, as above.
        label: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer label at full resolution.
        loss_fn: the loss of one head, ``loss_fn(logits, label)``.

    Returns:
        The weighted sum, a scalar tensor.

    Raises:
        ValueError: heads or label of the wrong shape (stacked heads not at the label's size,
            a head larger than the label).
    """
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() < 4:
            raise ValueError(f"stacked deep-supervision outputs must be (B, heads, C, *spatial), got {tuple(outputs.shape)}")
        heads = list(torch.unbind(outputs, dim=1))
        n_sp = outputs.dim() - 3
        stacked = True
    elif isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        heads = list(outputs)
        n_sp = heads[0].dim() - 2
        stacked = False
    else:
        raise ValueError("outputs must be a non-empty list/tuple of (B, C, *spatial) tensors or a stacked (B, heads, C, *spatial) tensor")
    if not isinstance(label, torch.Tensor):
        raise ValueError(f"label must be a torch.Tensor, got {type(label).__name__}")
    if label.dim() == n_sp + 2 and label.shape[1] == 1:
        lab = label
    elif label.dim() == n_sp + 1:
        lab = label.unsqueeze(1)
    else:
        raise ValueError(f"label shape {tuple(label.shape)} does not fit heads with {n_sp} spatial dims: expected (B, 1, *spatial) or (B, *spatial)")
    full = tuple(lab.shape[2:])
    for i, head in enumerate(heads):
        if head.dim() != n_sp + 2 or head.shape[0] != lab.shape[0]:
            raise ValueError(f"head {i} has shape {tuple(head.shape)}; expected (B={lab.shape[0]}, C, {n_sp} spatial dims)")
        size = tuple(head.shape[2:])
        if size != full:
            if stacked:
                raise ValueError(f"stacked heads must match the label's spatial size {full}, got {size}")
            if any(s > f for s, f in zip(size, full)):
                raise ValueError(f"head {i} spatial size {size} is larger than the label's {full}")
    weights = [0.5**i for i in range(len(heads))]
    total_w = sum(weights)
    # MONAI sums weight * loss(head, label resized "nearest-exact" to the head); it resizes a
    # float target, so the label travels as float (ids <= 255 are exact) and goes back to its
    # integer dtype before `loss_fn` sees it.
    criterion = DeepSupervisionLoss(_IntegerLabel(loss_fn, lab.dtype), weights=[w / total_w for w in weights])
    loss: torch.Tensor = criterion(heads, lab.float())
    return loss


class _IntegerLabel(_Loss):
    """`loss_fn` with the label cast back to its integer dtype (for `DeepSupervisionLoss`)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.loss_fn = loss_fn
        self.dtype = dtype

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, label.to(self.dtype))
