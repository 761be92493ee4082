"""Segmentation branches pushed by source sites: what the coordinator accepts, by construction.

A branch is exactly two files (the format: pipelines/adaptation/branch_file.py):

* ``branch.json`` -- its configuration: format and version, the class names it segments
  (background first), the generator feature channels and resolution it reads, its layer
  widths, and the factory it was trained on (name, version, sha256 of ``generator.pt``);
* ``branch.pt`` -- its weights: a flat dict of tensors whose names and shapes are those of
  the network that configuration builds, all finite.

The coordinator rebuilds the branch from the configuration and loads the weights strictly;
any other file, key, shape, dtype or value is refused before anything is written, and what
is stored is the rebuilt branch serialised afresh, never the pushed bytes. The branch must
name a factory version this registry holds (same generator checksum, feature channels and
resolution) and segment classes of its schema. The record's ``meta`` is built by the
coordinator (who pushed, that site's client id, the factory and classes from the validated
configuration); the site contributes only per-class validation Dice and a step count
(`PushedMeta`). A branch is a small per-pixel classifier over generator features; like any
trained weights it is a function of its training data, and that is all it carries.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError, ValidationInfo, field_validator

from coordinator import registry as R
from fedimg_core.config import ConfigModel, problems_of, short
from pipelines.config_fields import is_number, worded_integer

KIND = "segmentation-branch"


def _dice(value: Any) -> dict[str, float | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must map class names to numbers in [0, 1] or null")
    for k, v in value.items():
        if not (v is None or (is_number(v) and 0 <= v <= 1)):
            raise ValueError(f"{short(k)}: keys must be the branch's classes, values numbers in [0, 1] or null")
    return {str(k): None if v is None else float(v) for k, v in value.items()}


class PushedMeta(ConfigModel):
    """The ``meta`` a site pushes with a branch. Only ``validation_dice`` and ``steps`` are kept;
    the other keys are allowed (a site's own record may carry them) but the coordinator writes them."""

    source_site: Any = None
    source_client_id: Any = None
    factory: Any = None
    classes: Any = None
    published_by: Any = None
    validation_dice: Annotated[dict[str, float | None], BeforeValidator(_dice)] = {}  # {class: Dice in [0, 1] or null}
    steps: Annotated[int | None, worded_integer(1, 10**9 - 1, message="must be a positive integer", optional=True)] = None

    @field_validator("validation_dice")
    @classmethod
    def _branch_classes(cls, value: dict[str, float | None], info: ValidationInfo) -> dict[str, float | None]:
        classes = (info.context or {}).get("classes", ())
        for k in value:
            if k not in classes:
                raise ValueError(f"{k!r}: keys must be the branch's classes, values numbers in [0, 1] or null")
        return value


META_KEYS = set(PushedMeta.model_fields)


def validate_files(files: Mapping[str, bytes]) -> None:
    """Refuse anything but a valid branch (`pipelines.adaptation.branch_file.validate_branch_files`).

    Raises:
        RegistryError: naming the file and the problem.
    """
    # deferred: start-up time (torch is imported only when a branch is pushed: the coordinator's other commands stay light)
    from pipelines.adaptation.branch_file import validate_branch_files

    try:
        validate_branch_files(dict(files))
    except ValueError as exc:
        raise R.RegistryError(f"not a segmentation branch: {exc}") from None


def canonical_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The branch as the coordinator rebuilds it, serialised afresh: what is stored is never
    the pushed bytes, so nothing outside the validated configuration and weights (an extra
    zip member, a tensor's hidden storage, duplicate JSON keys, padding) survives. Weights
    must be float32 (int64 for batch-norm counters)."""
    import torch

    from pipelines.adaptation.branch_file import branch_files, validate_branch_files

    try:
        branch = validate_branch_files(dict(files))
        state = torch.load(io.BytesIO(files["branch.pt"]), map_location="cpu", weights_only=True)
    except ValueError as exc:
        raise R.RegistryError(f"not a segmentation branch: {exc}") from None
    for key, value in state.items():
        want = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        if value.dtype != want:
            raise R.RegistryError(f"not a segmentation branch: branch.pt: {key} is {value.dtype}, expected {want}")
    return branch_files(branch)


def _factory_json(reg: R.Registry, name: str, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        record = reg.get("factory", name, version)
        folder = reg.path("factory", name, record["version"])
    except R.RegistryError:
        raise R.RegistryError(f"branch.json names factory {name} {version}, which this registry does not hold") from None
    try:
        meta = json.loads((folder / "factory.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return record, meta


def check_factory(reg: R.Registry, files: Mapping[str, bytes]) -> dict[str, Any]:
    """The branch must read a factory version this registry holds (same generator checksum,
    same feature channels and resolution) and segment classes of that factory's schema,
    background first. Returns the factory's description (factory.json)."""
    config = json.loads(files["branch.json"])
    factory = config["factory"]
    name, version, sha = factory.get("name"), factory.get("version"), factory.get("sha256")
    if not R._VERSION.match(version or ""):
        raise R.RegistryError(f"branch.json: factory.version must be an explicit version like v0001 (got {version!r})")
    record, meta = _factory_json(reg, name, version)
    held = (record.get("files") or {}).get("generator.pt", {}).get("sha256")
    if held != sha:
        raise R.RegistryError(f"branch.json names factory {name} {version} with generator sha256 {str(sha)[:12]}..., but the registry's is {str(held)[:12]}...")
    fcfg = meta.get("factory") or {}
    if fcfg and (list(fcfg.get("channels", [])) != config["feature_channels"] or fcfg.get("resolution") != config["resolution"]):
        raise R.RegistryError(
            f"branch.json: feature_channels {config['feature_channels']} / resolution {config['resolution']} do not match "
            f"factory {name} {version} ({fcfg.get('channels')} / {fcfg.get('resolution')})"
        )
    names = config["class_names"]
    if names[0] != "background":
        raise R.RegistryError(f"branch.json: class_names must start with background (got {names[0]!r})")
    schema = meta.get("schema_definition") or {}
    known = set((schema.get("classes") or {}).keys())
    unknown = [n for n in names[1:] if n not in known or n == "background"]
    if known and unknown:
        raise R.RegistryError(f"branch.json: class(es) {', '.join(unknown)} are not foreground classes of factory {name} {version}'s label schema")
    return meta


def server_meta(meta: Mapping[str, Any], files: Mapping[str, bytes], factory_meta: dict[str, Any], site: str) -> dict[str, Any]:
    """The record's meta, built by the coordinator: who pushed it, that site's client id in
    the factory, the factory and classes from the validated branch.json; from the pushing
    site only ``validation_dice`` ({class: number in [0, 1] or null}) and ``steps`` (int)."""
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise R.RegistryError(f"meta: key(s) {', '.join(unknown)} not allowed for a {KIND}; allowed: {', '.join(sorted(META_KEYS))}")
    config = json.loads(files["branch.json"])
    try:
        pushed = PushedMeta.model_validate(dict(meta), context={"classes": config["class_names"][1:]})
    except ValidationError as exc:
        key, problem = problems_of(exc, PushedMeta, "meta.")[0]
        raise R.RegistryError(f"{key}: {problem}") from None
    dice, steps = pushed.validation_dice, pushed.steps
    clients = factory_meta.get("clients") or {}
    return {
        "source_site": site,
        "source_client_id": clients.get(site) if isinstance(clients.get(site), int) else None,
        "factory": dict(config["factory"]),
        "classes": list(config["class_names"]),
        "validation_dice": dict(dice),
        "steps": steps,
        "published_by": site,
    }


R.register_validator(KIND, validate_files)
