"""Typed config models: one base class, and one way to report what is wrong with a config.

Every config surface of fedimg (experiment spec, site config, label schema, plan arguments,
network / factory / GIN configs, metrics.json, ...) is a pydantic model derived from
`ConfigModel` and validated with `validate_config`, which turns pydantic's errors into one
`ConfigError` whose message lists every problem as ``<file>: <key.path>: <problem>`` with a
"did you mean" suggestion for misspelt keys. A config inside another file (plan arguments,
a network or factory config) goes through `check_model` instead, which raises a
`ConfigValueError` (a ValueError) whose lines start with the key path; the caller adds the
file. Cross-field rules raise `ConfigProblem` (from a ``model_validator``) to name the key
they are about. The field types are in `fedimg_core.config_types`.

`ConfigModel` refuses unknown keys and silent type coercion (``"1"`` is not a number, ``true``
is not an integer; an integer is a valid float). YAML has no tuples: declare sequences as
``list[...]`` (strict mode refuses a list for a ``tuple`` field).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Self, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from fedimg_core.errors import ConfigError, FedimgError

__all__ = [
    "ConfigModel",
    "ConfigProblem",
    "ConfigValueError",
    "check_model",
    "closest",
    "did_you_mean",
    "finite",
    "format_problems",
    "key_path",
    "problem_lines",
    "problems_of",
    "refuse_unknown_keys",
    "short",
    "validate_config",
]

MAX_LISTED = 20  # problems listed in one error message
SHOWN_CHARS = 60  # of a bad value quoted in a message
PROBLEM_CHARS = 300  # of one problem's text

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base of fedimg's config models: unknown keys refused, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, validate_default=False)


class ConfigProblem(ValueError):
    """A problem found by a cross-field rule, naming the key path it is about.

    Args:
        key: the key path (``plan_args.refine_rounds``), relative to the model validated.
        problem: what is wrong and, where possible, what is allowed.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def short(value: Any) -> str:
    """repr of a config value, cut so a message never repeats a large input whole.

    Args:
        value: the value to quote.

    Returns:
        At most SHOWN_CHARS characters.
    """
    if isinstance(value, (dict, list, tuple, set)) and len(value) >= 50:
        text = f"<{type(value).__name__} of {len(value)}>"
    else:
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def did_you_mean(word: object, options: Iterable[object], cutoff: float = 0.6) -> str:
    """The "did you mean" hint for a misspelt name.

    Args:
        word: what was written.
        options: the names allowed there.
        cutoff: difflib similarity below which no suggestion is made.

    Returns:
        ``"; did you mean 'x'?"`` for the closest option, or ``""`` when none is close.
    """
    close = closest(word, options, cutoff)
    return f"; did you mean {close!r}?" if close is not None else ""


