"""Segmentation backbones from MONAI, built from a small dict of plain arguments.

The dict travels in the experiment spec (``plan_args.network``), so the researcher chooses
the backbone and its size without touching plan code::

    network: {name: mednext, size: base, spatial_dims: 3, deep_supervision: true}

``network_config_from_spec`` validates such a dict (clear ``ValueError`` messages) and
returns the keyword arguments for ``build_network``; ``check_patch_size`` tells whether a
patch (``roi_size``) fits a network's downsampling. Both live in `pipelines.network_config`,
which imports neither torch nor MONAI, and are importable from here too.

Sizes (``NETWORK_SIZES``). Parameter counts measured with MONAI 1.6.1 / torch 2.13, 1 input
channel, 8 output channels, ``deep_supervision=False`` (deep supervision adds one 1x1 conv
per extra head: a few hundred to a few thousand parameters). MedNeXt's kernel-3 depthwise
convolutions are small, so its 2D and 3D counts are close.

==========  ======  =========================================================  ==========  ==========
network     size    configuration                                              params 3D   params 2D
==========  ======  =========================================================  ==========  ==========
mednext     tiny    init_filters 4, blocks 1 per stage, expansion 2, k3, 5 lv     69,424      62,872
mednext     small   MONAI MedNeXt-S, kernel 3                                   5,551,112   5,472,200
mednext     base    MONAI MedNeXt-B, kernel 3 (the paper's backbone)           10,511,048  10,432,136
mednext     medium  MONAI MedNeXt-M, kernel 3                                  17,533,704  17,402,952
mednext     large   MONAI MedNeXt-L, kernel 3                                  61,726,952  61,504,040
dynunet     tiny    filters (8, 16, 32), 3 levels                                  85,216      29,520
dynunet     small   filters (16, 32, 64, 128, 256), 5 levels                    5,646,264   1,942,168
dynunet     base    nnU-Net: 32..320 (3D) / 32..512 (2D), 6 levels             31,189,608  20,611,368
dynunet     medium  base + residual conv blocks                                31,419,208  21,050,632
dynunet     large   (64, 96, 128, 192, 256, 384) + residual (BraTS21), 6 lv    25,116,360   8,759,880
basic_unet  tiny    features (4, 4, 8, 16, 32, 4)                                  90,500      31,516
basic_unet  small   features (16, 16, 32, 64, 128, 16)                          1,438,904     496,024
basic_unet  base    MONAI default (32, 32, 64, 128, 256, 32)                    5,749,608   1,978,664
basic_unet  medium  features (48, 48, 96, 192, 384, 48)                        12,932,120   4,447,928
basic_unet  large   features (64, 64, 128, 256, 512, 64)                       22,986,440   7,903,816
==========  ======  =========================================================  ==========  ==========

MedNeXt-S/B/M/L are exactly MONAI's ``MedNeXtS/B/M/L`` (init_filters 32, residual blocks,
group norm; B: expansion (2,3,4,4) / bottleneck 4 / (4,4,3,2), 2 blocks per stage) with
kernel 3. These agree with the sizes reported in the MedNeXt paper (Roy et al. 2023: about
5.6 / 10.5 / 17.6 / 61.8 M for S/B/M/L at kernel 3; recalled, not re-checked against the
PDF). "large" DynUNet is wider at the top but narrower at the bottom than nnU-Net, hence
fewer parameters than "base" in 3D.

Patch sizes: MedNeXt (5 levels at every size) needs every side of the patch divisible by 16, DynUNet by
the product of its strides (2**(levels-1): 4 for tiny, 16 for small, 32 for base..large),
BasicUNet by 16; in every case the coarsest level must hold more than one voxel
(instance/group norms). The paper's 128^3 patches fit every size.

Deep supervision (``deep_supervision=True``; not available for ``basic_unet``). What MONAI
1.6.1 does, and what ``build_network`` returns:

- MedNeXt: in training mode ``forward`` returns a tuple ``(main, 1/2, 1/4, 1/8, 1/16)``,
  each head at its own resolution (``levels`` heads). We return it as MONAI gives it.
- DynUNet: in training mode MONAI returns ONE stacked tensor ``(B, 1 + deep_supr_num, C,
  *spatial)`` whose extra heads are nearest-neighbour interpolated up to full resolution.
  ``build_network`` returns a thin subclass (same parameters and ``state_dict`` keys) whose
  training forward returns the tuple ``(main, 1/2, 1/4, ...)`` at each head's own resolution
  instead, like MedNeXt (``deep_supr_num`` defaults to ``levels - 2``, the most MONAI
  allows), and which drops the intermediate head tensors MONAI keeps on the module after
  each forward (so the module can be deep-copied, e.g. as a frozen teacher).
- In eval mode every network returns only the main head as a plain tensor (sliding-window
  inference works unchanged). Both MONAI networks still compute the extra heads in eval
  mode; that is a small cost, not a different result.

``main_output(outputs)`` gives the full-resolution main logits and ``all_heads(outputs)``
the list of heads ordered from full resolution down, for any of these return forms,
including MONAI's stacked DynUNet tensor (all heads at full resolution, returned as given).
The supervised loss then needs the label resampled to each head's resolution (nearest /
max-pool of the one-hot label), with weights halving per level, normalised
(``deep_supervision_weights``); ConDist uses the main head only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, MedNeXt

# The plain-argument part (sizes, spec and patch checks) imports neither torch nor MONAI, so
# that checking a spec stays fast; its names stay importable from here.
from pipelines.network_config import (  # noqa: F401
    DEFAULT_SIZE,
    MONAI_OPTIONS,
    NETWORK_SIZES,
    NETWORKS,
    SIZES,
    _check_dims,
    _check_name,
    check_patch_size,
    network_config_from_spec,
    network_levels,
    patch_divisors,
    resolve_config,
)


class _DynUNet(DynUNet):
    """MONAI DynUNet whose deep-supervision training output is a tuple of heads, each at its own
    resolution (full resolution first), instead of MONAI's stacked tensor of heads
    nearest-upsampled to full resolution. Parameters and state_dict keys are MONAI's.
    The intermediate head tensors MONAI leaves on the module are dropped after each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.output_block(self.skip_layers(x))
        heads = tuple(self.heads)
        for i in range(len(self.heads)):  # same list object as the skip layers': clear in place
            self.heads[i] = _PLACEHOLDER
        if self.training and self.deep_supervision:
            return (out, *heads)
        return out


