"""Segmentation backbones from MONAI (MedNeXt, DynUNet, BasicUNet), built from a small dict of plain arguments.

The dict travels in the experiment spec (``plan_args.network``); ``network_config_from_spec`` (in
`pipelines.network_config`, which imports neither torch nor MONAI) validates it, ``build_network`` builds the
network, ``main_output`` / ``all_heads`` read its outputs. Sizes and parameter counts, patch-size rules and
what deep supervision returns: docs/design/networks.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets.basic_unet import BasicUNet
from monai.networks.nets.dynunet import DynUNet
from monai.networks.nets.flexible_unet import FlexibleUNet
from monai.networks.nets.mednext import MedNeXt

# The plain-argument part (sizes, spec and patch checks) imports neither torch nor MONAI, so
# that checking a spec stays fast; its names stay importable from here.
from pipelines.network_config import (
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

__all__ = [
    "DEFAULT_SIZE",
    "MONAI_OPTIONS",
    "NETWORKS",
    "NETWORK_SIZES",
    "SIZES",
    "_check_dims",
    "_check_name",
    "all_heads",
    "build_network",
    "MONAI_CLASSES",
    "network_constructor",
    "check_patch_size",
    "count_parameters",
    "deep_supervision_weights",
    "main_output",
    "network_config_from_spec",
    "network_levels",
    "patch_divisors",
    "resolve_config",
]


# EfficientNet's image classifier (head convolution, its norm, the fully connected layer): built by MONAI's
# encoder, never used by FlexibleUNet's forward.
_UNUSED_ENCODER_PARTS = ("encoder._conv_head.", "encoder._bn1.", "encoder._fc.")


class _FlexibleUNet(FlexibleUNet):
    """MONAI FlexibleUNet whose unused EfficientNet classifier gets zero gradients instead of none: an optimizer
    that steps every weight with its gradient (declearn's, with weight decay, through Fed-BioMed) fails on a
    weight without one. Outputs, parameters and state_dict keys are MONAI's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unused = [p for n, p in self.named_parameters() if n.startswith(_UNUSED_ENCODER_PARTS)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().forward(inputs)
        if torch.is_grad_enabled():
            out = out + 0.0 * sum(p.view(-1)[0] for p in self._unused if p.requires_grad)
        return out


class _DynUNet(DynUNet):
    """MONAI DynUNet whose deep-supervision training output is a tuple of heads, each at its own
    resolution (full resolution first), instead of MONAI's stacked tensor of heads
    nearest-upsampled to full resolution. Parameters and state_dict keys are MONAI's.
    The intermediate head tensors MONAI leaves on the module are dropped after each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out: torch.Tensor = self.output_block(self.skip_layers(x))
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

    Args:
        name: ``mednext``, ``dynunet``, ``basic_unet`` or ``flexible_unet`` (MONAI's FlexibleUNet: an EfficientNet
            or ResNet encoder, random init, and a U-Net decoder).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes, background included.
        features: overrides the size's widths: BasicUNet's 6 features, DynUNet's filters per
            level (their number sets the levels), MedNeXt's (f, 2f, 4f, ...) per level (or just f).
        size: ``tiny`` (default: seconds-fast CPU tests), ``small``, ``base`` (MedNeXt-B of the
            paper; nnU-Net-like DynUNet), ``medium``, ``large``; or a mapping of constructor
            arguments (docs/design/networks.md has the table).
        deep_supervision: MedNeXt / DynUNet only (what they then return: docs/design/networks.md).
        roi_size: when given, checked with ``check_patch_size``.
        kwargs: further MONAI constructor arguments (override the size's).

    Returns:
        The network.

    Raises:
        ValueError: an unknown name or size, bad widths, a patch that does not fit, deep
            supervision on basic_unet.
    """
    cls, kwargs_out = network_constructor(name, spatial_dims, in_channels, out_channels, features, size, deep_supervision, roi_size, **kwargs)
    return cls(**kwargs_out)


# MONAI's class of each network (what a MONAI bundle's config names: `pipelines.model_package`).
MONAI_CLASSES = {
    "basic_unet": "monai.networks.nets.BasicUNet",
    "dynunet": "monai.networks.nets.DynUNet",
    "mednext": "monai.networks.nets.MedNeXt",
    "flexible_unet": "monai.networks.nets.FlexibleUNet",
}


def network_constructor(
    name: str = "basic_unet",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: tuple[int, ...] | list[int] | int | None = None,
    size: str | Mapping[str, Any] | None = None,
    deep_supervision: bool = False,
    roi_size: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> tuple[type[torch.nn.Module], dict[str, Any]]:
    """The class and the complete constructor arguments `build_network` builds with the same arguments.

    The class is MONAI's (BasicUNet, MedNeXt) or its DynUNet subclass whose parameters and
    ``state_dict`` keys are MONAI's; `MONAI_CLASSES` names MONAI's class, so the arguments
    rebuild the same network with MONAI alone (a MONAI bundle's ``network_def``).

    Args:
        name: as for `build_network`.
        spatial_dims: as for `build_network`.
        in_channels: as for `build_network`.
        out_channels: as for `build_network`.
        features: as for `build_network`.
        size: as for `build_network`.
        deep_supervision: as for `build_network`.
        roi_size: as for `build_network`.
        kwargs: as for `build_network`.

    Returns:
        (class, constructor keyword arguments).

    Raises:
        ValueError: as `build_network`.
    """
    _check_name(name)
    _check_dims(spatial_dims)
    cfg = resolve_config(name, size, spatial_dims, features, **kwargs)
    if roi_size is not None:
        overrides = dict(kwargs, **({} if features is None else {"features": features}))
        check_patch_size(name, size, roi_size, spatial_dims, **overrides)
    if not isinstance(deep_supervision, bool):
        raise ValueError(f"deep_supervision must be true or false, got {deep_supervision!r}")
    common: dict[str, Any] = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    if name == "basic_unet":
        if deep_supervision:
            raise ValueError("basic_unet has no deep supervision heads; use mednext or dynunet")
        return BasicUNet, {**common, **cfg}
    if name == "dynunet":
        if deep_supervision:
            cfg.setdefault("deep_supr_num", max(1, len(cfg["strides"]) - 2))
        return _DynUNet, {**common, "deep_supervision": deep_supervision, **cfg}
    if name == "flexible_unet":
        if deep_supervision:
            raise ValueError("flexible_unet has no deep supervision heads; use mednext or dynunet")
        return _FlexibleUNet, {**common, **cfg}
    return MedNeXt, {**common, "deep_supervision": deep_supervision, **cfg}


# The modules whose outputs are the network's class logits (main output and deep-supervision heads), per network.
_OUTPUT_LAYER_PREFIXES = {
    "mednext": ("out_0.conv_out", "out_blocks."),
    "dynunet": ("output_block.", "deep_supervision_heads."),
    "basic_unet": ("final_conv",),
    "flexible_unet": ("segmentation_head.",),
}


def output_biases(model: torch.nn.Module, out_channels: int) -> list[torch.nn.Parameter]:
    """The bias vectors of the layers that produce the network's class logits (every deep-supervision head too).

    Args:
        model: a network of `build_network`.
        out_channels: its number of classes.

    Returns:
        The biases, one per output layer (each of ``out_channels`` values).

    Raises:
        ValueError: a network whose output layers are not known here.
    """
    inner = getattr(model, "net", model)
    kinds = {MedNeXt: "mednext", DynUNet: "dynunet", BasicUNet: "basic_unet", FlexibleUNet: "flexible_unet"}
    kind = next((k for cls, k in kinds.items() if isinstance(inner, cls)), None)
    if kind is None:
        raise ValueError(f"no known output layers for {type(inner).__name__}")
    prefixes = _OUTPUT_LAYER_PREFIXES[kind]
    biases = [
        p for name, p in inner.named_parameters()
        if name.endswith("bias") and name.startswith(prefixes) and p.dim() == 1 and p.shape[0] == out_channels
    ]  # fmt: skip
    if not biases:
        raise ValueError(f"{type(inner).__name__}: no output layer bias with {out_channels} channels")
    return biases


def set_background_prior(model: torch.nn.Module, out_channels: int, probability: float) -> None:
    """Start the model predicting background with `probability` at every voxel, like a detector's prior initialisation.

    Sets every output layer's bias to ``log(probability * (C - 1) / (1 - probability))`` for class 0 and 0 for the
    others (C classes), so softmax starts at ``probability`` for background wherever the features are still near
    zero. Why: with partially labelled sites, no site supervises background against the classes it does not label
    (they are one merged channel), and from MONAI's initialisation an arbitrary one of them wins that merged mass at
    three of four sites and, averaged, everywhere; starting from background keeps it background
    (docs/design/segmentation-training.md, "The initial model").

    Args:
        model: a network of `build_network`.
        out_channels: its number of classes (C >= 2).
        probability: the background probability to start from, in (0, 1).

    Raises:
        ValueError: a probability outside (0, 1) or an unknown network.
    """
    if not 0.0 < probability < 1.0 or out_channels < 2:
        raise ValueError(f"background prior must be in (0, 1) with at least 2 classes, got {probability!r} and {out_channels}")
    value = math.log(probability * (out_channels - 1) / (1.0 - probability))
    with torch.no_grad():
        for bias in output_biases(model, out_channels):
            bias.zero_()
            bias[0] = value


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters of `model`.

    Args:
        model: the network.
        trainable_only: count only the parameters that require a gradient.

    Returns:
        The number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- outputs -------------------------------------------------------------------------------


def all_heads(outputs: torch.Tensor | Sequence[torch.Tensor], spatial_dims: int | None = None) -> list[torch.Tensor]:
    """The output heads, main (full resolution) first, then coarser ones.

    - a plain tensor (B, C, *spatial): ``[outputs]``
    - a tuple/list of heads (MedNeXt, our DynUNet, in training with deep supervision): as a list
    - MONAI's stacked DynUNet tensor (B, heads, C, *spatial): unbound along dim 1; all heads are
      then at full resolution (MONAI upsampled them), returned as given. A 5-D tensor is read as
      a plain 3-D output unless ``spatial_dims=2`` is passed; a 6-D tensor is always stacked 3-D.

    Args:
        outputs: what the network returned.
        spatial_dims: 2 or 3 (None: guess from the number of dimensions, as above).

    Returns:
        The heads.

    Raises:
        ValueError: no output, or a tensor that does not fit ``spatial_dims``.
        TypeError: neither a tensor nor a sequence of tensors.
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
    """Full-resolution main-head logits, whatever the network returned.

    Args:
        outputs: what the network returned (see `all_heads`).
        spatial_dims: 2 or 3 (None: guess).

    Returns:
        The main head (B, C, *spatial).
    """
    return all_heads(outputs, spatial_dims)[0]


def deep_supervision_weights(n_heads: int) -> list[float]:
    """Loss weights per head (main first), halving per level, normalised to sum to 1.

    Args:
        n_heads: the number of heads (>= 1).

    Returns:
        The weights.

    Raises:
        ValueError: ``n_heads`` < 1.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    w = [0.5**i for i in range(n_heads)]
    total = sum(w)
    return [v / total for v in w]