def closest(word: object, options: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The option a misspelt name most likely meant.

    Args:
        word: what was written.
        options: the names allowed there.
        cutoff: difflib similarity below which no option counts as meant.

    Returns:
        The closest option, or None when none is close.
    """
    close = difflib.get_close_matches(str(word)[:100], sorted(str(o) for o in options), n=1, cutoff=cutoff)
    return close[0] if close else None


def key_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a key path: ``('sites', 'tags', 0)`` -> ``sites.tags[0]``.

    Args:
        loc: the location tuple.

    Returns:
        The dotted path (``""`` for the top level).
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if len(part) <= SHOWN_CHARS else short(part)
            out += f".{text}" if out else text
    return out


def _allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str] | None:
    """The keys a mapping at ``loc`` accepts, following nested models, lists and dicts of them (None: unknown)."""
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


# pydantic's type errors in fedimg's words (its own say "Input should be a valid ...")
_PLAIN_WORDS = {
    "string_type": "must be a string",
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def _what_it_takes(model: type[BaseModel], loc: Sequence[int | str]) -> str:
    """For a missing key: ``": 'fedimg-label-schema'"`` (a fixed value) or ``": a mapping with keys a, b"``."""
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


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= PROBLEM_CHARS else text[: PROBLEM_CHARS - 3] + "..."


def problems_of(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """Turn a pydantic ValidationError into (key path, problem) pairs in fedimg's words.

    Args:
        exc: the error pydantic raised.
        model: the model that was validated (to suggest keys for a misspelt one).
        prefix: key path prepended to every location (``plan_args.``).

    Returns:
        One (key path, problem) per error, in the order pydantic found them.
    """
    out: list[tuple[str, str]] = []
    errors = exc.errors(include_url=False)
    # a misspelt required key is reported once, as the typo ("roundz: unknown key; did you
    # mean 'rounds'?"), not also as a missing key
    typos: set[tuple[tuple[int | str, ...], int | str]] = set()
    for err in errors:
        if err["type"] == "extra_forbidden":
            parent = tuple(err["loc"][:-1])
            meant = closest(err["loc"][-1], _allowed_keys(model, parent) or [])
            if meant is not None:
                typos.add((parent, meant))
    for err in errors:
        loc = tuple(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, ConfigProblem):
            key = ".".join(p for p in (key_path(loc), cause.key) if p)
            out.append((prefix + key, _clip(cause.problem)))
            continue
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1]) or []
            hint = did_you_mean(loc[-1], allowed) or (f"; allowed: {', '.join(allowed)}" if allowed else "")
            out.append((prefix + key_path(loc), f"unknown key{hint}"))
            continue
        if kind == "missing":
            if (loc[:-1], loc[-1]) not in typos:
                out.append((prefix + key_path(loc), "required" + _what_it_takes(model, loc)))
            continue
        if kind == "invalid_key":  # a YAML key that is not a string (``12345:``)
            allowed = _allowed_keys(model, loc[:-1]) or []
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            out.append((prefix + key_path((*loc[:-1], short(loc[-1]))), f"unknown key{hint}"))
            continue
        if kind in _PLAIN_WORDS:
            out.append((prefix + key_path(loc), f"{_PLAIN_WORDS[kind]} (got {short(err.get('input'))})"))
            continue
        if kind in ("model_type", "dict_type"):
            keys = _allowed_keys(model, loc)
            out.append((prefix + key_path(loc), f"must be a mapping{' with keys ' + ', '.join(keys) if keys else ''} (got {short(err.get('input'))})"))
            continue
        message = str(err["msg"])
        for lead in ("Value error, ", "Assertion failed, "):
            if message.startswith(lead):
                message = message[len(lead) :]
        if message.startswith("Input should be "):  # pydantic's wording for its own constraints
            message = "must be " + message[len("Input should be ") :]
        if kind not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {short(err['input'])})"
        out.append((prefix + key_path(loc), _clip(message)))
    return out


def format_problems(where: str, problems: Sequence[tuple[str, str]]) -> str:
    """The message for a config with problems: one line, or a count and one line per problem.

    Args:
        where: the file (or what to call the config) the problems are in.
        problems: (key path, problem) pairs; an empty key path means the whole config.

    Returns:
        ``"<where>: <key>: <problem>"`` for one problem; for several, a first line with their
        number and one such line per problem (at most MAX_LISTED).
    """
    lines = [f"{where}: {key}: {problem}" if key else f"{where}: {problem}" for key, problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"{where}: ... and {len(problems) - MAX_LISTED} more")
    if len(problems) == 1:
        return lines[0]
    return f"{where}: {len(problems)} problems:\n  " + "\n  ".join(lines)


def _validate(
    model: type[ModelT], data: Mapping[Any, Any], prefix: str, context: Mapping[str, Any] | None, keys: Sequence[str] | None, hidden: Sequence[str]
) -> tuple[ModelT | None, list[tuple[str, str]]]:
    """Validate a mapping: the model (None when there are problems) and every (key path, problem) found."""
    problems: list[tuple[str, str]] = []
    if keys is not None:
        # unknown keys listed in the documented order (pydantic's extra="forbid" sorts them)
        allowed = " (allowed: " + ", ".join(k for k in keys if k not in hidden) + ")"
        problems += [(f"{prefix}{key}", "unknown key" + (did_you_mean(key, keys) or allowed)) for key in data if key not in keys]
        data = {k: v for k, v in data.items() if k in keys}
    try:
        validated = model.model_validate(data, context=dict(context) if context is not None else None)
    except ValidationError as exc:
        return None, problems + problems_of(exc, model, prefix)
    return (validated, []) if not problems else (None, problems)


def validate_config(
    model: type[ModelT],
    data: object,
    *,
    where: str,
    prefix: str = "",
    error: type[ConfigError] = ConfigError,
) -> ModelT:
    """Validate ``data`` against ``model``; report every problem in one ConfigError.

    For a config file of its own (site config, spec, label schema); `check_model` is the same
    for a config inside another one.

    Args:
        model: the config model.
        data: the parsed config (a mapping from YAML/JSON).
        where: the file name (or what to call the config) used in messages.
        prefix: key path of ``data`` inside its file (``plan_args.``), prepended to every key.
        error: the ConfigError subclass to raise.

    Returns:
        The validated model instance.

    Raises:
        ConfigError: (or ``error``) listing every problem; ``.problems`` holds the pairs,
            ``.file`` is ``where`` and ``.key`` the first problem's key path.
    """
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping{' at ' + prefix.rstrip('.') if prefix else ' at the top level'} (got {type(data).__name__})", file=where)
    validated, problems = _validate(model, data, prefix, None, None, ())
    if validated is not None:
        return validated
    raised = error(format_problems(where, problems), file=where, key=problems[0][0] if problems else None)
    raised.problems = problems
    raise raised from None


class ConfigValueError(FedimgError, ValueError):
    """A config inside another file (plan arguments, a network or factory config) is invalid.

    ``.problems`` holds every (key path, problem), ``.key`` the first. Like the other
    input-format errors of the libraries (`fedimg_core.errors`), a `FedimgError` that keeps its
    standard base: ``except ValueError`` clauses still catch it, and the CLIs turn it into a
    `UserError` naming the file.

    Args:
        *args: the exception arguments; the first is the message.
        file: the file the error is about, if known.
        key: the key path of the (first) problem.
    """

    def __init__(self, *args: object, file: str | None = None, key: str | None = None) -> None:
        super().__init__(*args, file=file, key=key)
        self.problems: list[tuple[str, str]] = []

    def with_problems(self, problems: Sequence[tuple[str, str]]) -> Self:
        """This error, with ``problems`` set (for re-raising another config's problems as this kind).

        Args:
            problems: the (key path, problem) pairs.

        Returns:
            ``self``.
        """
        self.problems = list(problems)
        return self

    @classmethod
    def of(cls, key: str, problem: str) -> Self:
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
    """Validate a config that sits inside another file; problems are reported as ``<where>.<key>: <problem>``.

    For ``plan_args.gin`` of a spec or ``factory`` of factory.json: the messages start with
    the key path, the caller adds the file (`validate_config` is the same for a file of its own).

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
    validated, problems = _validate(model, data, f"{where}." if where else "", context or {}, keys, hidden)
    if validated is not None:
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


def finite(value: float) -> float:
    """Field check: refuse NaN and infinities (pydantic's float accepts them).

    Args:
        value: the number.

    Returns:
        ``value``.

    Raises:
        ValueError: for NaN or an infinity.
    """
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value
