"""Plain-argument side of the segmentation backbones: sizes, spec checks, patch checks.

Checking an experiment spec's ``plan_args.network`` needs no network, so this module
imports neither torch nor MONAI (``coordinator validate`` answers in a second);
`pipelines.networks` builds the MONAI networks from what it returns and documents the
sizes. Every name here is also importable from `pipelines.networks`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, cast

from pydantic import BeforeValidator, ConfigDict, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, did_you_mean, short
from fedimg_core.config_types import Flag, integer
from pipelines.config_fields import ConfigValueError, check_model

NETWORKS = ("basic_unet", "dynunet", "mednext", "flexible_unet")
SIZES = ("tiny", "small", "base", "medium", "large")
DEFAULT_SIZE = "tiny"

# MONAI's create_mednext builds its S/B/M/L variants inline (no table to import), so the
# same settings are spelled out here, where `features` and the patch check can read them.
_MEDNEXT_COMMON: dict[str, Any] = {"init_filters": 32, "kernel_size": 3, "use_residual_connection": True, "norm_type": "group"}


_Stages = int | tuple[int, ...]  # one value for every stage, or one per stage


def _mednext_blocks(down: _Stages, bottleneck: int, up: _Stages, enc_ratio: _Stages, dec_ratio: _Stages, bottleneck_ratio: int) -> dict[str, Any]:
    def as4(v: _Stages) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple) else (v,) * 4

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
    # MONAI's FlexibleUNet: a classification encoder (EfficientNet or ResNet, MONAI's own code, so there
    # offline; random init: pretrained weights are a download) and a U-Net decoder of 5 stages (/32).
    # Its encoder normalises with batch norm (buffers averaged by Fed-BioMed like the weights).
    "flexible_unet": {
        "tiny": {"backbone": "efficientnet-b0", "decoder_channels": (32, 16, 16, 8, 8)},
        "small": {"backbone": "efficientnet-b0", "decoder_channels": (128, 64, 32, 16, 16)},
        "base": {"backbone": "efficientnet-b2", "decoder_channels": (256, 128, 64, 32, 16)},
        "medium": {"backbone": "efficientnet-b4", "decoder_channels": (256, 128, 64, 32, 16)},
        "large": {"backbone": "efficientnet-b7", "decoder_channels": (256, 128, 64, 32, 16)},
    },
    "basic_unet": {
        "tiny": {"features": (4, 4, 8, 16, 32, 4)},
        "small": {"features": (16, 16, 32, 64, 128, 16)},
        "base": {"features": (32, 32, 64, 128, 256, 32)},
        "medium": {"features": (48, 48, 96, 192, 384, 48)},
        "large": {"features": (64, 64, 128, 256, 512, 64)},
    },
}

# arguments build_network sets itself (not accepted as extra kwargs)
_RESERVED = {"spatial_dims", "in_channels", "out_channels", "deep_supervision", "self", "dimensions"}
# The other constructor arguments of MONAI 1.6.1's BasicUNet, DynUNet and MedNeXt, in
# signature order: the extra options a spec may give. Spelled out so that checking a spec
# does not import MONAI; tests/test_validate_light.py pins them to MONAI's real signatures.
MONAI_OPTIONS: dict[str, tuple[str, ...]] = {
    "basic_unet": ("features", "act", "norm", "bias", "dropout", "upsample"),
    "dynunet": (
        "kernel_size", "strides", "upsample_kernel_size", "filters", "dropout", "norm_name", "act_name",
        "deep_supr_num", "res_block", "trans_bias",
    ),
    "mednext": (
        "init_filters", "encoder_expansion_ratio", "decoder_expansion_ratio", "bottleneck_expansion_ratio",
        "kernel_size", "use_residual_connection", "blocks_down", "blocks_bottleneck", "blocks_up", "norm_type",
        "global_resp_norm",
    ),
    "flexible_unet": (
        "backbone", "pretrained", "decoder_channels", "norm", "act", "dropout", "decoder_bias", "upsample", "pre_conv",
        "interp_mode", "is_pad",
    ),
}  # fmt: skip
# FlexibleUNet's encoders in MONAI 1.6.1 (monai.networks.nets.flexible_unet.FLEXUNET_BACKBONE)
FLEXIBLE_BACKBONES = tuple(f"efficientnet-b{i}" for i in range(9)) + ("efficientnet-l2",) + tuple(f"resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200))


def _choose(value: Any, choices: Sequence[str], hint_first: bool = False) -> str:
    """``choose one of ...`` with the did-you-mean hint (first, for a long list: a spec error quotes a few hundred characters)."""
    hint = did_you_mean(value, choices, cutoff=0.5)
    if hint_first:
        return f"{hint.removeprefix('; ') + ' ' if hint else ''}choose one of {', '.join(choices)}"
    return f"choose one of {', '.join(choices)}{hint}"


def _check_name(name: Any) -> str:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; {_choose(name, NETWORKS)}")
    return str(name)


def _check_size(name: str, size: Any) -> str:
    if size not in NETWORK_SIZES[name]:
        choices = _choose(size, tuple(NETWORK_SIZES[name]))
        raise ValueError(f"unknown size {size!r} for network {name!r}; {choices}")
    return str(size)


def _check_dims(spatial_dims: Any) -> int:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def _monai_defaults(name: str) -> dict[str, Any]:
    """MONAI's constructor defaults (for configs given as a partial mapping)."""
    if name == "dynunet":
        return {"filters": "nnunet", "levels": 6}
    if name == "flexible_unet":
        return dict(NETWORK_SIZES["flexible_unet"]["base"])  # MONAI requires a backbone: the base size's, unless given
    # only for a config given as a mapping (build_network, never a spec): MONAI is needed here
    from monai.networks.nets.basic_unet import BasicUNet
    from monai.networks.nets.mednext import MedNeXt

    networks: dict[str, type[Any]] = {"basic_unet": BasicUNet, "mednext": MedNeXt}
    params = inspect.signature(networks[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k not in _RESERVED and p.default is not inspect.Parameter.empty}


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
    """The MONAI constructor arguments for ``name`` at ``size``, with ``features`` and ``kwargs`` overriding the size's values.

    Args:
        name: ``basic_unet``, ``dynunet`` or ``mednext``.
        size: a size name (None: `DEFAULT_SIZE`) or a mapping of constructor arguments.
        spatial_dims: 2 or 3.
        features: the widths (see `pipelines.networks.build_network`).
        kwargs: further constructor arguments.

    Returns:
        The arguments, without spatial_dims / in_channels / out_channels / deep_supervision.

    Raises:
        ValueError: an unknown name or size, or widths that do not fit the network.
    """
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
    elif name == "flexible_unet":
        if features is not None:
            cfg["decoder_channels"] = (features,) * 5 if isinstance(features, int) else tuple(features)
        channels = tuple(cfg.get("decoder_channels", ()))
        if len(channels) != 5:
            raise ValueError(f"flexible_unet needs 5 decoder channel sizes (features), got {len(channels)}")
        _check_positive_ints("features", channels)
        cfg["decoder_channels"] = channels
        if cfg.get("backbone") not in FLEXIBLE_BACKBONES:
            raise ValueError(f"unknown flexible_unet backbone {cfg.get('backbone')!r}; {_choose(cfg.get('backbone'), FLEXIBLE_BACKBONES, hint_first=True)}")
        if cfg.get("pretrained"):
            raise ValueError("flexible_unet pretrained: true downloads ImageNet weights at run time, which sites cannot do; leave it false")
        cfg["pretrained"] = False
    else:  # mednext
        if features is not None:
            feats = (features,) if isinstance(features, int) else tuple(features)
            _check_positive_ints("features", feats)
            if len(feats) > 1:
                if any(f != feats[0] * 2**i for i, f in enumerate(feats)):
                    raise ValueError(f"mednext doubles its width per level: features must be (f, 2f, 4f, ...), got {list(feats)}")
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
    """Number of resolution levels (full resolution included) of a resolved config.

    Args:
        name: the network.
        config: its arguments (`resolve_config`).

    Returns:
        The number of levels.
    """
    if name == "mednext":
        return len(tuple(config["blocks_down"])) + 1
    if name == "dynunet":
        return len(tuple(config["strides"]))
    if name == "flexible_unet":
        return 6  # 5 downsamplings (/32), whatever the backbone
    return 5  # BasicUNet: 4 poolings


def patch_divisors(name: str, config: Mapping[str, Any], spatial_dims: int) -> tuple[int, ...]:
    """Per axis, what every side of the patch must be divisible by (total downsampling).

    Args:
        name: the network.
        config: its arguments (`resolve_config`).
        spatial_dims: 2 or 3.

    Returns:
        One divisor per axis.
    """
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
    """Check that a training patch fits a network: every side divisible by the total downsampling, more than one voxel at the coarsest level.

    Args:
        name: the network.
        size: a size name or a config such as `resolve_config` returns.
        roi_size: the patch (an int: the same on every axis).
        spatial_dims: 2 or 3 (None: from ``roi_size``, else 3).
        overrides: the network's other arguments.

    Raises:
        ValueError: the patch does not fit (the message names the nearest valid one).
    """
    _check_name(name)
    if isinstance(roi_size, int) and not isinstance(roi_size, bool):
        roi = (roi_size,) * (spatial_dims or 3)
    else:
        roi = tuple(cast(Sequence[int], roi_size))  # a bool is not a patch: tuple() refuses it
    if spatial_dims is None:
        spatial_dims = len(roi)
    _check_dims(spatial_dims)
    if len(roi) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi):
        raise ValueError(f"roi_size must be {spatial_dims} positive integers (spatial_dims={spatial_dims}), got {list(roi)!r}")
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


