"""Arguments of the GIN augmentation (`pipelines.gin`): the `GinArgs` model, defaults, the spec form.

Checking an experiment spec's ``plan_args.gin`` needs no transform, so this module imports
neither torch nor MONAI; `pipelines.gin` builds the transforms and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from fedimg_core.config import ConfigModel, short
from pipelines.config_fields import ConfigValueError, check_model, is_int, is_number, refuse_unknown_keys, worded_integer, worded_number

__all__ = ["DEFAULTS", "GinArgs", "check_gin_arg", "parse_gin_args"]

DEFAULTS: dict[str, Any] = {
    "prob": 0.5,
    "alpha": (0.0, 1.0),
    "n_layers": 4,
    "channels": 2,
    "kernel_sizes": (1, 3),
    "negative_slope": 0.2,
}


def _prob(value: Any) -> float:
    if not is_number(value):
        raise ValueError(f"must be a number within [0, 1] (got {short(value)})")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within [0, 1] (got {short(value)})")
    return float(value)


def _alpha(value: Any) -> tuple[float, float]:
    # a pair only: a lone number would be ambiguous (fixed alpha, or an upper bound?)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_number(v) for v in value) or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1 (got {short(value)})")
    return float(value[0]), float(value[1])


def _n_layers(value: Any) -> int | tuple[int, int]:
    if is_int(value):
        if value < 1:
            raise ValueError(f"must be a positive integer or [min, max] (got {short(value)})")
        return int(value)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_int(v) for v in value) or not 1 <= value[0] <= value[1]:
        raise ValueError(f"must be a positive integer or [min, max] with 1 <= min <= max (got {short(value)})")
    return int(value[0]), int(value[1])


def _kernel_sizes(value: Any) -> tuple[int, ...]:
    sizes = [value] if is_int(value) else value
    # odd sizes only: padding k // 2 on each side then keeps the shape
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(is_int(k) and k >= 1 and k % 2 == 1 for k in sizes):
        raise ValueError(f"must be a non-empty list of positive odd integers, e.g. [1, 3] (got {short(value)})")
    return tuple(int(k) for k in sizes)


class GinArgs(ConfigModel):
    """Keyword arguments of `GINAugmentation` / `GINAugmentationd`, as a spec's ``plan_args.gin`` gives them."""

    prob: Annotated[float, BeforeValidator(_prob)] = DEFAULTS["prob"]
    alpha: Annotated[tuple[float, float], BeforeValidator(_alpha)] = DEFAULTS["alpha"]  # [low, high] of the mixing weight
    n_layers: Annotated[int | tuple[int, int], BeforeValidator(_n_layers)] = DEFAULTS["n_layers"]  # a number or [min, max]
    channels: Annotated[int, worded_integer(1, message="must be a positive integer (got {got})")] = DEFAULTS["channels"]
    kernel_sizes: Annotated[tuple[int, ...], BeforeValidator(_kernel_sizes)] = DEFAULTS["kernel_sizes"]
    negative_slope: Annotated[float, worded_number(0.0, 1.0, message="must be a number within [0, 1] (got {got})")] = DEFAULTS["negative_slope"]

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        refuse_unknown_keys(data, list(cls.model_fields))
        return data


def check_gin_arg(key: str, value: Any) -> Any:
    """One GIN argument, checked as in a spec (the transforms' constructors use this).

    Args:
        key: the argument's name (a field of `GinArgs`).
        value: its value.

    Returns:
        The normalised value (floats, tuples).

    Raises:
        ConfigValueError: ``"<key>: <problem>"``.
    """
    return getattr(check_model(GinArgs, {key: value}, ""), key)


def parse_gin_args(raw: Any, where: str) -> dict[str, Any] | None:
    """Validate the experiment-spec form of GIN and return keyword arguments for the transforms.

    Args:
        raw: ``None`` or ``false`` (GIN off), ``true`` (the defaults), or a mapping with any of
            ``prob``, ``alpha`` ([low, high]), ``n_layers`` (int or [min, max]), ``channels``,
            ``kernel_sizes`` and ``negative_slope``.
        where: key path of ``raw`` in its file (``plan_args.gin``), starting every message.

    Returns:
        None for GIN off, else every keyword argument of `GINAugmentation` (defaults filled in).

    Raises:
        ConfigValueError: ``"plan_args.gin.prob: must be within [0, 1] (got 2)"``; unknown keys are refused.
    """
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigValueError.of(where, f"must be a mapping ({', '.join(GinArgs.model_fields)}), true or false (got {short(raw)})")
    return check_model(GinArgs, raw, where).model_dump()


# the transforms' constructors check one argument each ("prob: must be within [0, 1] (got 2)")
def _check_prob(value: Any, name: str = "prob") -> float:
    return check_gin_arg("prob", value)  # type: ignore[no-any-return]


def _check_alpha(value: Any, name: str = "alpha") -> tuple[float, float]:
    return check_gin_arg("alpha", value)  # type: ignore[no-any-return]


def _check_n_layers(value: Any, name: str = "n_layers") -> int | tuple[int, int]:
    return check_gin_arg("n_layers", value)  # type: ignore[no-any-return]


def _check_channels(value: Any, name: str = "channels") -> int:
    return check_gin_arg("channels", value)  # type: ignore[no-any-return]


def _check_kernel_sizes(value: Any, name: str = "kernel_sizes") -> tuple[int, ...]:
    return check_gin_arg("kernel_sizes", value)  # type: ignore[no-any-return]


def _check_slope(value: Any, name: str = "negative_slope") -> float:
    return check_gin_arg("negative_slope", value)  # type: ignore[no-any-return]
