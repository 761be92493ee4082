"""Config problems in fedimg's words: pydantic's errors as (key path, problem) pairs, and their messages.

`problems_of` translates a pydantic ``ValidationError`` (plain wording for type errors, a
"did you mean" for misspelt keys, what a missing key takes, the key a `ConfigProblem` names);
`format_problems` and `problem_lines` turn the pairs into one message; `collect_problems` is
the validation step shared by `fedimg_core.config.validate_config` and
`fedimg_core.config_nested.check_model`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedimg_core.config_annotations import allowed_keys, what_it_takes

__all__ = [
    "MAX_LISTED",
    "PROBLEM_CHARS",
    "SHOWN_CHARS",
    "ConfigProblem",
    "closest",
    "collect_problems",
    "did_you_mean",
    "format_problems",
    "key_path",
    "problem_lines",
    "problems_of",
    "short",
]

MAX_LISTED = 20  # problems listed in one error message
SHOWN_CHARS = 60  # of a bad value quoted in a message
PROBLEM_CHARS = 300  # of one problem's text

ModelT = TypeVar("ModelT", bound=BaseModel)


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
            meant = closest(err["loc"][-1], allowed_keys(model, parent) or [])
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
            allowed = allowed_keys(model, loc[:-1]) or []
            hint = did_you_mean(loc[-1], allowed) or (f"; allowed: {', '.join(allowed)}" if allowed else "")
            out.append((prefix + key_path(loc), f"unknown key{hint}"))
            continue
        if kind == "missing":
            if (loc[:-1], loc[-1]) not in typos:
                out.append((prefix + key_path(loc), "required" + what_it_takes(model, loc)))
            continue
        if kind == "invalid_key":  # a YAML key that is not a string (``12345:``)
            allowed = allowed_keys(model, loc[:-1]) or []
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            out.append((prefix + key_path((*loc[:-1], short(loc[-1]))), f"unknown key{hint}"))
            continue
        if kind in _PLAIN_WORDS:
            out.append((prefix + key_path(loc), f"{_PLAIN_WORDS[kind]} (got {short(err.get('input'))})"))
            continue
        if kind in ("model_type", "dict_type"):
            keys = allowed_keys(model, loc)
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


def collect_problems(
    model: type[ModelT], data: Mapping[Any, Any], prefix: str, context: Mapping[str, Any] | None, keys: Sequence[str] | None, hidden: Sequence[str]
) -> tuple[ModelT | None, list[tuple[str, str]]]:
    """Validate a mapping against a model, collecting every problem instead of raising.

    Args:
        model: the config model.
        data: the raw config.
        prefix: key path prepended to every problem's key (``plan_args.``).
        context: passed to the model's validators.
        keys: the top-level keys in their documented order (unknown keys are reported in
            this order, with a did-you-mean or the list), or None to leave them to pydantic.
        hidden: keys of ``keys`` not advertised in the list.

    Returns:
        The validated model (None when there are problems) and every (key path, problem) found.
    """
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
