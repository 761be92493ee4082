"""Arguments of the GIN augmentation (`pipelines.gin`): defaults, checks, the spec form.

Checking an experiment spec's ``plan_args.gin`` needs no transform, so this module imports
neither torch nor MONAI; `pipelines.gin` builds the transforms and re-exports these names.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


DEFAULTS: dict[str, Any] = {
    "prob": 0.5,
    "alpha": (0.0, 1.0),
    "n_layers": 4,
    "channels": 2,
    "kernel_sizes": (1, 3),
    "negative_slope": 0.2,
}


# --------------------------------------------------------------------------- validation
# One checker per argument, shared by the constructors and parse_gin_args: ``name`` starts
# the message ("prob" in the constructor, "plan_args.gin.prob" in an experiment spec).


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


def _check_prob(value: Any, name: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{name}: must be a number within [0, 1] (got {value!r})")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be within [0, 1] (got {value!r})")
    return float(value)


def _check_alpha(value: Any, name: str) -> tuple[float, float]:
    # a pair only: a lone number would be ambiguous (fixed alpha, or an upper bound?)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_is_number(v) for v in value)
        or not 0.0 <= value[0] <= value[1] <= 1.0
    ):
        raise ValueError(f"{name}: must be [low, high] with 0 <= low <= high <= 1 (got {value!r})")
    return float(value[0]), float(value[1])


def _check_n_layers(value: Any, name: str) -> int | tuple[int, int]:
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name}: must be a positive integer or [min, max] (got {value!r})")
        return int(value)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value) or not 1 <= value[0] <= value[1]:
        raise ValueError(f"{name}: must be a positive integer or [min, max] with 1 <= min <= max (got {value!r})")
    return int(value[0]), int(value[1])


def _check_channels(value: Any, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: must be a positive integer (got {value!r})")
    return int(value)


def _check_kernel_sizes(value: Any, name: str) -> tuple[int, ...]:
    sizes = [value] if _is_int(value) else value
    # odd sizes only: padding k // 2 on each side then keeps the shape
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(_is_int(k) and k >= 1 and k % 2 == 1 for k in sizes):
        raise ValueError(f"{name}: must be a non-empty list of positive odd integers, e.g. [1, 3] (got {value!r})")
    return tuple(int(k) for k in sizes)


def _check_slope(value: Any, name: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be a number within [0, 1] (got {value!r})")
    return float(value)


_CHECKS = {
    "prob": _check_prob,
    "alpha": _check_alpha,
    "n_layers": _check_n_layers,
    "channels": _check_channels,
    "kernel_sizes": _check_kernel_sizes,
    "negative_slope": _check_slope,
}


def parse_gin_args(raw: Any, where: str) -> dict[str, Any] | None:
    """Validate the experiment-spec form of GIN and return keyword arguments for
    `GINAugmentation` / `GINAugmentationd` (all of them, defaults filled in).

    ``raw``: ``None`` or ``false`` -> ``None`` (GIN off); ``true`` -> the defaults; or a
    mapping with any of ``prob``, ``alpha`` ([low, high]), ``n_layers`` (int or [min, max]),
    ``channels``, ``kernel_sizes`` and ``negative_slope``. Unknown keys are refused. Error
    messages start with ``where``, e.g. ``"plan_args.gin.prob: must be within [0, 1] (got 2)"``.
    """
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping ({', '.join(_CHECKS)}), true or false (got {raw!r})")
    unknown = [k for k in raw if k not in _CHECKS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), list(_CHECKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(_CHECKS)})"
        raise ValueError(f"{where}.{unknown[0]}: unknown key{hint}")
    return {key: check(raw.get(key, DEFAULTS[key]), f"{where}.{key}") for key, check in _CHECKS.items()}