# -- spec validation -----------------------------------------------------------------------

_SPEC_KEYS = ("name", "size", "spatial_dims", "in_channels", "features", "deep_supervision")


def _spec_name(value: Any) -> str:
    return _check_name(value)


def _spec_size(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be one of {', '.join(SIZES)} (got {short(value)})")
    return value


def _spec_dims(value: Any) -> int:
    if isinstance(value, bool) or value not in (2, 3):
        raise ValueError(f"must be 2 or 3 (got {short(value)})")
    return int(value)


def _spec_features(value: Any) -> int | list[int]:
    feats = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(feats, (list, tuple)) or not feats or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in feats):
        raise ValueError(f"must be a list of positive integers (got {short(value)})")
    return list(value) if isinstance(value, (list, tuple)) else value


class NetworkSpec(ConfigModel):
    """A spec's ``plan_args.network``: the backbone, its size and shape, and MONAI options of that network.

    Keys other than these must be constructor options of the named MONAI network (MONAI_OPTIONS);
    ``out_channels`` comes from the label schema.
    """

    model_config = ConfigDict(extra="allow")  # the named network's MONAI options, checked below
    name: Annotated[str, BeforeValidator(_spec_name)] = "basic_unet"
    size: Annotated[str, BeforeValidator(_spec_size)] = DEFAULT_SIZE
    spatial_dims: Annotated[int, BeforeValidator(_spec_dims)] = 3
    in_channels: Annotated[int, integer(1)] = 1
    deep_supervision: Flag = False
    features: Annotated[int | list[int] | None, BeforeValidator(_spec_features)] = None  # None: the size's

    @model_validator(mode="after")
    def _fits_the_network(self) -> NetworkSpec:
        name = self.name
        if self.size not in NETWORK_SIZES[name]:
            raise ConfigProblem("size", f"unknown size {self.size!r} for network {name!r}; {_choose(self.size, tuple(NETWORK_SIZES[name]))}")
        if self.deep_supervision and name in ("basic_unet", "flexible_unet"):
            raise ConfigProblem("deep_supervision", f"{name} has no deep supervision heads; use mednext or dynunet")
        allowed = MONAI_OPTIONS[name]
        for key in self.model_extra or {}:
            if key == "out_channels":
                raise ConfigProblem("out_channels", "not allowed: the number of output channels is set from the label schema (plan_args.num_classes)")
            if key not in allowed:
                options = list(_SPEC_KEYS) + [a for a in allowed if a not in ("features", "filters")]
                raise ConfigProblem(key, f"unknown network option {key!r} for {name}; {_choose(key, options, hint_first=True)}")
        extra = self.model_extra or {}
        if name == "flexible_unet" and extra.get("pretrained"):
            raise ConfigProblem("pretrained", "true downloads ImageNet weights at run time, which sites cannot do; leave it false")
        if name == "flexible_unet" and "backbone" in extra and extra["backbone"] not in FLEXIBLE_BACKBONES:
            raise ConfigProblem("backbone", f"unknown backbone {extra['backbone']!r}; {_choose(extra['backbone'], FLEXIBLE_BACKBONES, hint_first=True)}")
        try:  # resolving catches inconsistent features/options before anything is sent
            resolve_config(name, self.size, self.spatial_dims, self.features, **(self.model_extra or {}))
        except ValueError as exc:
            raise ConfigProblem("features" if self.features is not None else "", str(exc)) from None
        return self

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `pipelines.networks.build_network` (without ``out_channels``)."""
        out: dict[str, Any] = {"name": self.name, "spatial_dims": self.spatial_dims, "size": self.size}
        out.update(in_channels=self.in_channels, deep_supervision=self.deep_supervision)
        if self.features is not None:
            out["features"] = self.features
        out.update(self.model_extra or {})
        return out


def network_config_from_spec(network: Mapping[str, Any] | None, roi_size: Sequence[int] | int | None = None, where: str = "network") -> dict[str, Any]:
    """Validate a spec's ``plan_args.network`` (`NetworkSpec`) and return keyword arguments for ``build_network``.

    Args:
        network: the mapping (None: the defaults).
        roi_size: the training patch; when given, it is checked against the network too.
        where: key path of ``network`` in its file, starting every message.

    Returns:
        ``name``, ``spatial_dims``, ``size``, ``in_channels``, ``deep_supervision`` and any
        ``features`` / MONAI options (``out_channels`` comes from ``plan_args.num_classes``).

    Raises:
        ConfigValueError: (a ValueError) ``"<where>.<key>: <problem>"``; a patch that does not
            fit names ``<where>`` (``roi_size [30, 30, 30] does not fit mednext ...``).
    """
    if network is None:
        network = {}
    if not isinstance(network, Mapping):
        raise ConfigValueError.of(where, f"network must be a mapping (name, size, spatial_dims, ...), got {type(network).__name__}")
    out = check_model(NetworkSpec, network, where).build_kwargs()
    if roi_size is not None:
        extra = {k: v for k, v in out.items() if k not in _SPEC_KEYS}
        overrides = dict(extra, **({"features": out["features"]} if "features" in out else {}))
        try:
            check_patch_size(out["name"], out["size"], roi_size, out["spatial_dims"], **overrides)
        except ValueError as exc:
            raise ConfigValueError.of(where, str(exc)) from None
    return out
