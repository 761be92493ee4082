"""Typed config models: one base class, and one way to report what is wrong with a config.

Every config surface of fedimg (experiment spec, site config, label schema, plan arguments,
network / factory / GIN configs, metrics.json, ...) is a pydantic model derived from
`ConfigModel` and validated with `validate_config`, which turns pydantic's errors into one
`ConfigError` whose message lists every problem as ``<file>: <key.path>: <problem>`` with a
"did you mean" suggestion for misspelt keys. A config inside another file (plan arguments,
a network or factory config) goes through `check_model` instead, which raises a
`ConfigValueError` (a ValueError) whose lines start with the key path; the caller adds the
file. Cross-field rules raise `ConfigProblem` (from a ``model_validator``) to name the key
they are about. The field types are in `fedimg_core.config_types`;
the wording of problems is in `fedimg_core.config_problems` and the nested-config error path in
`fedimg_core.config_nested` (both re-exported here, the import path callers use).

`ConfigModel` refuses unknown keys and silent type coercion (``"1"`` is not a number, ``true``
is not an integer; an integer is a valid float). YAML has no tuples: declare sequences as
``list[...]`` (strict mode refuses a list for a ``tuple`` field).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from fedimg_core.config_nested import ConfigValueError, check_model, refuse_unknown_keys
from fedimg_core.config_problems import (
    MAX_LISTED,
    PROBLEM_CHARS,
    SHOWN_CHARS,
    ConfigProblem,
    ModelT,
    closest,
    collect_problems,
    did_you_mean,
    format_problems,
    key_path,
    problem_lines,
    problems_of,
    short,
)
from fedimg_core.errors import ConfigError

__all__ = [
    "MAX_LISTED",
    "PROBLEM_CHARS",
    "SHOWN_CHARS",
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


class ConfigModel(BaseModel):
    """Base of fedimg's config models: unknown keys refused, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, validate_default=False)


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
    validated, problems = collect_problems(model, data, prefix, None, None, ())
    if validated is not None:
        return validated
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
