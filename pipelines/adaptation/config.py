"""Configs of the adaptation (phase-2) networks: `AdaptConfig` (encoder and branch sizes) and `BranchConfig`.

`BranchConfig` is the model of a published segmentation branch's ``branch.json``; the file
format built on it (which files, the weights, the limits) is `pipelines.adaptation.branch_file`.
Imports neither torch nor MONAI.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, short
from fedimg_core.config_types import Flag, integer
from pipelines.config_fields import integer_list, is_int
from pipelines.factory.config import FactoryConfig, PresetConfig

__all__ = [
    "ADAPT_PRESETS",
    "BRANCH_FORMAT",
    "FACTORY_KEYS",
    "N_STAGES",
    "AdaptConfig",
    "BranchConfig",
    "BranchFactory",
    "resolve_inject_resolutions",
    "stage_resolutions",
]

N_STAGES = 4

ADAPT_PRESETS: dict[str, dict[str, Any]] = {
    # for FactoryConfig "tiny" (64 px): encoder < 0.5M parameters, CPU friendly
    "tiny": {},
    # for FactoryConfig "paper" (512 px): the authors' widths (iResNet-50 stages, 3x3 pooling,
    # stride-2 stem so that the stages sit at 128..16 as theirs do for a 256 input)
    "paper": {
        "encoder_channels": (64, 128, 256, 512),
        "encoder_blocks": (3, 4, 14, 3),
        "stem_channels": 64,
        "stem_stride": 2,
        "pool_size": 3,
        "branch_hidden": 128,
        "branch_mlp": 64,
    },
}


def _stem_stride(value: Any) -> int:
    if not is_int(value) or value not in (1, 2):
        raise ValueError(f"must be 1 or 2 (got {short(value)})")
    return int(value)


def _inject(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(is_int(r) for r in value):
        if any(r < 4 or r & (r - 1) for r in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct powers of two >= 4, or null for automatic (got {short(list(value))})")
        return tuple(sorted(int(r) for r in value))
    raise ValueError(f"must be a list of powers of two >= 4, or null for automatic (got {short(value)})")


class AdaptConfig(PresetConfig):
    """Sizes of the phase-2 encoder and segmentation branch (validated on construction).

    Whether the sizes fit a given factory (inject resolutions, minimum resolution) is checked
    when an `InversionEncoder` is built (`resolve_inject_resolutions`).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = ADAPT_PRESETS
    WHERE: ClassVar[str] = "adaptation"
    WHAT: ClassVar[str] = "adaptation network settings"

    encoder_channels: Annotated[tuple[int, ...], integer_list(N_STAGES, 1, 4096)] = (16, 16, 32, 32)  # per stage, fine to coarse
    encoder_blocks: Annotated[tuple[int, ...], integer_list(N_STAGES, 1, 64)] = (1, 1, 1, 1)  # residual blocks per stage
    stem_channels: Annotated[int, integer(1, 4096)] = 16
    stem_stride: Annotated[int, BeforeValidator(_stem_stride)] = 1  # 1: stages at R/2..R/16; 2: R/4..R/32
    pool_size: Annotated[int, integer(1, 16)] = 2  # W+ head: each stage average-pooled to pool_size x pool_size
    inject_resolutions: Annotated[tuple[int, ...] | None, BeforeValidator(_inject)] = None  # None: automatic (R/32..R/4, >= 8); (): none
    branch_hidden: Annotated[int, integer(1, 1024)] = 32  # per-map 1x1 projection width
    branch_mlp: Annotated[int, integer(1, 1024)] = 32  # width of the branch's middle 1x1 layer
    n_domains: Annotated[int, integer(1, 64)] = 2  # 0 = source, 1 = target
    bn_running_stats: Flag = False  # False: DSBN uses batch statistics in train and eval


