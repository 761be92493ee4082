"""Typed config models: one base class, and one way to report what is wrong with a config.

Every config surface of fedimg (experiment spec, site config, label schema, plan arguments,
network / factory / GIN configs, metrics.json, ...) is a pydantic model derived from
`ConfigModel` and validated with `validate_config`, which turns pydantic's errors into one
`ConfigError` whose message lists every problem as ``<file>: <key.path>: <problem>`` with a
"did you mean" suggestion for misspelt keys. Cross-field rules raise `ConfigProblem` (from a
``model_validator``) to name the key they are about.

`ConfigModel` refuses unknown keys and silent type coercion (``"1"`` is not a number, ``true``
is not an integer; an integer is a valid float). YAML has no tuples: declare sequences as
``list[...]`` (strict mode refuses a list for a ``tuple`` field).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedimg_core.errors import ConfigError

__all__ = [
    "ConfigModel",
    "ConfigProblem",
    "closest",
    "did_you_mean",
    "finite",
    "format_problems",
    "key_path",
    "problems_of",
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
    """The keys a mapping at ``loc`` accepts, following nested models (None: unknown)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        current = _model_in(fields[part].annotation)
        if current is None:
            return None
    fields = getattr(current, "model_fields", None)
    return sorted(info.alias or name for name, info in fields.items()) if fields is not None else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation (``Sub``, ``Sub | None``, ``list[Sub]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


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
                out.append((prefix + key_path(loc), "required"))
            continue
        if kind in ("model_type", "dict_type"):
            keys = _allowed_keys(model, loc)
            out.append((prefix + key_path(loc), f"must be a mapping{' with keys ' + ', '.join(keys) if keys else ''} (got {short(err.get('input'))})"))
            continue
        message = str(err["msg"])
        for lead in ("Value error, ", "Assertion failed, "):
            if message.startswith(lead):
                message = message[len(lead) :]
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


def validate_config(
    model: type[ModelT],
    data: object,
    *,
    where: str,
    prefix: str = "",
    error: type[ConfigError] = ConfigError,
) -> ModelT:
    """Validate ``data`` against ``model``; report every problem in one ConfigError.

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
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = problems_of(exc, model, prefix)
        raised = error(format_problems(where, problems), file=where, key=problems[0][0] if problems else None)
        raised.problems = problems
        raise raised from None


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
