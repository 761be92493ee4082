"""What a config model accepts at a key path: the keys of a nested mapping, the values a missing key takes.

Walks a pydantic model's field annotations (nested models, ``X | None``, ``Annotated[...]``,
lists and dicts of models) so that `fedimg_core.config_problems` can say "did you mean" and
"required: a mapping with keys ..." for a problem found anywhere in a nested config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

__all__ = ["allowed_keys", "what_it_takes"]


def allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str] | None:
    """The keys a mapping at ``loc`` accepts, following nested models, lists and dicts of them.

    Args:
        model: the model validated.
        loc: the location of the mapping inside it (a pydantic error location).

    Returns:
        The keys (aliases where set), sorted, or None when the location holds no model.
    """
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return None
    found = _model_at(current)
    return sorted(info.alias or name for name, info in found.model_fields.items()) if found is not None else None


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold: ``Annotated[X, ...]`` is X, ``X | Y`` is X and Y (None dropped)."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [m for arg in get_args(annotation) if arg is not type(None) for m in _members(arg)]
    return [annotation]


def _model_at(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (``Sub``, ``Sub | None``, ``Annotated[Sub, ...]``), if any."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _step(annotation: Any, part: int | str) -> Any:
    """The annotation of ``part`` inside a value of ``annotation``: a model's field, a dict's value, a list's item (None: unknown)."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name, info in member.model_fields.items():
                if part in (name, info.alias):
                    return info.annotation
            continue
        origin, args = get_origin(member), get_args(member)
        if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
            return args[1]  # ``part`` is a key of the dict (``modalities.CT``)
        if isinstance(part, int) and isinstance(origin, type) and issubclass(origin, (list, tuple, Sequence)) and args:
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                return args[part] if part < len(args) else None
            return args[0]
    return None


def what_it_takes(model: type[BaseModel], loc: Sequence[int | str]) -> str:
    """What a missing key takes, to follow "required" in a message.

    Args:
        model: the model validated.
        loc: the missing key's location.

    Returns:
        ``": 'fedimg-label-schema'"`` (its allowed values), ``": a mapping with keys a, b"`` (a
        nested model), or ``""`` when there is nothing short to say.
    """
    parent: Any = model
    for part in loc[:-1]:
        parent = _step(parent, part)
        if parent is None:
            return ""
    annotation = _step(parent, loc[-1]) if loc else None
    if annotation is None:
        return ""
    owner = _model_at(parent)
    info = owner.model_fields.get(str(loc[-1])) if owner is not None else None
    for item in info.metadata if info is not None else ():
        for piece in item if isinstance(item, Iterable) else (item,):
            extra = getattr(piece, "json_schema_extra", None)  # a field type's allowed values (config_types.one_of)
            if isinstance(extra, dict) and isinstance(extra.get("enum"), list):
                return ": " + " or ".join(repr(v) for v in extra["enum"])
    for member in _members(annotation):
        if get_origin(member) is Literal:
            return ": " + " or ".join(repr(v) for v in get_args(member))
    sub = _model_at(annotation)
    if sub is not None:
        return ": a mapping with keys " + ", ".join(sorted(info.alias or name for name, info in sub.model_fields.items()))
    return ""
