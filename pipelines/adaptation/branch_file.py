"""The uploaded segmentation-branch file format: exactly ``branch.json`` + ``branch.pt``, checked by construction.

A site publishes its trained branch as these two files and the coordinator accepts them from
the network (`coordinator.branches`), so this module is a security boundary: every key,
type, range, tensor name, shape, dtype and value is checked, the weights are read with
``torch.load(weights_only=True)`` and the branch is rebuilt from the configuration, never
unpickled. ``branch.json`` is a `pipelines.adaptation.config.BranchConfig`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import torch

from fedimg_core.config import short
from pipelines.adaptation.branch import SegmentationBranch
from pipelines.adaptation.config import BRANCH_FORMAT, FACTORY_KEYS, BranchConfig
from pipelines.config_fields import ConfigValueError, check_model

__all__ = [
    "BRANCH_CONFIG_FILE",
    "BRANCH_FORMAT",
    "BRANCH_WEIGHTS_FILE",
    "BranchFileError",
    "branch_files",
    "load_branch",
    "validate_branch_config",
    "validate_branch_files",
]

BRANCH_CONFIG_FILE = "branch.json"
BRANCH_WEIGHTS_FILE = "branch.pt"
_MAX_CONFIG_BYTES = 1 << 20


class BranchFileError(ConfigValueError):
    """A published branch (its files, configuration or weights) is refused; the message names the file and the problem."""


def validate_branch_config(config: Any, where: str = "branch") -> dict[str, Any]:
    """Check a branch configuration: exactly its keys, every type and range.

    Args:
        config: the parsed ``branch.json``.
        where: what messages call it (``branch.json``).

    Returns:
        A normalised copy (lists, plain strings).

    Raises:
        BranchFileError: (a ValueError) naming ``<where>.<key>`` and the problem.
    """
    if not isinstance(config, Mapping):
        raise BranchFileError.of(where, f"must be a JSON object (got {type(config).__name__})")
    keys = list(BranchConfig.model_fields)
    extra = sorted(map(str, set(config) - set(keys)))
    missing = [k for k in keys if k not in config]
    if extra:
        raise BranchFileError.of(where, f"unknown key(s) {', '.join(extra)}; allowed: {', '.join(keys)}")
    if missing:
        raise BranchFileError.of(where, f"missing key(s) {', '.join(missing)}")
    factory = config["factory"]
    if not isinstance(factory, Mapping) or set(factory) != set(FACTORY_KEYS):
        got = sorted(map(str, factory)) if isinstance(factory, Mapping) else type(factory).__name__
        raise BranchFileError.of(f"{where}.factory", f"must be an object with exactly the keys {', '.join(FACTORY_KEYS)} (got {got})")
    return check_model(BranchConfig, config, where, BranchFileError).to_dict()


def load_branch(config: Mapping[str, Any], state: Mapping[str, Any]) -> SegmentationBranch:
    """Rebuild a published branch from its config and tensor state dict, refusing anything but exactly the expected weights.

    Args:
        config: the ``branch.json`` content.
        state: tensor name -> tensor (as ``torch.load(weights_only=True)`` read it).

    Returns:
        The branch, in eval mode (CPU, the configuration's dtypes).

    Raises:
        BranchFileError: (a ValueError) naming the key or tensor and the problem.
    """
    branch = SegmentationBranch.from_config(validate_branch_config(config))
    if not isinstance(state, Mapping):
        raise BranchFileError(f"branch weights: must be a mapping of names to tensors (got {type(state).__name__})")
    expected = branch.state_dict()
    keys = set(state)
    bad_names = [k for k in keys if not isinstance(k, str)]
    if bad_names:
        raise BranchFileError(f"branch weights: non-string key(s) {short(bad_names)}")
    extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
    if extra:
        raise BranchFileError(f"branch weights: unexpected key(s) {', '.join(extra[:10])}")
    if missing:
        raise BranchFileError(f"branch weights: missing key(s) {', '.join(missing[:10])}")
    clean: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise BranchFileError(f"branch weights: {name} is not a tensor (got {type(t).__name__})")
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise BranchFileError(f"branch weights: {name} must be a dense tensor (got layout {t.layout})")
        if tuple(t.shape) != tuple(ref.shape):
            raise BranchFileError(f"branch weights: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if ref.dtype.is_floating_point:
            if not t.dtype.is_floating_point:
                raise BranchFileError(f"branch weights: {name} must be floating point (got {t.dtype})")
            if not torch.isfinite(t).all():
                raise BranchFileError(f"branch weights: {name} has non-finite values")
            if name.endswith("running_var") and bool((t < 0).any()):
                raise BranchFileError(f"branch weights: {name} has negative variances")
        else:
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise BranchFileError(f"branch weights: {name} must be an integer tensor (got {t.dtype})")
            if bool((t < 0).any()):
                raise BranchFileError(f"branch weights: {name} must be >= 0")
        clean[name] = t.detach().to("cpu", ref.dtype)
    branch.load_state_dict(clean, strict=True)
    return branch.eval()


def branch_files(branch: SegmentationBranch) -> dict[str, bytes]:
    """The files a branch is published as.

    Args:
        branch: the trained branch.

    Returns:
        ``{"branch.json": config (UTF-8 JSON), "branch.pt": state dict, CPU tensors only}``.
    """
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().clone().contiguous() for k, v in branch.state_dict().items()}, buf)
    text = json.dumps(branch.config(), indent=2, sort_keys=True) + "\n"
    return {BRANCH_CONFIG_FILE: text.encode("utf-8"), BRANCH_WEIGHTS_FILE: buf.getvalue()}


_MAX_CONFIG_BYTES = 1 << 20


def validate_branch_files(files: Mapping[str, bytes]) -> SegmentationBranch:
    """Check a published branch: exactly branch.json + branch.pt, the JSON a valid config, the weights a weights-only torch file matching it.

    Args:
        files: file name -> bytes, as uploaded.

    Returns:
        The branch (`load_branch`), in eval mode.

    Raises:
        BranchFileError: (a ValueError) naming the file and the problem.
    """
    if not isinstance(files, Mapping):
        raise BranchFileError(f"branch files: must map file names to bytes (got {type(files).__name__})")
    expected = {BRANCH_CONFIG_FILE, BRANCH_WEIGHTS_FILE}
    names = set(files)
    if names != expected:
        extra = sorted(map(str, names - expected))
        missing = sorted(expected - names)
        parts = ([f"unexpected {', '.join(extra)}"] if extra else []) + ([f"missing {', '.join(missing)}"] if missing else [])
        raise BranchFileError(f"branch files: expected exactly {BRANCH_CONFIG_FILE} and {BRANCH_WEIGHTS_FILE} ({'; '.join(parts)})")
    for name in sorted(expected):
        if not isinstance(files[name], (bytes, bytearray, memoryview)):
            raise BranchFileError(f"{name}: must be bytes (got {type(files[name]).__name__})")
    raw = bytes(files[BRANCH_CONFIG_FILE])
    if len(raw) > _MAX_CONFIG_BYTES:
        raise BranchFileError(f"{BRANCH_CONFIG_FILE}: too large ({len(raw)} bytes)")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BranchFileError(f"{BRANCH_CONFIG_FILE}: not valid UTF-8 JSON ({exc})") from None
    validate_branch_config(config, where=BRANCH_CONFIG_FILE)
    try:
        state = torch.load(io.BytesIO(bytes(files[BRANCH_WEIGHTS_FILE])), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BranchFileError(f"{BRANCH_WEIGHTS_FILE}: not a weights-only torch file ({first})") from None
    if not isinstance(state, Mapping):
        raise BranchFileError(f"{BRANCH_WEIGHTS_FILE}: must hold a dict of tensors (got {type(state).__name__})")
    try:
        return load_branch(config, state)
    except ValueError as exc:
        raise BranchFileError(f"{BRANCH_WEIGHTS_FILE}: {exc}") from None
