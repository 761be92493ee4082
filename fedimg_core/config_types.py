"""Field types for config models: each checks one kind of value and says what is allowed.

Pydantic's own messages ("Input should be greater than or equal to 1") name neither the kind
of value nor the whole allowed range. The types here check a value before pydantic does and
word the problem as fedimg always has (``must be an integer >= 1 (got 0)``), while carrying
the same constraints as pydantic metadata, so the JSON Schema of a model (`json_schema`)
states them too. Use them as field metadata of a `fedimg_core.config.ConfigModel`::

    class Section(ConfigModel):
        rounds: Annotated[int, integer(minimum=1)] = Field(description="...")
        mode: Annotated[str, one_of("federated", "standalone")] = "federated"
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from annotated_types import GroupedMetadata
from pydantic import BaseModel, BeforeValidator, Field

from fedimg_core.config import did_you_mean, short

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "AbsolutePath",
    "Flag",
    "Text",
    "integer",
    "json_schema",
    "matches",
    "number",
    "one_of",
    "strings",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Rule(GroupedMetadata):
    """Pydantic metadata that travel together: the schema constraints and the worded check."""

    def __init__(self, constraints: Any, check: Callable[[object], object]) -> None:
        self.items = (constraints, BeforeValidator(check))

    def __iter__(self) -> Iterator[object]:
        return iter(self.items)


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f" >= {lo:g}"
    return f" <= {hi:g}" if hi is not None else ""


def integer(minimum: int | None = None, maximum: int | None = None) -> _Rule:
    """An integer (not a bool) in ``[minimum, maximum]``: ``Annotated[int, integer(1)]``.

    Args:
        minimum: smallest allowed value (None: no bound).
        maximum: largest allowed value (None: no bound).

    Returns:
        The field metadata; its problem reads ``must be an integer >= 1 (got 0)``.
    """

    def phrase(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"must be an integer{_range(minimum, maximum)} (got {short(value)})")
        return value

    return _Rule(Field(ge=minimum, le=maximum), phrase)


def number(minimum: float | None = None, maximum: float | None = None, *, positive: bool = False) -> _Rule:
    """A finite number (an integer is one; a bool is not) in ``[minimum, maximum]``: ``Annotated[float, number(0, 0.9)]``.

    Args:
        minimum: smallest allowed value (None: no bound).
        maximum: largest allowed value (None: no bound).
        positive: the value must be above 0 (rates, sizes).

    Returns:
        The field metadata (values become floats); its problem reads ``must be a number in
        [0, 0.9] (got 'x')`` or ``must be in [0, 0.9] (got 2)``.
    """
    wording = " > 0" if positive else _range(minimum, maximum)

    def phrase(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number{wording} (got {short(value)})")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number (got {value!r})")
        if (positive and value <= 0) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"must be{wording} (got {short(value)})")
        return value

    return _Rule(Field(ge=minimum, le=maximum, gt=0 if positive else None), phrase)


def one_of(*options: str, what: str = "") -> _Rule:
    """One of a fixed set of strings: ``Annotated[str, one_of("a", "b")]``.

    Args:
        *options: the allowed values, in the order messages list them.
        what: optional noun for the message (``unknown plan 'x' (known: ...)`` instead of
            ``must be one of ...``).

    Returns:
        The field metadata (a JSON Schema ``enum``); its problem reads ``must be one of a, b
        (got 'c'); did you mean 'a'?``.
    """
    allowed = list(options)
    enum: list[Any] = list(options)  # JSON-ready (pydantic types a schema extra as JsonValue)

    def phrase(value: object) -> object:
        if not isinstance(value, str) or value not in allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            if what:
                raise ValueError(f"unknown {what} {short(value)}{hint} (known: {', '.join(allowed)})")
            raise ValueError(f"must be one of {', '.join(allowed)} (got {short(value)}){hint}")
        return value

    return _Rule(Field(json_schema_extra={"enum": enum}), phrase)


def matches(regex: str, wording: str) -> _Rule:
    """A string matching ``regex`` (a name, an id): ``Annotated[str, matches(r"^[a-z]+$", "lower-case letters")]``.

    Args:
        regex: the pattern, anchored with ``^...$`` (JSON Schema and Python read it alike).
        wording: what the pattern allows, in words (``1-64 of letters, digits, _ . -``).

    Returns:
        The field metadata; its problem reads ``must be <wording> (got 'x')``.
    """
    compiled = re.compile(regex)

    def phrase(value: object) -> object:
        if not isinstance(value, str) or not compiled.match(value):
            raise ValueError(f"must be {wording} (got {short(value)})")
        return value

    return _Rule(Field(pattern=regex), phrase)


def strings(min_items: int = 0) -> _Rule:
    """A list of non-empty strings: ``Annotated[list[str], strings(1)]``.

    Args:
        min_items: the fewest entries allowed.

    Returns:
        The field metadata; its problem reads ``must be a list of non-empty strings (got ...)``.
    """

    def phrase(value: object) -> object:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"must be a list of non-empty strings (got {short(value)})")
        if len(value) < min_items:
            raise ValueError(f"must list at least {min_items} (got {short(value)})")
        return value

    items: dict[str, Any] = {"type": "string", "minLength": 1}
    return _Rule(Field(min_length=min_items or None, json_schema_extra={"items": items}), phrase)


def _text(value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string (got {short(value)})")
    return value.strip()


Text = Annotated[str, Field(min_length=1, pattern=r"\S"), BeforeValidator(_text)]
"""A non-empty string; surrounding blanks are dropped."""


def _flag(value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false (got {short(value)})")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
"""true or false (YAML's yes/no are booleans too; "true" in quotes is not)."""


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value or not Path(value).is_absolute():
        raise ValueError(f"must be an absolute path (got {short(value)})")
    return Path(value)


AbsolutePath = Annotated[Path, BeforeValidator(_absolute)]
"""An absolute file-system path, written as a string; the model holds a `Path`."""


def json_schema(model: type[BaseModel], *, schema_id: str, title: str, description: str) -> dict[str, Any]:
    """The published JSON Schema (Draft 2020-12) of a config model, for editors and other tools.

    Args:
        model: the config model.
        schema_id: the schema's ``$id`` (a URI naming it).
        title: a short title.
        description: what the file is, one or two sentences.

    Returns:
        The schema as a JSON-ready dict, ``$schema`` and ``$id`` first.
    """
    body = model.model_json_schema(mode="validation")
    body.pop("title", None)
    body.pop("description", None)
    # pydantic titles every key after its name ("wait_s" -> "Wait S"): noise in an editor's hover
    for section in [body, *body.get("$defs", {}).values()]:
        for prop in section.get("properties", {}).values():
            prop.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id, "title": title, "description": description, **body}
