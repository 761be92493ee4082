"""fedimg's error family: one root, `FedimgError`, and `UserError` for what a CLI reports.

`run_cli` (`fedimg_core.cli`) prints a `UserError` as one line and exits with its
`exit_code`. Input-format errors of the libraries (label schema, prepared dataset, key
config, ...) derive from `FedimgError` and keep their standard base (`ValueError`, ...), so
existing ``except`` clauses still catch them; the CLIs turn them into `UserError`s.
"""

from __future__ import annotations

import os


class FedimgError(Exception):
    """An error fedimg raises about bad input or state.

    Args:
        *args: the exception arguments; the first is the message, which names the file/thing
            and the problem.
        file: the file the error is about, if any.
        key: the config key path the error is about (``plan_args.lr``, ``sites[0].name``), if any.
    """

    file: str | None = None
    key: str | None = None

    def __init__(self, *args: object, file: str | os.PathLike[str] | None = None, key: str | None = None) -> None:
        super().__init__(*args)
        if file is not None:
            self.file = os.fspath(file)
        if key is not None:
            self.key = key


class UserError(FedimgError):
    """Bad input or state the user can fix; the message names the file/thing and the problem."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file (site config, spec, ...) is missing or invalid.

    ``problems`` holds every (key path, problem) found, when validation listed several.
    """

    problems: list[tuple[str, str]]

    def __init__(self, *args: object, file: str | os.PathLike[str] | None = None, key: str | None = None) -> None:
        super().__init__(*args, file=file, key=key)
        self.problems = []
