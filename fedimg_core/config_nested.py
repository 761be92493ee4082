"""The error path of a config that sits inside another file (plan arguments, a network or factory config).

`check_model` validates it and raises a `ConfigValueError` (a ValueError) whose lines start
with the config's key path (``plan_args.gin.prob: ...``); the caller adds the file.
`refuse_unknown_keys` lists unknown keys in their documented order from a model validator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

from fedimg_core.config_problems import ConfigProblem, ModelT, collect_problems, did_you_mean, problem_lines
from fedimg_core.errors import FedimgError

__all__ = ["ConfigValueError", "check_model", "refuse_unknown_keys"]


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
    validated, problems = collect_problems(model, data, f"{where}." if where else "", context or {}, keys, hidden)
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
