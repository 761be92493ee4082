"""How a model's parameters travel between the coordinator and the sites: one checked buffer.

Fed-BioMed sends a state dict as msgpack, each tensor framed on its own (about 70 bytes of
names and type tags per tensor: 4 % of a small model), cut into 4 MB gRPC chunks.
`encode_params` packs the whole state dict into one uint8 tensor under `WIRE_KEY`:

    [8 bytes: length of the record][record: zlib-compressed JSON][data: every tensor's bytes]

The record lists each tensor's name, dtype and shape (the layout), the precision and the
SHA-256 of layout and data. Floating tensors may be rounded to bf16 or fp16 on the way (half
the bytes). `decode_params` checks the digest and returns float32 tensors, so averaging and
the model stay float32 whatever travelled; a message that changed on its way (a truncated or
corrupted transfer or file) raises `WireChecksumError` instead of loading.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedimg_core.devices import TRANSFER_PRECISIONS

__all__ = [
    "PRECISIONS",
    "WIRE_KEY",
    "WireChecksumError",
    "decode_params",
    "encode_params",
    "is_encoded",
    "merge_received",
    "transfer_precision",
]

WIRE_KEY = "__fedimg_wire__"  # no torch module attribute starts with "__": never a parameter name
PRECISIONS = TRANSFER_PRECISIONS
WIRE_FORMAT = 1
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
                               torch.int8, torch.uint8, torch.bool)}  # fmt: skip
_HEADER = 8  # bytes of the record's length, little-endian
MAX_RECORD_BYTES = 64 << 20  # a layout record inflates to far less (a 100 M-parameter network's: ~40 kB)
FP16_MAX = float(torch.finfo(torch.float16).max)


class WireChecksumError(ValueError):
    """A received model does not match the digest it was sent with, or its wire form is unreadable."""


def is_encoded(params: Mapping[str, Any]) -> bool:
    """Whether a parameter mapping carries a model in the fedimg wire form (`WIRE_KEY`)."""
    return WIRE_KEY in params


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (on the CPU, contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _digest(layout: bytes, data: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(len(layout).to_bytes(_HEADER, "little"))
    h.update(layout)
    h.update(data.data)  # the array's buffer, no copy
    return h.hexdigest()


def encode_params(params: Mapping[str, Any], precision: str = "fp32") -> dict[str, torch.Tensor]:
    """A state dict in the wire form: ``{WIRE_KEY: one uint8 tensor}``.

    Floating tensors are sent in ``precision``; integer tensors (e.g. BatchNorm's
    ``num_batches_tracked``) unchanged.

    Args:
        params: name -> tensor, as ``get_weights`` gives it.
        precision: ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        The one-entry mapping to send (the input is not modified).

    Raises:
        ValueError: an unknown precision, an input already encoded, a dtype the format does not
            carry, or (fp16) a value beyond fp16's range (+-65504), named with its parameter;
            bf16 has float32's range.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"transfer precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if WIRE_KEY in params:
        raise ValueError("these parameters are already in the wire form")
    half = _HALF.get(precision)
    layout: list[list[Any]] = []
    chunks: list[torch.Tensor] = []
    for name, value in params.items():
        t = torch.as_tensor(value).detach()
        if half is not None and t.is_floating_point() and t.dtype != half:
            if half is torch.float16 and t.numel() and float(t.abs().max()) > FP16_MAX:
                raise ValueError(f"{name}: values beyond fp16's range (|x| > {FP16_MAX:g}); send this model in bf16 or fp32")
            t = t.to(half)
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be sent")
        layout.append([name, str(t.dtype), list(t.shape)])
        chunks.append(_flat_bytes(t))
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    layout_json = json.dumps(layout, separators=(",", ":")).encode()
    record = {"format": WIRE_FORMAT, "precision": precision, "byteorder": sys.byteorder, "layout": layout, "sha256": _digest(layout_json, data.numpy())}
    packed_record = zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 6)
    head = torch.frombuffer(bytearray(len(packed_record).to_bytes(_HEADER, "little") + packed_record), dtype=torch.uint8)
    return {WIRE_KEY: torch.cat([head, data])}


