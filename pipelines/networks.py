"""Segmentation backbones from MONAI, built from a small dict of plain arguments.

The dict travels in the experiment spec (``plan_args.network``), so the researcher chooses
the backbone and its size without touching plan code::

    network: {name: mednext, size: base, spatial_dims: 3, deep_supervision: true}

``network_config_from_spec`` validates such a dict (clear ``ValueError`` messages) and
returns the keyword arguments for ``build_network``; ``check_patch_size`` tells whether a
patch (``roi_size``) fits a network's downsampling.

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

import difflib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, MedNeXt

NETWORKS = ("basic_unet", "dynunet", "mednext")
SIZES = ("tiny", "small", "base", "medium", "large")
DEFAULT_SIZE = "tiny"

# MONAI's create_mednext builds its S/B/M/L variants inline (no table to import), so the
# same settings are spelled out here, where `features` and the patch check can read them.
_MEDNEXT_COMMON: dict[str, Any] = {"init_filters": 32, "kernel_size": 3, "use_residual_connection": True, "norm_type": "group"}


def _mednext_blocks(down, bottleneck, up, enc_ratio, dec_ratio, bottleneck_ratio) -> dict[str, Any]:
    as4 = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * 4  # noqa: E731
    return {
        "blocks_down": as4(down),
        "blocks_bottleneck": bottleneck,
        "blocks_up": as4(up),
        "encoder_expansion_ratio": enc_ratio,
        "decoder_expansion_ratio": dec_ratio,
        "bottleneck_expansion_ratio": bottleneck_ratio,
    }


# Configurations per network and size: MONAI constructor arguments, except for DynUNet
# where ``filters`` sets the number of levels and kernels/strides are derived (3x3(x3)
# kernels, stride 1 then 2 per level) unless given explicitly.
NETWORK_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mednext": {
        "tiny": {**_MEDNEXT_COMMON, "init_filters": 4, **_mednext_blocks(1, 1, 1, 2, 2, 2)},
        # small .. large: exactly MONAI's create_mednext("S"|"B"|"M"|"L") with kernel 3
        "small": {**_MEDNEXT_COMMON, **_mednext_blocks(2, 2, 2, 2, 2, 2)},
        "base": {**_MEDNEXT_COMMON, **_mednext_blocks(2, 2, 2, (2, 3, 4, 4), (4, 4, 3, 2), 4)},
        "medium": {**_MEDNEXT_COMMON, **_mednext_blocks((3, 4, 4, 4), 4, (4, 4, 4, 3), (2, 3, 4, 4), (4, 4, 3, 2), 4)},
        "large": {**_MEDNEXT_COMMON, **_mednext_blocks((3, 4, 8, 8), 8, (8, 8, 4, 3), (3, 4, 8, 8), (8, 8, 4, 3), 8)},
    },
    "dynunet": {
        "tiny": {"filters": (8, 16, 32)},
        "small": {"filters": (16, 32, 64, 128, 256)},
        # nnU-Net: 32 doubling per level, capped at 320 (3D) / 512 (2D); 6 levels
        "base": {"filters": "nnunet", "levels": 6},
        "medium": {"filters": "nnunet", "levels": 6, "res_block": True},
        "large": {"filters": (64, 96, 128, 192, 256, 384), "res_block": True},
    },
    "basic_unet": {
        "tiny": {"features": (4, 4, 8, 16, 32, 4)},
        "small": {"features": (16, 16, 32, 64, 128, 16)},
        "base": {"features": (32, 32, 64, 128, 256, 32)},
        "medium": {"features": (48, 48, 96, 192, 384, 48)},
        "large": {"features": (64, 64, 128, 256, 512, 64)},
    },
}

_MONAI_CLASSES = {"basic_unet": BasicUNet, "dynunet": DynUNet, "mednext": MedNeXt}
# arguments build_network sets itself (not accepted as extra kwargs)
_RESERVED = {"spatial_dims", "in_channels", "out_channels", "deep_supervision", "self", "dimensions"}


def _did_you_mean(value: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"choose one of {', '.join(choices)}{hint}"


def _check_name(name: Any) -> str:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; {_did_you_mean(name, NETWORKS)}")
    return name


def _check_size(name: str, size: Any) -> str:
    if size not in NETWORK_SIZES[name]:
        choices = _did_you_mean(size, tuple(NETWORK_SIZES[name]))
        raise ValueError(f"unknown size {size!r} for network {name!r}; {choices}")
    return size


def _check_dims(spatial_dims: Any) -> int:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def _monai_defaults(name: str) -> dict[str, Any]:
    """MONAI's constructor defaults (for configs given as a partial mapping)."""
    if name == "dynunet":
        return {"filters": "nnunet", "levels": 6}
    params = inspect.signature(_MONAI_CLASSES[name].__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k not in _RESERVED and p.default is not inspect.Parameter.empty
    }


def _nnunet_filters(levels: int, spatial_dims: int) -> tuple[int, ...]:
    cap = 320 if spatial_dims == 3 else 512
    return tuple(min(32 * 2**i, cap) for i in range(levels))


