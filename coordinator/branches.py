"""Segmentation branches pushed by source sites: what the coordinator accepts, by construction.

A branch is exactly two files (see pipelines/adaptation/networks.py):

* ``branch.json`` -- its configuration: format and version, the class names it segments
  (background first), the generator feature channels and resolution it reads, its layer
  widths, and the factory it was trained on (name, version, sha256 of ``generator.pt``);
* ``branch.pt`` -- its weights: a flat dict of tensors whose names and shapes are those of
  the network that configuration builds, all finite.

The coordinator rebuilds the branch from the configuration and loads the weights strictly;
any other file, key, shape or value is refused before anything is written. The branch must
name a factory version this registry holds, with the same generator checksum. The push's
``meta`` is limited to the keys below (numbers, names and class names, nothing free-form
about patients). A branch is a small per-pixel classifier over generator features; like
any trained weights it is a function of its training data, and that is all it carries.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from coordinator import registry as R

KIND = "segmentation-branch"
META_KEYS = {"source_site", "source_client_id", "factory", "classes", "validation_dice", "steps", "published_by"}
_MAX_META_BYTES = 16 * 1024


def validate_files(files: Mapping[str, bytes]) -> None:
    from pipelines.adaptation.networks import validate_branch_files

    try:
        validate_branch_files(dict(files))
    except ValueError as exc:
        raise R.RegistryError(f"not a segmentation branch: {exc}") from None


def check_factory(reg: R.Registry, files: Mapping[str, bytes]) -> None:
    """The branch's factory must be a version of this registry with the same generator."""
    factory = json.loads(files["branch.json"])["factory"]
    name, version, sha = factory.get("name"), factory.get("version"), factory.get("sha256")
    try:
        record = reg.get("factory", name, version)
    except R.RegistryError:
        raise R.RegistryError(f"branch.json names factory {name} {version}, which this registry does not hold") from None
    held = (record.get("files") or {}).get("generator.pt", {}).get("sha256")
    if held != sha:
        raise R.RegistryError(f"branch.json names factory {name} {version} with generator sha256 {str(sha)[:12]}..., but the registry's is {str(held)[:12]}...")


def _plain(value: Any, depth: int = 0) -> bool:
    if depth > 3:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return not isinstance(value, str) or len(value) <= 256
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(isinstance(k, str) and len(k) <= 64 and _plain(v, depth + 1) for k, v in value.items())
    return False


def check_meta(meta: Mapping[str, Any]) -> dict:
    """Allowlisted keys with small plain JSON values; raises RegistryError naming the key."""
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise R.RegistryError(f"meta: key(s) {', '.join(unknown)} not allowed for a {KIND}; allowed: {', '.join(sorted(META_KEYS))}")
    for key, value in meta.items():
        if not _plain(value):
            raise R.RegistryError(f"meta.{key}: must be a small plain JSON value (strings <= 256 characters, lists/objects <= 64 entries)")
    if len(json.dumps(meta)) > _MAX_META_BYTES:
        raise R.RegistryError(f"meta: larger than {_MAX_META_BYTES} bytes")
    return dict(meta)


R.register_validator(KIND, validate_files)