def stage_resolutions(factory_cfg: FactoryConfig, cfg: AdaptConfig) -> tuple[int, ...]:
    """Spatial size of the four encoder stages, fine to coarse: R / (stem_stride * 2^k).

    Args:
        factory_cfg: the factory whose generator the encoder inverts.
        cfg: the encoder's sizes.

    Returns:
        One size per stage.
    """
    r = factory_cfg.resolution
    return tuple(r // (cfg.stem_stride * 2**k) for k in range(1, N_STAGES + 1))


def resolve_inject_resolutions(factory_cfg: FactoryConfig, cfg: AdaptConfig) -> tuple[int, ...]:
    """The generator resolutions that receive residual features, ascending.

    Automatic (``inject_resolutions`` None): the stage resolutions within [R/32, R/4] and >= 8
    (R=512: 16, 32, 64, 128 as the authors; R=64: 8, 16). Explicit lists must be consecutive
    stage resolutions that are also generator resolutions.

    Args:
        factory_cfg: the factory whose generator the encoder inverts.
        cfg: the encoder's sizes.

    Returns:
        The resolutions, ascending.

    Raises:
        ValueError: the encoder does not fit the factory.
    """
    r = factory_cfg.resolution
    stages = stage_resolutions(factory_cfg, cfg)
    if stages[-1] < 2:
        raise ValueError(
            f"adaptation: factory resolution {r} is too small for this encoder (stem_stride "
            f"{cfg.stem_stride}: the coarsest stage would be {stages[-1]} px; needs >= 2)"
        )
    gen = set(factory_cfg.resolutions)
    if cfg.inject_resolutions is None:
        return tuple(sorted(s for s in stages if r // 32 <= s <= r // 4 and s >= 8 and s in gen))
    inject = tuple(sorted(cfg.inject_resolutions))
    for res in inject:
        if res not in stages or res not in gen:
            raise ValueError(
                f"adaptation.inject_resolutions: {res} is not available (encoder stages at {', '.join(map(str, stages))} px; generator resolutions 4..{r})"
            )
    for lo, hi in zip(inject, inject[1:]):
        if hi != 2 * lo:
            raise ValueError(f"adaptation.inject_resolutions: must be consecutive resolutions (got {list(inject)})")
    return inject


# -- branch.json ---------------------------------------------------------------------------------

BRANCH_FORMAT = "fedimg-segmentation-branch"
FACTORY_KEYS = ("name", "version", "sha256")
MAX_STR = 256  # characters of a factory identity field
MAX_CLASSES = 64


def _identity(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_STR:
        raise ValueError(f"must be a string of <= {MAX_STR} characters (got {short(value)})")
    return value


class BranchFactory(ConfigModel):
    """``branch.json``'s ``factory``: the factory version whose features the branch reads."""

    name: Annotated[str, BeforeValidator(_identity)]
    version: Annotated[str, BeforeValidator(_identity)]
    sha256: Annotated[str, BeforeValidator(_identity)]  # of the factory's generator.pt


def _format(value: Any) -> str:
    if value != BRANCH_FORMAT:
        raise ValueError(f"must be {BRANCH_FORMAT!r} (got {short(value)})")
    return BRANCH_FORMAT


def _version(value: Any) -> int:
    if not is_int(value) or value != 1:
        raise ValueError(f"must be 1 (got {short(value)})")
    return 1


def _class_names(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not 2 <= len(value) <= MAX_CLASSES:
        raise ValueError(f"must be a list of 2..{MAX_CLASSES} class names, background first (got {short(value)})")
    for name in value:
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ValueError(f"every name must be a non-empty string of <= 64 characters (got {short(name)})")
    if len(set(value)) != len(value):
        raise ValueError(f"names must be unique (got {short(list(value))})")
    return list(value)


def _branch_resolution(value: Any) -> int:
    if not is_int(value) or not 8 <= value <= 1024 or value & (value - 1):
        raise ValueError(f"must be a power of two in [8, 1024] (got {short(value)})")
    return int(value)


class BranchConfig(ConfigModel):
    """``branch.json``: everything a segmentation branch is rebuilt from (every key required)."""

    format: Annotated[Literal["fedimg-segmentation-branch"], BeforeValidator(_format)]
    version: Annotated[int, BeforeValidator(_version)]
    class_names: Annotated[list[str], BeforeValidator(_class_names)]  # background first
    feature_channels: Annotated[tuple[int, ...], integer_list(None, 1, 4096)]  # one per generator resolution 4..R
    resolution: Annotated[int, BeforeValidator(_branch_resolution)]
    hidden: Annotated[int, integer(1, 1024)]
    mlp: Annotated[int, integer(1, 1024)]
    factory: BranchFactory

    @model_validator(mode="after")
    def _one_map_per_resolution(self) -> BranchConfig:
        n_maps = int(math.log2(self.resolution)) - 1
        if len(self.feature_channels) != n_maps:
            raise ConfigProblem(
                "feature_channels",
                f"must be a list of {n_maps} integers in [1, 4096] (got {len(self.feature_channels)} entries: {short(list(self.feature_channels))})",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``branch.json``.

        Returns:
            Every key, lists rather than tuples.
        """
        out = self.model_dump()
        out["feature_channels"] = list(self.feature_channels)
        return out
