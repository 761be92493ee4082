"""What the science's config models add to `fedimg_core.config` / `fedimg_core.config_types`.

Plan arguments, GIN, network, factory, domain-key, adaptation and branch configs are pydantic
models (`fedimg_core.config.ConfigModel`) whose fields use `fedimg_core.config_types`
(``Annotated[int, integer(1)]``). Here: the checks those types do not cover (a wording of
the field's own, None allowed, numpy integers, lists of integers, plain names), the error
they raise (`ConfigValueError`, a ValueError) and `check_model`, which reports problems as
``<key.path>: <problem>`` for a config that sits inside another file. Imports neither torch
nor MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError

from fedimg_core.config import MAX_LISTED, ConfigProblem, did_you_mean, problems_of, short
from fedimg_core.errors import FedimgError
from pipelines.site_state import is_plain_name

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

ModelT = TypeVar("ModelT", bound=BaseModel)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


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
    if _is_bool(value) or not (isinstance(value, float) or (type(value).__module__ == "numpy" and hasattr(value, "__float__"))):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class ConfigValueError(FedimgError, ValueError):
    """A config of the science is invalid; ``.problems`` holds every (key path, problem), ``.key`` the first.

    Like the other input-format errors of the libraries (`fedimg_core.errors`), a `FedimgError`
    that keeps its standard base: the ``except ValueError`` clauses written for the old checks
    still catch it, and the CLIs turn it into a `UserError` as before.
    """

    def __init__(self, *args: object, file: str | None = None, key: str | None = None) -> None:
        super().__init__(*args, file=file, key=key)
        self.problems: list[tuple[str, str]] = []

    def with_problems(self, problems: Sequence[tuple[str, str]]) -> ConfigValueError:
        """This error, with ``problems`` set (for re-raising another config's problems as this kind).

        Args:
            problems: the (key path, problem) pairs.

        Returns:
            ``self``.
        """
        self.problems = list(problems)
        return self

    @classmethod
    def of(cls, key: str, problem: str) -> ConfigValueError:
        """The error for one problem: message ``"<key>: <problem>"``.

        Args:
            key: the key path (``plan_args.gin``).
            problem: what is wrong, and what is allowed.

        Returns:
            The error (to raise).
        """
        error = cls(f"{key}: {problem}" if key else problem, key=key or None)
        error.problems = [(key, problem)]
        return error


def problem_lines(problems: Sequence[tuple[str, str]], where: str) -> str:
    """The message for (key path, problem) pairs whose key paths already start with their config's name.

    Args:
        problems: the pairs (``plan_args.gin.prob``, ``must be within [0, 1] (got 2)``).
        where: what to call the config in the first line when there are several (``plan_args``).

    Returns:
        ``"<key>: <problem>"`` for one problem; for several, a count and one such line each.
    """
    lines = [f"{key}: {problem}" if key else problem for key, problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    return lines[0] if len(problems) == 1 else f"{where}: {len(problems)} problems:\n  " + "\n  ".join(lines)


def check_model(
    model: type[ModelT],
    data: Any,
    where: str,
    error: type[ConfigValueError] = ConfigValueError,
    context: Mapping[str, Any] | None = None,
    keys: Sequence[str] | None = None,
    hidden: Sequence[str] = (),
) -> ModelT:
    """Validate ``data`` against ``model``; problems are reported as ``<where>.<key>: <problem>``.

    For configs that sit inside another file (``plan_args.gin`` of a spec, ``factory`` of
    factory.json): their messages start with the key path, the caller adds the file.

    Args:
        model: the config model.
        data: the raw config (a mapping).
        where: the config's key path (``plan_args.gin``), prefixed to every problem's key.
        error: the error class raised.
        context: passed to the model's validators.
        keys: the top-level keys in their documented order: each other key is reported
            (``unknown key; did you mean 'x'?`` or ``unknown key (allowed: ...)``) together
            with the model's problems with the rest.
        hidden: keys of ``keys`` not advertised in the list (filled in by the coordinator).

    Returns:
        The validated model.

    Raises:
        ConfigValueError: (or ``error``) one line per problem; ``.problems`` and ``.key`` set.
    """
    if not isinstance(data, Mapping):
        raise error.of(where, f"must be a mapping (got {type(data).__name__})")
    prefix = f"{where}." if where else ""
    problems: list[tuple[str, str]] = []
    if keys is not None:
        allowed = " (allowed: " + ", ".join(k for k in keys if k not in hidden) + ")"
        problems += [(f"{prefix}{key}", "unknown key" + (did_you_mean(key, keys) or allowed)) for key in data if key not in keys]
        data = {k: v for k, v in data.items() if k in keys}
    try:
        validated = model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        problems += problems_of(exc, model, prefix)
    if not problems:
        return validated
    raised = error(problem_lines(problems, where), key=problems[0][0])
    raised.problems = problems
    raise raised


def refuse_unknown_keys(data: Any, allowed: Sequence[str], hidden: Sequence[str] = ()) -> None:
    """Refuse the first key of ``data`` not in ``allowed``, with a did-you-mean or the list of keys.

    For a ``model_validator(mode="before")``, where the keys are listed in their documented
    order (pydantic's extra="forbid" reports them sorted).

    Args:
        data: the raw config (anything but a mapping is left to the model).
        allowed: the keys the config takes.
        hidden: allowed keys not advertised in the list (filled in by the coordinator).

    Raises:
        ConfigProblem: naming the unknown key.
    """
    if not isinstance(data, Mapping):
        return
    for key in data:
        if key not in allowed:
            shown = [k for k in allowed if k not in hidden]
            hint = did_you_mean(key, allowed) or f" (allowed: {', '.join(shown)})"
            raise ConfigProblem(str(key), f"unknown key{hint}")


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


def _in_range(value: float, lo: float | None, hi: float | None, low_open: bool) -> bool:
    if lo is not None and (value <= lo if low_open else value < lo):
        return False
    return hi is None or value <= hi


def _message(template: str | None, default: str, value: Any) -> str:
    return (template or default).format(got=short(value))


def worded_integer(lo: int | None = None, hi: int | None = None, message: str | None = None, optional: bool = False) -> BeforeValidator:
    """An integer field within bounds, with its own wording or None allowed (else use `fedimg_core.config_types.integer`).

    numpy integers are accepted (the GIN transforms' constructors take them).

    Args:
        lo: smallest value allowed (None: no bound).
        hi: largest value allowed (None: no bound).
        message: the problem, with ``{got}`` for the value (default ``must be an integer <bounds> (got {got})``).
        optional: whether None is allowed too.

    Returns:
        The check, for ``Annotated[<type>, check]`` (``int | None`` when optional).
    """
    default = " ".join(p for p in ("must be an integer", bounds(lo, hi)) if p) + " (got {got})"

    def worded(value: Any) -> int | None:
        if value is None and optional:
            return None
        if not is_int(value) or not _in_range(int(value), lo, hi, False):
            raise ValueError(_message(message, default, value))
        return int(value)

    return BeforeValidator(worded)


def worded_number(
    lo: float | None = None, hi: float | None = None, *, low_open: bool = False, message: str | None = None, optional: bool = False
) -> BeforeValidator:
    """A finite number field within bounds, with its own wording or None allowed (else use `fedimg_core.config_types.number`).

    An integer is a number; NaN, infinities and booleans are not.

    Args:
        lo: smallest value allowed (None: no bound).
        hi: largest value allowed (None: no bound).
        low_open: whether ``lo`` itself is refused.
        message: the problem, with ``{got}`` for the value (default ``must be a finite number <bounds> (got {got})``).
        optional: whether None is allowed too.

    Returns:
        The check, for ``Annotated[<type>, check]`` (the value becomes a float; ``float | None`` when optional).
    """
    default = " ".join(p for p in ("must be a finite number", bounds(lo, hi, low_open)) if p) + " (got {got})"

    def worded(value: Any) -> float | None:
        if value is None and optional:
            return None
        if not is_number(value) or not _in_range(float(value), lo, hi, low_open):
            raise ValueError(_message(message, default, value))
        return float(value)

    return BeforeValidator(worded)


def integer_list(length: int | None = None, lo: int | None = None, hi: int | None = None, message: str | None = None) -> BeforeValidator:
    """A list of integers within bounds (of a given length, if any); a tuple is accepted and becomes one.

    Args:
        length: the number of entries required (None: any, at least one).
        lo: smallest entry allowed.
        hi: largest entry allowed.
        message: the problem, with ``{got}`` (default ``must be a list of <length> integers <bounds> (got {got})``).

    Returns:
        The check, for ``Annotated[<type>, check]``.
    """
    what = f"a list of {length} integers" if length is not None else "a list of integers"
    default = " ".join(p for p in (f"must be {what}", bounds(lo, hi)) if p) + " (got {got})"

    def worded(value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(_message(message, default, value))
        if (length is not None and len(value) != length) or not value:
            raise ValueError((message or default).format(got=f"{len(value)} entries: {short(value)}"))
        if not all(is_int(v) and _in_range(int(v), lo, hi, False) for v in value):
            raise ValueError(_message(message, default, value))
        return tuple(int(v) for v in value)

    return BeforeValidator(worded)


def choice(options: Sequence[str], message: str | None = None) -> BeforeValidator:
    """A string field that must be one of ``options`` (with a did-you-mean for a near miss).

    Args:
        options: the allowed strings.
        message: the problem, with ``{got}`` (default ``must be 'a' or 'b' (got {got})`` / ``must be one of a, b, c``).

    Returns:
        The check, for ``Annotated[<type>, check]``.
    """
    listed = " or ".join(map(repr, options)) if len(options) == 2 else "one of " + ", ".join(options)
    default = f"must be {listed} (got {{got}})"

    def worded(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise ValueError(_message(message, default, value) + (did_you_mean(value, options) if isinstance(value, str) else ""))
        return value

    return BeforeValidator(worded)


def plain_name(message: str = "must be a plain name: letters, digits, '-', '_', '.' (got {got})") -> BeforeValidator:
    """A string usable as one file-name component (`pipelines.site_state.is_plain_name`), or None.

    Args:
        message: the problem, with ``{got}``.

    Returns:
        The check, for ``Annotated[<type>, check]``.
    """

    def worded(value: Any) -> str | None:
        if value is not None and not is_plain_name(value):
            raise ValueError(message.format(got=short(value)))
        return value  # type: ignore[no-any-return]

    return BeforeValidator(worded)
