"""Sizes of the data factory's networks (`FactoryConfig`, presets), checked without torch.

Checking an experiment spec's ``plan_args.factory`` needs no network, so this module
imports neither torch nor MONAI; `pipelines.factory.networks` builds the networks and
re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


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


def _fmt(value: Any) -> str:
    return repr(value)


def _int(where: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}.{key}: must be an integer >= {minimum} (got {_fmt(value)})")
    return int(value)


def _float(where: str, key: str, value: Any, low: float, high: float | None, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{where}.{key}: must be a finite number {bound} (got {_fmt(value)})")
    return float(value)


def _check_fields(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate and normalise every field; errors name ``{where}.{key}``."""
    out: dict[str, Any] = {}
    res = values["resolution"]
    if isinstance(res, bool) or not isinstance(res, int) or res < 8 or res & (res - 1):
        raise ValueError(f"{where}.resolution: must be a power of two >= 8 (got {_fmt(res)})")
    out["resolution"] = int(res)
    n_levels = int(math.log2(res)) - 1
    ch = values["channels"]
    if isinstance(ch, (str, bytes)) or not isinstance(ch, Sequence):
        raise ValueError(f"{where}.channels: must be a list of positive integers (got {_fmt(ch)})")
    for c in ch:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{where}.channels: must be a list of positive integers (got {_fmt(ch)})")
    if len(ch) != n_levels:
        raise ValueError(
            f"{where}.channels: must have log2(resolution) - 1 = {n_levels} entries, one per "
            f"resolution 4..{res} (got {len(ch)}: {_fmt(list(ch))})"
        )
    out["channels"] = tuple(int(c) for c in ch)
    out["z_dim"] = _int(where, "z_dim", values["z_dim"], 1)
    out["w_dim"] = _int(where, "w_dim", values["w_dim"], 1)
    out["mapping_layers"] = _int(where, "mapping_layers", values["mapping_layers"], 1)
    out["mapping_lr_mul"] = _float(where, "mapping_lr_mul", values["mapping_lr_mul"], 0.0, None, low_open=True)
    out["label_lr_mul"] = _float(where, "label_lr_mul", values["label_lr_mul"], 0.0, None, low_open=True)
    out["n_clients"] = _int(where, "n_clients", values["n_clients"], 1)
    out["n_bins"] = _int(where, "n_bins", values["n_bins"], 0)
    out["key_dim"] = _int(where, "key_dim", values["key_dim"], 0)
    out["key_mix"] = _float(where, "key_mix", values["key_mix"], 0.0, 1.0)
    out["style_mixing_prob"] = _float(where, "style_mixing_prob", values["style_mixing_prob"], 0.0, 1.0)
    out["mbstd_group"] = _int(where, "mbstd_group", values["mbstd_group"], 1)
    if not isinstance(values["d_unconditional"], bool):
        raise ValueError(f"{where}.d_unconditional: must be true or false (got {_fmt(values['d_unconditional'])})")
    out["d_unconditional"] = values["d_unconditional"]
    return out


def preset_values(cls, raw: Mapping[str, Any] | None, where: str, presets: Mapping[str, Mapping[str, Any]], what: str) -> dict[str, Any]:
    """A config dataclass's field values from ``{preset: NAME, field: value, ...}``: the
    dataclass defaults, then the preset's (default ``tiny``), then the overrides. Unknown keys
    and presets raise ValueError naming ``{where}.{key}``; values are checked by the caller."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping of {what} (got {type(raw).__name__})")
    names = [f.name for f in fields(cls)]
    allowed = ["preset", *names]
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}")
    preset = raw.get("preset", "tiny")
    if not isinstance(preset, str) or preset not in presets:
        raise ValueError(f"{where}.preset: must be one of {', '.join(presets)} (got {_fmt(preset)})")
    defaults = {f.name: f.default for f in fields(cls)}
    return {**defaults, **presets[preset], **{k: v for k, v in raw.items() if k != "preset"}}


@dataclass(frozen=True)
class FactoryConfig:
    """Sizes of the factory's generator and discriminator (validated on construction)."""

    resolution: int = 64  # power of two >= 8; images are (1, resolution, resolution)
    channels: tuple[int, ...] = (64, 64, 64, 32, 16)  # at 4, 8, ..., resolution
    z_dim: int = 64
    w_dim: int = 64  # also the condition embedding width and the D projection width
    mapping_layers: int = 2
    mapping_lr_mul: float = 0.01
    label_lr_mul: float = 1.0  # learning-rate multiplier of the client-id / slice-bin embeddings (G and D)
    n_clients: int = 2  # client-id one-hot size
    n_bins: int = 29  # slice-position bins (0: no bin conditioning)
    key_dim: int = 0  # domain-key width (0: no key conditioning)
    key_mix: float = 0.8  # condition = PixelNorm(key_mix * key_emb + (1 - key_mix) * label_emb)
    style_mixing_prob: float = 0.9
    mbstd_group: int = 4
    # D's score = unconditional head + projection on the condition; false: projection only, so
    # everything D knows about a site has to go through its client-id embedding
    d_unconditional: bool = True

    def __post_init__(self) -> None:
        checked = _check_fields({f.name: getattr(self, f.name) for f in fields(self)}, "factory")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def log2_resolution(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The synthesis resolutions 4, 8, ..., resolution."""
        return tuple(2**i for i in range(2, self.log2_resolution + 1))

    @property
    def label_dim(self) -> int:
        return self.n_clients + self.n_bins

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FactoryConfig":
        """A named preset ("tiny", "small", "paper") with field overrides."""
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "factory") -> "FactoryConfig":
        """Build from a plain dict (e.g. from YAML/JSON): optional ``preset`` plus field overrides."""
        return cls(**_check_fields(preset_values(cls, raw, where, PRESETS, "factory settings"), where))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field; ``FactoryConfig.from_dict(cfg.to_dict()) == cfg``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["channels"] = list(self.channels)
        return out
