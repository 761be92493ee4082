"""Sizes of the data factory's networks (`FactoryConfig`, presets), checked without torch.

`PresetConfig` is the base of the frozen size configs with named presets (this one and
`pipelines.adaptation.config.AdaptConfig`).

Checking an experiment spec's ``plan_args.factory`` needs no network, so this module
imports neither torch nor MONAI; `pipelines.factory.networks` builds the networks and
re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Self

from pydantic import BeforeValidator, ConfigDict, ValidationError, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, problems_of, short
from fedimg_core.config_types import Flag, integer, number
from pipelines.config_fields import ConfigValueError, integer_list, problem_lines, refuse_unknown_keys

__all__ = ["PRESETS", "FactoryConfig", "PresetConfig", "preset_values"]


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "resolution": 128,
        "channels": (128, 128, 128, 64, 32, 16),
        "z_dim": 128,
        "w_dim": 128,
        "mapping_layers": 4,
    },
    "paper": {
        "resolution": 512,
        "channels": (512, 512, 512, 512, 512, 256, 128, 64),
        "z_dim": 512,
        "w_dim": 512,
        "mapping_layers": 8,
    },
}


class PresetConfig(ConfigModel):
    """A frozen size config built from ``{preset: NAME, field: value, ...}``.

    The fields' defaults, then the preset's values (default ``tiny``), then the overrides.
    Constructing one directly (``FactoryConfig(resolution=32)``) validates it too; every
    error is a `ConfigValueError` (a ValueError) naming ``<where>.<key>``.
    """

    model_config = ConfigDict(frozen=True)  # merged with ConfigModel's
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}}
    WHERE: ClassVar[str] = "config"  # what messages call it by default
    WHAT: ClassVar[str] = "settings"  # what its mapping holds, in words

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = problems_of(exc, type(self), f"{self.WHERE}.")
            error = ConfigValueError(problem_lines(problems, self.WHERE), key=problems[0][0])
            error.problems = problems
            raise error from None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        refuse_unknown_keys(data, ["preset", *cls.model_fields])
        preset = data.get("preset", "tiny")
        if not isinstance(preset, str) or preset not in cls.PRESETS:
            raise ConfigProblem("preset", f"must be one of {', '.join(cls.PRESETS)} (got {short(preset)})")
        return {**cls.PRESETS[preset], **{k: v for k, v in data.items() if k != "preset"}}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """A named preset with field overrides.

        Args:
            name: the preset (a key of PRESETS).
            **overrides: field values replacing the preset's.

        Returns:
            The config.
        """
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str | None = None) -> Self:
        """Build from a plain dict (YAML/JSON): optional ``preset`` plus field overrides.

        Args:
            raw: the mapping (None: the defaults).
            where: key path of ``raw`` in its file, starting every message (default WHERE).

        Returns:
            The config.

        Raises:
            ConfigValueError: ``"<where>.<key>: <problem>"`` for every problem.
        """
        where = where or cls.WHERE
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigValueError.of(where, f"must be a mapping of {cls.WHAT} (got {type(raw).__name__})")
        raw = raw or {}
        bad = [k for k in raw if not isinstance(k, str)]
        if bad:
            raise ConfigValueError.of(f"{where}.{bad[0]}", "unknown key; keys are strings")
        try:
            return cls(**raw)  # a custom __init__ is what pydantic runs, so validate through it
        except ConfigValueError as exc:
            if where == cls.WHERE:
                raise
            problems = [(where + key[len(cls.WHERE) :], problem) for key, problem in exc.problems]
            error = ConfigValueError(problem_lines(problems, where), key=problems[0][0])
            error.problems = problems
            raise error from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field; ``type(cfg).from_dict(cfg.to_dict()) == cfg``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}


def preset_values(cls: type[PresetConfig], raw: Mapping[str, Any] | None, where: str, presets: Mapping[str, Mapping[str, Any]], what: str) -> dict[str, Any]:
    """A config's field values from ``{preset: NAME, field: value, ...}`` (checked).

    Args:
        cls: the config class.
        raw: the mapping (None: the defaults).
        where: key path of ``raw``, starting every message.
        presets: unused (the class's PRESETS); kept for callers of the old signature.
        what: unused (the class's WHAT).

    Returns:
        Every field's value.

    Raises:
        ConfigValueError: naming ``<where>.<key>``.
    """
    return dict(cls.from_dict(raw, where).model_dump())


def _resolution(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value & (value - 1):
        raise ValueError(f"must be a power of two >= 8 (got {short(value)})")
    return value


class FactoryConfig(PresetConfig):
    """Sizes of the factory's generator and discriminator (validated on construction)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    WHERE: ClassVar[str] = "factory"
    WHAT: ClassVar[str] = "factory settings"

    resolution: Annotated[int, BeforeValidator(_resolution)] = 64  # power of two >= 8; images are (1, resolution, resolution)
    # at 4, 8, ..., resolution
    channels: Annotated[tuple[int, ...], integer_list(lo=1, message="must be a list of positive integers (got {got})")] = (64, 64, 64, 32, 16)
    z_dim: Annotated[int, integer(1)] = 64
    w_dim: Annotated[int, integer(1)] = 64  # also the condition embedding width and the D projection width
    mapping_layers: Annotated[int, integer(1)] = 2
    mapping_lr_mul: Annotated[float, number(positive=True)] = 0.01
    label_lr_mul: Annotated[float, number(positive=True)] = 1.0  # learning-rate multiplier of the client-id / slice-bin embeddings (G and D)
    n_clients: Annotated[int, integer(1)] = 2  # client-id one-hot size
    n_bins: Annotated[int, integer(0)] = 29  # slice-position bins (0: no bin conditioning)
    key_dim: Annotated[int, integer(0)] = 0  # domain-key width (0: no key conditioning)
    key_mix: Annotated[float, number(0.0, 1.0)] = 0.8  # condition = PixelNorm(key_mix * key_emb + (1 - key_mix) * label_emb)
    style_mixing_prob: Annotated[float, number(0.0, 1.0)] = 0.9
    mbstd_group: Annotated[int, integer(1)] = 4
    # D's score = unconditional head + projection on the condition; false: projection only, so
    # everything D knows about a site has to go through its client-id embedding
    d_unconditional: Flag = True
    # a per-client-id offset added to w after the mapping network: a direct path from the id to
    # the styles, where the mapping network's lr multiplier (0.01) makes the id's path through it slow
    w_offset: Flag = False
    w_offset_lr_mul: Annotated[float, number(positive=True)] = 1.0  # learning-rate multiplier of that offset

    @model_validator(mode="after")
    def _one_width_per_level(self) -> FactoryConfig:
        n_levels = int(math.log2(self.resolution)) - 1
        if len(self.channels) != n_levels:
            raise ConfigProblem(
                "channels",
                f"must have log2(resolution) - 1 = {n_levels} entries, one per resolution 4..{self.resolution} "
                f"(got {len(self.channels)}: {list(self.channels)!r})",
            )
        return self

    @property
    def log2_resolution(self) -> int:
        """log2 of the image size."""
        return int(math.log2(self.resolution))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The synthesis resolutions 4, 8, ..., resolution."""
        return tuple(2**i for i in range(2, self.log2_resolution + 1))

    @property
    def label_dim(self) -> int:
        """Width of the condition one-hot: client ids then slice bins."""
        return self.n_clients + self.n_bins
