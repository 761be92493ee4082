"""SCAFFOLD's states (declearn auxiliary variables) in the experiment's wire form, beside the model.

Under ``aggregator: scaffold`` every round also carries, each way, one value per model
parameter: the site's change of its control variate ``c_i`` up, the sites' mean ``c`` down
(declearn's `ScaffoldAuxVar`, sent by Fed-BioMed next to the weights). Each `TorchVector` an
auxiliary variable holds travels as a one-entry `TorchVector` ``{WIRE_KEY: uint8 buffer}``
(`pipelines.wire`: the experiment's precision, a digest, a checked layout), so that a bf16 run
halves these bytes too; the receiver checks and widens it to float32 before declearn reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from declearn.model.api import Vector
from declearn.model.torch import TorchVector

from pipelines.wire import WIRE_KEY, encode_or_exact, merge_received

__all__ = ["aux_var_encoded", "decode_aux_var", "encode_aux_var", "encode_aux_vars", "vector_fields"]


def vector_fields(aux_var: Any) -> dict[str, Vector[Any]]:
    """An auxiliary variable's `Vector` fields (``state``, ``delta`` of a ``ScaffoldAuxVar``).

    Args:
        aux_var: a declearn ``AuxVar`` (a dataclass).

    Returns:
        field name -> vector; empty for anything else.
    """
    if not dataclasses.is_dataclass(aux_var) or isinstance(aux_var, type):
        return {}
    return {f.name: v for f in dataclasses.fields(aux_var) if isinstance(v := getattr(aux_var, f.name), Vector)}


def _is_encoded_vector(vector: Vector[Any]) -> bool:
    return isinstance(vector.coefs, Mapping) and WIRE_KEY in vector.coefs


def aux_var_encoded(aux_var: Any) -> bool:
    """Whether an auxiliary variable holds a vector in the wire form.

    Args:
        aux_var: a declearn ``AuxVar`` (a dataclass).

    Returns:
        True when one of its vectors is ``{WIRE_KEY: buffer}``.
    """
    return any(_is_encoded_vector(v) for v in vector_fields(aux_var).values())


def encode_aux_var(aux_var: Any, precision: str, warn: Callable[[str], None], what: str = "SCAFFOLD state") -> Any:
    """A copy of ``aux_var`` whose torch vectors are in the wire form (`pipelines.wire.encode_or_exact`).

    Args:
        aux_var: a declearn ``AuxVar`` (e.g. ``ScaffoldAuxVar``); scalars and other fields are kept.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        warn: told when fp16 cannot hold a value and the vector goes in fp32.
        what: the variable, as that warning names it.

    Returns:
        The auxiliary variable to send (the input is not modified).

    Raises:
        ValueError: a vector already encoded, or a dtype the wire form does not carry.
    """
    changes: dict[str, Vector[Any]] = {}
    for name, vector in vector_fields(aux_var).items():
        if not isinstance(vector, TorchVector):  # only torch vectors are ours to encode; others travel as Fed-BioMed sends them
            continue
        if _is_encoded_vector(vector):
            raise ValueError(f"{what}: {name} is already in the wire form")
        changes[name] = TorchVector(encode_or_exact(vector.coefs, precision, warn, f"{what} ({name})"))
    return dataclasses.replace(aux_var, **changes) if changes else aux_var


def decode_aux_var(aux_var: Any, strict: bool = False) -> Any:
    """A copy of ``aux_var`` whose wire-form vectors are checked and decoded to float32 torch vectors.

    Args:
        aux_var: a received declearn ``AuxVar``; one without wire-form vectors is returned as it is.
        strict: a wire-form vector must hold the buffer alone (the coordinator, reading a site's state);
            else plain entries beside it are kept (a node adds zero entries for its local parameters).

    Returns:
        The auxiliary variable declearn reads.

    Raises:
        WireChecksumError: a vector changed on its way or its layout is malformed.
        ValueError: (strict) plain entries beside the buffer.
    """
    changes: dict[str, Vector[Any]] = {}
    for name, vector in vector_fields(aux_var).items():
        if not _is_encoded_vector(vector):
            continue
        if strict and set(vector.coefs) != {WIRE_KEY}:
            raise ValueError(f"{name}: plain entries beside the checked buffer ({', '.join(sorted(k for k in vector.coefs if k != WIRE_KEY)[:3])})")
        changes[name] = TorchVector(merge_received(vector.coefs))
    return dataclasses.replace(aux_var, **changes) if changes else aux_var


def encode_aux_vars(aux_vars: Mapping[str, Any], precision: str, warn: Callable[[str], None]) -> dict[str, Any]:
    """`encode_aux_var` for each module's auxiliary variable (``{module: AuxVar}``, as Fed-BioMed sends them).

    Args:
        aux_vars: module name -> auxiliary variable.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        warn: told when a vector goes in fp32 instead of fp16.

    Returns:
        A new mapping; the input is not modified.
    """
    return {name: encode_aux_var(aux, precision, warn, f"{name} state") for name, aux in aux_vars.items()}
