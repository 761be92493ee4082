"""Field types for config models: each checks one kind of value and says what is allowed.

Pydantic's own messages ("Input should be greater than or equal to 1") name neither the kind
of value nor the whole allowed range. The types here check a value before pydantic does and
word the problem as fedimg always has (``must be an integer >= 1 (got 0)``), while carrying
the same constraints as pydantic metadata, so the JSON Schema of a model (`json_schema`)
states them too. A field may word its problem its own way (``message="must be a positive
integer (got {got})"``) and allow None (``optional=True``); numpy numbers are accepted (the
science's constructors take them). Use them as field metadata of a
`fedimg_core.config.ConfigModel`::

    class Section(ConfigModel):
        rounds: Annotated[int, integer(minimum=1)] = Field(description="...")
        mode: Annotated[str, one_of("federated", "standalone")] = "federated"
        steps: Annotated[int | None, integer(1, optional=True)] = None
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, SupportsFloat, SupportsIndex, cast

from annotated_types import GroupedMetadata
from pydantic import BaseModel, BeforeValidator, Field

from fedimg_core.config import did_you_mean, short

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "AbsolutePath",
    "FieldRule",
    "Flag",
    "Text",
    "integer",
    "integer_list",
    "is_int",
    "is_number",
    "is_plain_name",
    "json_schema",
    "matches",
    "number",
    "one_of",
    "plain_name",
    "strings",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class FieldRule(GroupedMetadata):
    """What the field types below return: the schema constraints and the worded check, as one piece of pydantic metadata.

    Args:
        constraints: a `pydantic.Field` carrying the constraints the JSON Schema states.
        check: the worded check, run before pydantic's own (it raises ``ValueError(problem)``).
    """

    def __init__(self, constraints: Any, check: Callable[[object], object]) -> None:
        self.items = (constraints, BeforeValidator(check))

    def __iter__(self) -> Iterator[object]:
        """The metadata pydantic applies: the constraints, then the check.

        Returns:
            An iterator over both.
        """
        return iter(self.items)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def _is_real(value: object) -> bool:
    """An int or float, Python's or numpy's (finite or not), not a boolean."""
    if _is_bool(value):
        return False
    return isinstance(value, (int, float)) or (type(value).__module__ == "numpy" and hasattr(value, "__float__"))


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (numpy's too), not a boolean.

    Args:
        value: the value to test.

    Returns:
        True for ``int`` and ``numpy.integer`` values other than booleans.
    """
    if _is_bool(value):
        return False
    return isinstance(value, int) or (type(value).__module__ == "numpy" and hasattr(value, "__index__"))


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite real number (int, float or their numpy kinds), not a boolean.

    Args:
        value: the value to test.

    Returns:
        True for a finite number.
    """
    if is_int(value):
        return True
    if not _is_real(value):
        return False
    try:
        return math.isfinite(float(cast(SupportsFloat, value)))
    except (TypeError, ValueError):
        return False


def is_plain_name(value: object) -> bool:
    """Whether ``value`` is a plain name usable as one file-name component.

    Args:
        value: the value to test.

    Returns:
        True for a non-empty string of letters, digits, ``-``, ``_`` and ``.``, other than
        ``.`` and ``..`` (no separator, no way up).
    """
    return isinstance(value, str) and bool(value) and value not in (".", "..") and all(c.isalnum() or c in "-_." for c in value)


def _bound(value: float) -> str:
    # an integer bound exactly (999999999, not 1e+09); a float one briefly (0.001, 100)
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range(lo: float | None, hi: float | None, exclusive: bool = False) -> str:
    """The allowed range in words, with a leading blank: `` in [lo, hi]``, `` >= lo``, `` > lo and <= hi``."""
    if lo is not None and hi is not None and not exclusive:
        return f" in [{_bound(lo)}, {_bound(hi)}]"
    parts = ([f"{'>' if exclusive else '>='} {_bound(lo)}"] if lo is not None else []) + ([f"<= {_bound(hi)}"] if hi is not None else [])
    return " " + " and ".join(parts) if parts else ""


def _within(value: float, lo: float | None, hi: float | None, exclusive: bool) -> bool:
    if lo is not None and (value <= lo if exclusive else value < lo):
        return False
    return hi is None or value <= hi


def _worded(message: str, value: object) -> ValueError:
    """The problem of a field with its own wording: ``message`` with ``{got}`` replaced by the value."""
    return ValueError(message.format(got=short(value)))


def integer(minimum: int | None = None, maximum: int | None = None, *, message: str | None = None, optional: bool = False) -> FieldRule:
    """An integer (not a bool; numpy's are accepted) in ``[minimum, maximum]``: ``Annotated[int, integer(1)]``.

    Args:
        minimum: smallest allowed value (None: no bound).
        maximum: largest allowed value (None: no bound).
        message: the problem in words of the field's own, with ``{got}`` for the value
            (default ``must be an integer >= 1 (got {got})``).
        optional: None is allowed too (for ``Annotated[int | None, integer(1, optional=True)]``).

    Returns:
        The field metadata; the value becomes a Python ``int``.
    """
    wording = message or f"must be an integer{_range(minimum, maximum)} (got {{got}})"

    def phrase(value: object) -> object:
        if value is None and optional:
            return None
        if not is_int(value) or not _within(int(cast(SupportsIndex, value)), minimum, maximum, False):
            raise _worded(wording, value)
        return int(cast(SupportsIndex, value))

    return FieldRule(Field(ge=minimum, le=maximum), phrase)


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    positive: bool = False,
    exclusive_minimum: bool = False,
    message: str | None = None,
    optional: bool = False,
) -> FieldRule:
    """A finite number (an integer is one; a bool is not) in ``[minimum, maximum]``: ``Annotated[float, number(0, 0.9)]``.

    numpy numbers are accepted.

    Args:
        minimum: smallest allowed value (None: no bound).
        maximum: largest allowed value (None: no bound).
        positive: the value must be above 0 (rates, sizes): ``minimum=0, exclusive_minimum=True``.
        exclusive_minimum: ``minimum`` itself is refused.
        message: the problem in words of the field's own, with ``{got}`` for the value; used
            for every problem (the default words a wrong type, NaN or infinity and a value out
            of range apart: ``must be a number in [0, 0.9] (got 'x')``, ``must be a finite
            number (got nan)``, ``must be in [0, 0.9] (got 2)``).
        optional: None is allowed too.

    Returns:
        The field metadata; the value becomes a Python ``float``.
    """
    if positive and minimum is None:
        minimum, exclusive_minimum = 0, True
    wording = _range(minimum, maximum, exclusive_minimum)

    def phrase(value: object) -> object:
        if value is None and optional:
            return None
        if not _is_real(value):
            raise _worded(message or f"must be a number{wording} (got {{got}})", value)
        real = float(cast(SupportsFloat, value))
        if not math.isfinite(real):
            raise ValueError(message.format(got=short(value)) if message else f"must be a finite number (got {value!r})")
        if not _within(real, minimum, maximum, exclusive_minimum):
            raise _worded(message or f"must be{wording} (got {{got}})", value)
        return real

    if exclusive_minimum:
        return FieldRule(Field(gt=minimum, le=maximum), phrase)
    return FieldRule(Field(ge=minimum, le=maximum), phrase)


def integer_list(length: int | None = None, minimum: int | None = None, maximum: int | None = None, *, message: str | None = None) -> FieldRule:
    """A non-empty list of integers in ``[minimum, maximum]`` (of ``length`` entries, if given): ``Annotated[tuple[int, ...], integer_list(4, 1)]``.

    A tuple is accepted too; the value becomes a tuple of Python ``int``.

    Args:
        length: the number of entries required (None: any, at least one).
        minimum: smallest entry allowed (None: no bound).
        maximum: largest entry allowed (None: no bound).
        message: the problem in words of the field's own, with ``{got}`` for the value
            (default ``must be a list of 4 integers in [1, 64] (got {got})``; a wrong length
            reads ``(got 3 entries: [1, 2, 3])``).

    Returns:
        The field metadata.
    """
    what = f"a list of {length} integers" if length is not None else "a list of integers"
    wording = message or f"must be {what}{_range(minimum, maximum)} (got {{got}})"

    def phrase(value: object) -> object:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _worded(wording, value)
        if (length is not None and len(value) != length) or not value:
            raise ValueError(wording.format(got=f"{len(value)} entries: {short(value)}"))
        if not all(is_int(v) and _within(int(v), minimum, maximum, False) for v in value):
            raise _worded(wording, value)
        return tuple(int(v) for v in value)

    items: dict[str, Any] = {"type": "integer"} | ({"minimum": minimum} if minimum is not None else {}) | ({"maximum": maximum} if maximum is not None else {})
    return FieldRule(Field(min_length=length or 1, max_length=length, json_schema_extra={"items": items}), phrase)


def one_of(*options: str, what: str = "", message: str | None = None) -> FieldRule:
    """One of a fixed set of strings: ``Annotated[str, one_of("a", "b")]``.

    Args:
        *options: the allowed values, in the order messages list them.
        what: optional noun for the message (``unknown plan 'x' (known: ...)`` instead of
            ``must be one of ...``).
        message: the problem in words of the field's own, with ``{got}`` for the value
            (``must be 'cosine' or 'constant' (got {got})``).

    Returns:
        The field metadata (a JSON Schema ``enum``); its problem reads ``must be one of a, b
        (got 'c'); did you mean 'a'?``.
    """
    allowed = list(options)
    enum: list[Any] = list(options)  # JSON-ready (pydantic types a schema extra as JsonValue)

    def phrase(value: object) -> object:
        if not isinstance(value, str) or value not in allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            if message:
                raise ValueError(message.format(got=short(value)) + hint)
            if what:
                raise ValueError(f"unknown {what} {short(value)}{hint} (known: {', '.join(allowed)})")
            raise ValueError(f"must be one of {', '.join(allowed)} (got {short(value)}){hint}")
        return value

    return FieldRule(Field(json_schema_extra={"enum": enum}), phrase)


def plain_name(message: str = "must be a plain name: letters, digits, '-', '_', '.' (got {got})", *, optional: bool = False) -> FieldRule:
    """A string usable as one file-name component (`is_plain_name`): ``Annotated[str, plain_name()]``.

    Args:
        message: the problem, with ``{got}`` for the value.
        optional: None is allowed too.

    Returns:
        The field metadata.
    """

    def phrase(value: object) -> object:
        if value is None and optional:
            return None
        if not is_plain_name(value):
            raise _worded(message, value)
        return value

    return FieldRule(Field(min_length=1), phrase)


def matches(regex: str, wording: str) -> FieldRule:
    """A string matching ``regex`` (a name, an id): ``Annotated[str, matches(r"^[a-z]+$", "lower-case letters")]``.

    Args:
        regex: the pattern, anchored with ``^...$`` (JSON Schema and Python read it alike).
        wording: what the pattern allows, in words (``1-64 of letters, digits, _ . -``).

    Returns:
        The field metadata; its problem reads ``must be <wording> (got 'x')``.
    """
    compiled = re.compile(regex)

    def phrase(value: object) -> object:
        if not isinstance(value, str) or not compiled.fullmatch(value):  # fullmatch: `$` also matches before a final newline
            raise ValueError(f"must be {wording} (got {short(value)})")
        return value

    return FieldRule(Field(pattern=regex), phrase)


def strings(min_items: int = 0) -> FieldRule:
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
    return FieldRule(Field(min_length=min_items or None, json_schema_extra={"items": items}), phrase)


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