def resolve_config(
    name: str,
    size: str | Mapping[str, Any] | None = None,
    spatial_dims: int = 3,
    features: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The MONAI constructor arguments for ``name`` at ``size`` (a size name or a config dict),
    with ``features`` and ``kwargs`` overriding the size's values. Does not include
    spatial_dims / in_channels / out_channels / deep_supervision."""
    _check_name(name)
    _check_dims(spatial_dims)
    if size is None:
        size = DEFAULT_SIZE
    if isinstance(size, str):
        cfg = dict(NETWORK_SIZES[name][_check_size(name, size)])
    elif isinstance(size, Mapping):
        cfg = {**_monai_defaults(name), **size}
    else:
        raise ValueError(f"size must be one of {', '.join(SIZES)} or a mapping of arguments, got {size!r}")
    cfg.update(kwargs)

    if name == "basic_unet":
        if features is not None:
            cfg["features"] = features
        feats = cfg["features"]
        feats = (feats,) * 6 if isinstance(feats, int) else tuple(feats)
        if len(feats) != 6:
            raise ValueError(f"basic_unet needs 6 feature sizes, got {len(feats)}")
        _check_positive_ints("features", feats)
        cfg["features"] = feats
    elif name == "dynunet":
        if features is not None:
            cfg["filters"] = features
            cfg.pop("levels", None)
        filters = cfg.pop("filters", "nnunet")
        levels = cfg.pop("levels", None)
        if filters == "nnunet" or filters is None:
            if "strides" in cfg:
                levels = len(cfg["strides"])
            filters = _nnunet_filters(int(levels or 6), spatial_dims)
        filters = tuple(filters)
        _check_positive_ints("features", filters)
        if len(filters) < 3:
            raise ValueError(f"dynunet needs at least 3 levels (feature sizes), got {len(filters)}")
        n = len(filters)
        cfg["filters"] = filters
        cfg.setdefault("kernel_size", [[3] * spatial_dims] * n)
        cfg.setdefault("strides", [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1))
        cfg.setdefault("upsample_kernel_size", list(cfg["strides"])[1:])
    else:  # mednext
        if features is not None:
            feats = (features,) if isinstance(features, int) else tuple(features)
            _check_positive_ints("features", feats)
            if len(feats) > 1:
                if any(f != feats[0] * 2**i for i, f in enumerate(feats)):
                    raise ValueError(
                        f"mednext doubles its width per level: features must be (f, 2f, 4f, ...), got {list(feats)}"
                    )
                depth = len(feats) - 1  # number of down/up stages
                for key in ("blocks_down", "encoder_expansion_ratio"):  # listed fine -> coarse
                    cfg[key] = _fit_stages(cfg[key], depth, keep="start")
                for key in ("blocks_up", "decoder_expansion_ratio"):  # listed coarse -> fine
                    cfg[key] = _fit_stages(cfg[key], depth, keep="end")
            cfg["init_filters"] = feats[0]
        if len(tuple(cfg["blocks_down"])) != len(tuple(cfg["blocks_up"])):
            raise ValueError("mednext blocks_down and blocks_up must have the same length")
    return cfg


def _fit_stages(values: Sequence[int] | int, depth: int, keep: str) -> tuple[int, ...] | int:
    """Per-stage values stretched or cut to ``depth`` stages, keeping the fine-resolution end."""
    if isinstance(values, int):
        return values
    v = tuple(values)
    if keep == "start":
        return (v + (v[-1],) * depth)[:depth]
    return ((v[0],) * depth + v)[-depth:]


def _check_positive_ints(key: str, values: Sequence[Any]) -> None:
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{key} must be positive integers, got {list(values)!r}")


def network_levels(name: str, config: Mapping[str, Any]) -> int:
    """Number of resolution levels (full resolution included) of a resolved config."""
    if name == "mednext":
        return len(tuple(config["blocks_down"])) + 1
    if name == "dynunet":
        return len(tuple(config["strides"]))
    return 5  # BasicUNet: 4 poolings


def patch_divisors(name: str, config: Mapping[str, Any], spatial_dims: int) -> tuple[int, ...]:
    """Per axis, what every side of the patch must be divisible by (total downsampling)."""
    if name == "dynunet":
        divs = [1] * spatial_dims
        for s in config["strides"]:
            s = [s] * spatial_dims if isinstance(s, int) else list(s)
            divs = [d * int(v) for d, v in zip(divs, s)]
        return tuple(divs)
    return (2 ** (network_levels(name, config) - 1),) * spatial_dims


def check_patch_size(
    name: str,
    size: str | Mapping[str, Any] | None,
    roi_size: Sequence[int] | int,
    spatial_dims: int | None = None,
    **overrides: Any,
) -> None:
    """Raise ValueError unless ``roi_size`` fits network ``name`` at ``size`` (a size name or a
    config such as ``resolve_config`` returns): every side divisible by the total downsampling,
    and more than one voxel at the coarsest level."""
    _check_name(name)
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi = (roi_size,) * (spatial_dims or 3)
    else:
        roi = tuple(roi_size)
    if spatial_dims is None:
        spatial_dims = len(roi)
    _check_dims(spatial_dims)
    if len(roi) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi):
        raise ValueError(
            f"roi_size must be {spatial_dims} positive integers (spatial_dims={spatial_dims}), got {list(roi)!r}"
        )
    cfg = resolve_config(name, size, spatial_dims, **overrides)
    divs = patch_divisors(name, cfg, spatial_dims)
    levels = network_levels(name, cfg)
    if isinstance(size, str) or size is None:
        label = f"{name} size {size or DEFAULT_SIZE!r}"
    else:
        label = f"{name} (custom config)"
    if overrides:
        label += f" with {', '.join(sorted(overrides))}"
    bad = [v for v, d in zip(roi, divs) if v % d]
    if bad:
        suggestion = tuple(max(d, round(v / d) * d) for v, d in zip(roi, divs))
        raise ValueError(
            f"roi_size {list(roi)} does not fit {label}: it has {levels} levels, so every side of the patch "
            f"must be divisible by {list(divs) if len(set(divs)) > 1 else divs[0]} "
            f"(nearest valid roi_size: {list(suggestion)})"
        )
    coarsest = [v // d for v, d in zip(roi, divs)]
    if math.prod(coarsest) < 2:
        raise ValueError(
            f"roi_size {list(roi)} is too small for {label}: its coarsest level ({levels} levels) would be a single "
            f"voxel, which instance/group normalisation cannot handle; use at least "
            f"{[2 * d for d in divs] if len(set(divs)) > 1 else 2 * divs[0]} per side"
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


# -- spec validation -----------------------------------------------------------------------

_SPEC_KEYS = ("name", "size", "spatial_dims", "in_channels", "features", "deep_supervision")


def _constructor_args(name: str) -> list[str]:
    params = inspect.signature(_MONAI_CLASSES[name].__init__).parameters
    return [p for p in params if p not in _RESERVED]


def network_config_from_spec(
    network: Mapping[str, Any] | None, roi_size: Sequence[int] | int | None = None
) -> dict[str, Any]:
    """Validate a spec's ``plan_args.network`` mapping and return keyword arguments for
    ``build_network`` (``out_channels`` comes from ``plan_args.num_classes``, not from here).
    With ``roi_size``, the patch is checked against the network too. Raises ValueError with a
    message naming the offending key."""
    if network is None:
        network = {}
    if not isinstance(network, Mapping):
        raise ValueError(f"network must be a mapping (name, size, spatial_dims, ...), got {type(network).__name__}")
    net = dict(network)
    name = _check_name(net.pop("name", "basic_unet"))
    out: dict[str, Any] = {"name": name}
    out["spatial_dims"] = _check_dims(net.pop("spatial_dims", 3))
    size = net.pop("size", DEFAULT_SIZE)
    if not isinstance(size, str):
        raise ValueError(f"network.size must be one of {', '.join(SIZES)}, got {size!r}")
    out["size"] = _check_size(name, size)
    in_ch = net.pop("in_channels", 1)
    if isinstance(in_ch, bool) or not isinstance(in_ch, int) or in_ch < 1:
        raise ValueError(f"network.in_channels must be a positive integer, got {in_ch!r}")
    out["in_channels"] = in_ch
    ds = net.pop("deep_supervision", False)
    if not isinstance(ds, bool):
        raise ValueError(f"network.deep_supervision must be true or false, got {ds!r}")
    if ds and name == "basic_unet":
        raise ValueError("network.deep_supervision: basic_unet has no deep supervision heads; use mednext or dynunet")
    out["deep_supervision"] = ds
    if "features" in net:
        feats = net.pop("features")
        if isinstance(feats, bool) or not (
            isinstance(feats, int) or (isinstance(feats, (list, tuple)) and feats)
        ):
            raise ValueError(f"network.features must be a list of positive integers, got {feats!r}")
        _check_positive_ints("network.features", [feats] if isinstance(feats, int) else list(feats))
        out["features"] = list(feats) if isinstance(feats, (list, tuple)) else feats
    if "out_channels" in net:
        raise ValueError("network.out_channels is not allowed: it is set from plan_args.num_classes")
    allowed = _constructor_args(name)
    for key in net:
        if key not in allowed:
            raise ValueError(
                f"unknown network option {key!r} for {name}; "
                f"{_did_you_mean(key, list(_SPEC_KEYS) + [a for a in allowed if a not in ('features', 'filters')])}"
            )
    out.update(net)
    # resolving catches inconsistent features/options before anything is sent
    extra = {k: v for k, v in out.items() if k not in _SPEC_KEYS}
    resolve_config(name, out["size"], out["spatial_dims"], out.get("features"), **extra)
    if roi_size is not None:
        overrides = dict(extra, **({"features": out["features"]} if "features" in out else {}))
        check_patch_size(name, out["size"], roi_size, out["spatial_dims"], **overrides)
    return out
