"""Domain-key configurations (`validate_key_config`), checked without torch.

Checking an experiment spec's ``plan_args.key`` needs no key function, so this module
imports neither torch nor MONAI; `pipelines.factory.domain_key` builds the key functions
and re-exports these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedimg_core.errors import FedimgError


class KeyConfigError(FedimgError, ValueError):
    """A key configuration (or the encoder file it names) is unusable."""


_KINDS = ("none", "random_cnn", "histogram", "random_cnn+histogram", "encoder")
_DEFAULT_KIND = "random_cnn+histogram"
_COMMON = {"reference_seed": 0, "reference_count": 64}
_CNN = {"seed": 0, "widths": [16, 32, 64], "proj_dim": 64}
_HIST = {"bins": 32, "lo": -1.0, "hi": 1.0, "bandwidth": None}
REGISTRY_FOLDER = "registry"  # the only folder of the models directory a key file may name
_ENCODER = {"file": None, "sha256": None, "input_size": None, "channels": 1, "dim": None}
_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "random_cnn": {**_COMMON, **_CNN},
    "histogram": {**_COMMON, **_HIST},
    "random_cnn+histogram": {**_COMMON, **_CNN, **_HIST},
    "encoder": {**_COMMON, **_ENCODER},
}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _int(where: str, k: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KeyConfigError(f"{where}.{k}: must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise KeyConfigError(f"{where}.{k}: must be {bound}, got {v}")
    return v


def _float(where: str, k: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise KeyConfigError(f"{where}.{k}: must be a finite number, got {v!r}")
    return float(v)


def validate_key_config(raw: Mapping | None, where: str = "key") -> dict:
    """Check a key configuration without building it; return it normalised (defaults filled in).

    `None` and `{"kind": "none"}` give `{"kind": "none"}` (no key); `{}` gives the default
    random CNN + histogram key. Errors are `KeyConfigError("<where>.<field>: ...")`.
    """
    if raw is None:
        return {"kind": "none"}
    if not isinstance(raw, Mapping):
        raise KeyConfigError(f"{where}: must be a mapping or null, got {type(raw).__name__}")
    for k in raw:
        if not isinstance(k, str):
            raise KeyConfigError(f"{where}.{k}: option names must be strings")
    kind = raw.get("kind", _DEFAULT_KIND)
    if kind not in _KINDS:
        raise KeyConfigError(f"{where}.kind: must be one of {', '.join(_KINDS)}; got {kind!r}")
    allowed = _OPTIONS[kind]
    for k in raw:
        if k != "kind" and k not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise KeyConfigError(f"{where}.{k}: unknown option for kind {kind!r} (allowed: {names})")
    out: dict[str, Any] = {"kind": kind}
    for k, default in allowed.items():
        v = raw.get(k, default)
        if k in ("reference_seed", "seed"):
            v = _int(where, k, v, 0)
        elif k == "reference_count":
            v = _int(where, k, v, 1, 4096)
        elif k == "proj_dim":
            v = _int(where, k, v, 1, 4096)
        elif k == "widths":
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not 1 <= len(v) <= 8:
                raise KeyConfigError(f"{where}.widths: must be a list of 1 to 8 positive integers, got {v!r}")
            v = [_int(where, f"widths[{i}]", w, 1, 1024) for i, w in enumerate(v)]
        elif k == "bins":
            v = _int(where, k, v, 2, 1024)
        elif k in ("lo", "hi"):
            v = _float(where, k, v)
        elif k == "bandwidth":
            if v is not None:
                v = _float(where, k, v)
                if v <= 0:
                    raise KeyConfigError(f"{where}.bandwidth: must be positive, got {v}")
        elif k == "file":
            if not isinstance(v, str) or not v.strip():
                raise KeyConfigError(f"{where}.file: an encoder needs the name of its TorchScript file, got {v!r}")
            p = Path(v)
            if p.is_absolute() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != REGISTRY_FOLDER:
                raise KeyConfigError(
                    f"{where}.file: must be a path in the models directory's {REGISTRY_FOLDER}/ folder, where "
                    f"`site-agent adapt` puts registry entries (e.g. {REGISTRY_FOLDER}/factory/NAME/v0001/encoder.pt), got {v!r}"
                )  # fmt: skip
        elif k == "sha256":
            if v is not None:
                if not isinstance(v, str) or not _HEX64.match(v):
                    raise KeyConfigError(f"{where}.sha256: must be 64 hex digits, got {v!r}")
                v = v.lower()
        elif k in ("input_size", "dim"):
            if v is not None:
                v = _int(where, k, v, 1, 4096)
        elif k == "channels":
            if isinstance(v, bool) or v not in (1, 3):
                raise KeyConfigError(f"{where}.channels: must be 1 or 3, got {v!r}")
        out[k] = v
    if "lo" in out and not out["lo"] < out["hi"]:
        raise KeyConfigError(f"{where}.hi: must be greater than {where}.lo, got lo={out['lo']}, hi={out['hi']}")
    return out
