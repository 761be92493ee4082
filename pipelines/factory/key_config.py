"""Domain-key configurations (`validate_key_config`): one model per key kind, checked without torch.

Checking an experiment spec's ``plan_args.key`` needs no key function, so this module
imports neither torch nor MONAI; `pipelines.factory.domain_key` builds the key functions
and re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, did_you_mean, short
from fedimg_core.config_types import integer, number
from pipelines.config_fields import ConfigValueError, check_model, is_int, worded_integer, worded_number

__all__ = ["KEY_MODELS", "REGISTRY_FOLDER", "KeyConfigError", "validate_key_config"]


class KeyConfigError(ConfigValueError):
    """A key configuration (or the encoder file it names) is unusable."""


_DEFAULT_KIND = "random_cnn+histogram"
REGISTRY_FOLDER = "registry"  # the only folder of the models directory a key file may name
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class _Key(ConfigModel):
    """What every key kind has: its kind; options of other kinds are refused by name."""

    KIND: ClassVar[str] = "none"
    kind: str = "none"

    @model_validator(mode="before")
    @classmethod
    def _options_of_this_kind(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = [k for k in cls.model_fields if k != "kind"]
            for key in data:
                if key != "kind" and key not in allowed:
                    raise ConfigProblem(str(key), f"unknown option for kind {cls.KIND!r} (allowed: {', '.join(sorted(allowed)) or 'none'})")
        return data


class NoKey(_Key):
    """``kind: none``: no key (the ablation)."""


class _ReferenceKey(_Key):
    reference_seed: Annotated[int, integer(0)] = 0
    reference_count: Annotated[int, integer(1, 4096)] = 64


def _widths(value: Any) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not 1 <= len(value) <= 8:
        raise ValueError(f"must be a list of 1 to 8 positive integers (got {short(value)})")
    return list(value)


class RandomCnnKey(_ReferenceKey):
    """``kind: random_cnn``: a frozen random CNN's pooled features, projected."""

    KIND: ClassVar[str] = "random_cnn"
    seed: Annotated[int, integer(0)] = 0
    widths: Annotated[list[Annotated[int, integer(1, 1024)]], BeforeValidator(_widths)] = Field(default_factory=lambda: [16, 32, 64])
    proj_dim: Annotated[int, integer(1, 4096)] = 64


class HistogramKey(_ReferenceKey):
    """``kind: histogram``: a soft intensity histogram."""

    KIND: ClassVar[str] = "histogram"
    bins: Annotated[int, integer(2, 1024)] = 32
    lo: Annotated[float, number()] = -1.0
    hi: Annotated[float, number()] = 1.0
    bandwidth: Annotated[float | None, worded_number(0.0, low_open=True, optional=True)] = None

    @model_validator(mode="after")
    def _ordered(self) -> HistogramKey:
        if not self.lo < self.hi:
            raise ConfigProblem("hi", f"must be greater than lo (got lo={self.lo}, hi={self.hi})")
        return self


class CnnHistogramKey(RandomCnnKey, HistogramKey):
    """``kind: random_cnn+histogram`` (the default): both, concatenated."""

    KIND: ClassVar[str] = "random_cnn+histogram"


def _file(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"an encoder needs the name of its TorchScript file (got {short(value)})")
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != REGISTRY_FOLDER:
        raise ValueError(
            f"must be a path in the models directory's {REGISTRY_FOLDER}/ folder, where `site-agent adapt` puts registry entries "
            f"(e.g. {REGISTRY_FOLDER}/factory/NAME/v0001/encoder.pt) (got {short(value)})"
        )
    return value


def _sha256(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"must be 64 hex digits (got {short(value)})")
    return value.lower()


def _channels(value: Any) -> int:
    if not is_int(value) or value not in (1, 3):
        raise ValueError(f"must be 1 or 3 (got {short(value)})")
    return int(value)


class EncoderKey(_ReferenceKey):
    """``kind: encoder``: a TorchScript encoder from the site's models directory (pinned by sha256)."""

    KIND: ClassVar[str] = "encoder"
    file: Annotated[str, BeforeValidator(_file)] = Field(default=None, validate_default=True)
    sha256: Annotated[str | None, BeforeValidator(_sha256)] = None
    input_size: Annotated[int | None, worded_integer(1, 4096, optional=True)] = None
    channels: Annotated[int, BeforeValidator(_channels)] = 1
    dim: Annotated[int | None, worded_integer(1, 4096, optional=True)] = None


KEY_MODELS: dict[str, type[_Key]] = {m.KIND: m for m in (NoKey, RandomCnnKey, HistogramKey, CnnHistogramKey, EncoderKey)}


def validate_key_config(raw: Mapping[str, Any] | None, where: str = "key") -> dict[str, Any]:
    """Check a key configuration without building it; return it normalised (defaults filled in).

    Args:
        raw: ``None`` or ``{kind: none}`` (no key), ``{}`` (the default random CNN + histogram
            key), or a mapping with ``kind`` and that kind's options.
        where: key path of ``raw`` in its file, starting every message.

    Returns:
        ``{"kind": ..., <every option of that kind>}``.

    Raises:
        KeyConfigError: ``"<where>.<option>: <problem>"`` for every problem.
    """
    if raw is None:
        return {"kind": "none"}
    if not isinstance(raw, Mapping):
        raise KeyConfigError.of(where, f"must be a mapping or null (got {type(raw).__name__})")
    for k in raw:
        if not isinstance(k, str):
            raise KeyConfigError.of(f"{where}.{k}", "option names must be strings")
    kind = raw.get("kind", _DEFAULT_KIND)
    if kind not in KEY_MODELS:
        raise KeyConfigError.of(f"{where}.kind", f"must be one of {', '.join(KEY_MODELS)} (got {short(kind)}){did_you_mean(kind, KEY_MODELS)}")
    return check_model(KEY_MODELS[kind], {**raw, "kind": kind}, where, KeyConfigError).model_dump()