_PLACEHOLDER = torch.zeros(1)


def build_network(
    name: str = "basic_unet",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: tuple[int, ...] | list[int] | int | None = None,
    size: str | Mapping[str, Any] | None = None,
    deep_supervision: bool = False,
    roi_size: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build a MONAI segmentation network.

    - ``name``: ``mednext``, ``dynunet`` or ``basic_unet``.
    - ``size``: ``tiny`` (default: seconds-fast CPU tests), ``small``, ``base`` (MedNeXt-B of the
      paper; nnU-Net-like DynUNet), ``medium``, ``large``; or a mapping of constructor arguments.
      See the module docstring for the table.
    - ``features``: overrides the size's widths: BasicUNet's 6 features, DynUNet's filters per
      level (their number sets the levels), MedNeXt's (f, 2f, 4f, ...) per level (or just f).
    - ``deep_supervision``: MedNeXt / DynUNet only; see the module docstring for the outputs.
    - ``roi_size``: when given, checked with ``check_patch_size``.
    - ``kwargs``: further MONAI constructor arguments (override the size's).
    """
    _check_name(name)
    _check_dims(spatial_dims)
    cfg = resolve_config(name, size, spatial_dims, features, **kwargs)
    if roi_size is not None:
        overrides = dict(kwargs, **({} if features is None else {"features": features}))
        check_patch_size(name, size, roi_size, spatial_dims, **overrides)
    if not isinstance(deep_supervision, bool):
        raise ValueError(f"deep_supervision must be true or false, got {deep_supervision!r}")
    common = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    if name == "basic_unet":
        if deep_supervision:
            raise ValueError("basic_unet has no deep supervision heads; use mednext or dynunet")
        return BasicUNet(**common, **cfg)
    if name == "dynunet":
        if deep_supervision:
            cfg.setdefault("deep_supr_num", max(1, len(cfg["strides"]) - 2))
        return _DynUNet(**common, deep_supervision=deep_supervision, **cfg)
    return MedNeXt(**common, deep_supervision=deep_supervision, **cfg)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- outputs -------------------------------------------------------------------------------


def all_heads(outputs: torch.Tensor | Sequence[torch.Tensor], spatial_dims: int | None = None) -> list[torch.Tensor]:
    """The output heads, main (full resolution) first, then coarser ones.

    - a plain tensor (B, C, *spatial): ``[outputs]``
    - a tuple/list of heads (MedNeXt, our DynUNet, in training with deep supervision): as a list
    - MONAI's stacked DynUNet tensor (B, heads, C, *spatial): unbound along dim 1; all heads are
      then at full resolution (MONAI upsampled them), returned as given. A 5-D tensor is read as
      a plain 3-D output unless ``spatial_dims=2`` is passed; a 6-D tensor is always stacked 3-D.
    """
    if isinstance(outputs, (list, tuple)):
        if not outputs:
            raise ValueError("network returned no outputs")
        return list(outputs)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"expected a tensor or a sequence of tensors, got {type(outputs).__name__}")
    if spatial_dims is None:
        stacked = outputs.ndim == 6
    else:
        if outputs.ndim not in (spatial_dims + 2, spatial_dims + 3):
            raise ValueError(f"a {outputs.ndim}-D output does not fit spatial_dims={spatial_dims}")
        stacked = outputs.ndim == spatial_dims + 3
    return list(torch.unbind(outputs, dim=1)) if stacked else [outputs]


def main_output(outputs: torch.Tensor | Sequence[torch.Tensor], spatial_dims: int | None = None) -> torch.Tensor:
    """Full-resolution main-head logits (B, C, *spatial), whatever the network returned."""
    return all_heads(outputs, spatial_dims)[0]


def deep_supervision_weights(n_heads: int) -> list[float]:
    """Loss weights per head (main first), halving per level, normalised to sum to 1."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    w = [0.5**i for i in range(n_heads)]
    total = sum(w)
    return [v / total for v in w]
