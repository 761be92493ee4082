"""Compatibility names for the science's config models; the field types and the error path live in the ground floor.

`fedimg_core.config_types` holds the field types (``integer(1, message=..., optional=True)``,
``number``, ``integer_list``, ``one_of``, ``plain_name``, ``is_int``, ``is_number``) and
`fedimg_core.config` the error path (`ConfigValueError`, `check_model`,
`refuse_unknown_keys`, `problem_lines`). This module re-exports them and keeps the older
spellings (``worded_integer``, ``worded_number``, ``choice``, ``integer_list(lo=..)``) with
their exact wording, so existing imports keep working; new code imports the ground floor.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedimg_core.config import ConfigValueError, check_model, problem_lines, refuse_unknown_keys
from fedimg_core.config_types import FieldRule, integer, is_int, is_number, number, one_of
from fedimg_core.config_types import integer_list as _integer_list
from fedimg_core.config_types import plain_name as _plain_name

__all__ = [
    "ConfigValueError",
    "bounds",
    "check_model",
    "choice",
    "integer_list",
    "is_int",
    "is_number",
    "plain_name",
    "problem_lines",
    "refuse_unknown_keys",
    "worded_integer",
    "worded_number",
]


def bounds(lo: float | None, hi: float | None, low_open: bool = False) -> str:
    """The allowed range in words: ``in [lo, hi]``, ``>= lo``, ``> lo`` or ``<= hi``.

    Args:
        lo: lower bound (None: none).
        hi: upper bound (None: none).
        low_open: whether ``lo`` itself is excluded.

    Returns:
        The phrase, or ``""`` without bounds.
    """
    if lo is not None and hi is not None and not low_open:
        return f"in [{lo}, {hi}]"
    parts = ([f"{'>' if low_open else '>='} {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else [])
    return " and ".join(parts)


def worded_integer(lo: int | None = None, hi: int | None = None, message: str | None = None, optional: bool = False) -> FieldRule:
    """`fedimg_core.config_types.integer` under its older name: ``integer(lo, hi, message=message, optional=optional)``.

    Args:
        lo: smallest value allowed (None: no bound).
        hi: largest value allowed (None: no bound).
        message: the problem, with ``{got}`` for the value (default ``must be an integer <bounds> (got {got})``).
        optional: whether None is allowed too.

    Returns:
        The field metadata, for ``Annotated[<type>, ...]``.
    """
    return integer(lo, hi, message=message, optional=optional)


def worded_number(lo: float | None = None, hi: float | None = None, *, low_open: bool = False, message: str | None = None, optional: bool = False) -> FieldRule:
    """`fedimg_core.config_types.number` under its older name and wording (``must be a finite number <bounds> (got {got})``).

    Args:
        lo: smallest value allowed (None: no bound).
        hi: largest value allowed (None: no bound).
        low_open: whether ``lo`` itself is refused.
        message: the problem, with ``{got}`` for the value.
        optional: whether None is allowed too.

    Returns:
        The field metadata, for ``Annotated[<type>, ...]`` (the value becomes a float).
    """
    default = " ".join(p for p in ("must be a finite number", bounds(lo, hi, low_open)) if p) + " (got {got})"
    return number(lo, hi, exclusive_minimum=low_open, message=message or default, optional=optional)


def integer_list(length: int | None = None, lo: int | None = None, hi: int | None = None, message: str | None = None) -> FieldRule:
    """`fedimg_core.config_types.integer_list` with its older argument names (``lo``, ``hi``).

    Args:
        length: the number of entries required (None: any, at least one).
        lo: smallest entry allowed.
        hi: largest entry allowed.
        message: the problem, with ``{got}``.

    Returns:
        The field metadata, for ``Annotated[<type>, ...]``.
    """
    return _integer_list(length, lo, hi, message=message)


def choice(options: Sequence[str], message: str | None = None) -> FieldRule:
    """`fedimg_core.config_types.one_of` under its older name and wording (``must be 'a' or 'b' (got {got})``).

    Args:
        options: the allowed strings.
        message: the problem, with ``{got}`` (default ``must be 'a' or 'b' (got {got})`` / ``must be one of a, b, c (got {got})``).

    Returns:
        The field metadata, for ``Annotated[<type>, ...]``.
    """
    listed = " or ".join(map(repr, options)) if len(options) == 2 else "one of " + ", ".join(options)
    return one_of(*options, message=message or f"must be {listed} (got {{got}})")


def plain_name(message: str = "must be a plain name: letters, digits, '-', '_', '.' (got {got})") -> FieldRule:
    """`fedimg_core.config_types.plain_name` with None allowed, as it was here.

    Args:
        message: the problem, with ``{got}``.

    Returns:
        The field metadata, for ``Annotated[<type>, ...]``.
    """
    return _plain_name(message, optional=True)