def decode_params(params: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a received mapping, checked against their digest; floating ones in ``dtype``.

    A mapping without `WIRE_KEY` (plain Fed-BioMed tensors) is returned with its floating
    tensors in ``dtype`` and nothing checked.

    Args:
        params: what was received.
        dtype: the floating dtype to return (float32: the model's and the aggregate's).

    Returns:
        name -> tensor (new tensors, not views of the message).

    Raises:
        WireChecksumError: the digest does not match (the message changed on its way), or the
            wire form is unreadable or mixed with plain entries.
    """
    if WIRE_KEY not in params:
        return {k: _as_float(torch.as_tensor(v), dtype) for k, v in params.items()}
    if len(params) != 1:
        raise WireChecksumError(f"a wire-form model carries {len(params) - 1} entries besides its buffer")
    buf = torch.as_tensor(params[WIRE_KEY])
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < _HEADER:
        raise WireChecksumError("the model's wire buffer is not a flat byte tensor")
    raw = buf.contiguous().numpy()
    n = int.from_bytes(raw[:_HEADER].tobytes(), "little")
    if n > raw.size - _HEADER:
        raise WireChecksumError(f"the model's wire record is cut short ({raw.size} bytes received)")
    unreadable = WireChecksumError(f"the model's wire record is unreadable (not fedimg wire format {WIRE_FORMAT})")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(raw[_HEADER : _HEADER + n].tobytes(), MAX_RECORD_BYTES)
        if inflate.unconsumed_tail:  # a record larger than any model's layout: refused before it fills memory
            raise WireChecksumError(f"the model's wire record inflates beyond {MAX_RECORD_BYTES:,} bytes")
        record = json.loads(text)
        layout, sha = record["layout"], record["sha256"]
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise exc if isinstance(exc, WireChecksumError) else unreadable from None
    if record.get("format") != WIRE_FORMAT or not isinstance(sha, str) or not isinstance(layout, list):
        raise unreadable
    if record.get("byteorder", "little") != sys.byteorder:
        raise WireChecksumError(f"the model was sent from a {record.get('byteorder')}-endian machine; this one is {sys.byteorder}-endian")
    data = raw[_HEADER + n :]
    layout_json = json.dumps(layout, separators=(",", ":")).encode()
    got = _digest(layout_json, data)
    if got != sha:
        raise WireChecksumError(f"checksum mismatch: the model was sent with sha256 {sha[:16]}..., received {got[:16]}... "
                                f"({data.size} data bytes)")  # fmt: skip
    # the digest is no signature (anyone can compute one): every entry is checked before it is used
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in layout:
        name, wire_dtype, shape = _entry(entry)
        count = math.prod(shape)
        size = count * torch.empty(0, dtype=wire_dtype).element_size()
        if offset + size > data.size:
            raise WireChecksumError(f"{name}: the model's layout runs past its {data.size} data bytes")
        # a copy per tensor: aligned for its dtype (the buffer packs tensors at any byte), and not a view of the message
        chunk = torch.from_numpy(data[offset : offset + size].copy())
        out[name] = _as_float(chunk.view(wire_dtype).reshape(shape), dtype)
        offset += size
    if offset != data.size:
        raise WireChecksumError(f"the model's layout covers {offset} of {data.size} data bytes")
    return out


def _entry(entry: Any) -> tuple[str, torch.dtype, tuple[int, ...]]:
    """One layout entry, checked: [name, dtype, shape] with a known dtype and a shape of non-negative integers."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[2], list)):
        raise WireChecksumError("the model's layout has a malformed entry")
    name, dtype_name, shape = entry
    wire_dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if wire_dtype is None:
        raise WireChecksumError(f"{name[:80]}: dtype {str(dtype_name)[:40]} is not carried by the wire format")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape) or len(shape) > 8:
        raise WireChecksumError(f"{name[:80]}: the shape is not up to 8 non-negative integers")
    return name, wire_dtype, tuple(shape)


def merge_received(weights: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A node's full weights with a received wire-form model decoded over them.

    Fed-BioMed's node merges ``{**initial, **persistent, **received}`` before loading; with a
    wire-form model ``received`` is one `WIRE_KEY` entry, decoded here so the received
    tensors win as they would have.

    Args:
        weights: the merged mapping, possibly with a `WIRE_KEY` entry.
        dtype: the floating dtype of the decoded tensors.

    Returns:
        The mapping without `WIRE_KEY`, received tensors in place.

    Raises:
        WireChecksumError: the received model fails its check.
    """
    if WIRE_KEY not in weights:
        return dict(weights)
    rest = {k: v for k, v in weights.items() if k != WIRE_KEY}
    return {**rest, **decode_params({WIRE_KEY: weights[WIRE_KEY]}, dtype)}


def encode_or_exact(params: Mapping[str, Any], precision: str, warn: Callable[[str], None], what: str) -> dict[str, torch.Tensor]:
    """`encode_params`, falling back to fp32 for this one message where fp16 cannot hold a value.

    Args:
        params: name -> tensor.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        warn: told why a message goes in fp32 instead (e.g. a logger's ``warning``).
        what: the message, as the warning names it (``"update"``, ``"global model"``).

    Returns:
        The one-entry mapping to send.

    Raises:
        ValueError: what `encode_params` raises, in fp32.
    """
    try:
        return encode_params(params, precision)
    except ValueError as exc:  # fp16 and a value beyond its range: this message goes exact (the receiver reads either)
        if precision == "fp32":
            raise
        warn(f"{what}: {exc}; sent in fp32 this round")
        return encode_params(params, "fp32")


def transfer_precision(model_args: Mapping[str, Any] | None) -> str | None:
    """The wire precision the experiment asks for, or None when its coordinator sets none.

    Args:
        model_args: the plan's model arguments.

    Returns:
        ``fp32``, ``bf16``, ``fp16`` or None.

    Raises:
        ValueError: a precision the wire format does not know.
    """
    transfer = (model_args or {}).get("transfer")
    if not isinstance(transfer, Mapping):
        return None
    precision = transfer.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"model_args.transfer.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return str(precision)


def transfer_states(model_args: Mapping[str, Any] | None) -> bool:
    """Whether the experiment's optimizer states (SCAFFOLD's) travel in the wire form too (`pipelines.wire_aux`).

    Args:
        model_args: the plan's model arguments.

    Returns:
        True when the coordinator set ``transfer.states`` (runs it started from 2026-12-06 on).
    """
    transfer = (model_args or {}).get("transfer")
    return isinstance(transfer, Mapping) and transfer.get("states") is True


def _as_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
