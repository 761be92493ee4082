"""Logging for both command lines: one setup, a rich handler on a terminal, plain one-line records elsewhere.

Library code logs to module loggers (``logging.getLogger(__name__)``) and never prints; the
CLIs call `setup_logging` once (through `verbosity_options`) and keep ``click.echo`` for a
command's result (tables, JSON, paths asked for). Records go to stderr, so stdout stays the
result alone (``--json`` is pure JSON).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler

QUIET, NORMAL, VERBOSE = -1, 0, 1
FEDIMG_LOGGERS = ("fedimg", "fedimg_core", "fedimg_testing", "preprocessing", "pipelines", "site_agent", "coordinator")
FEDBIOMED_LOGGER = "fedbiomed"
# The engine mirrors its own lines into Fed-BioMed's logger (for run.log) with this prefix;
# our loggers already show them, so the console route drops the copies.
MIRRORED_PREFIX = "[fedimg]"

_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}
_OTHER_LIBRARIES_LEVELS = {QUIET: logging.CRITICAL, NORMAL: logging.CRITICAL, VERBOSE: logging.WARNING}
_FEDBIOMED_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.WARNING, VERBOSE: logging.DEBUG}

_console = Console(stderr=True)  # resolves sys.stderr on each write (redirections and pytest's capture work)
_state: dict[str, Any] = {"verbosity": None, "handler": None, "fedbiomed_handler": None, "fedbiomed_level": None}

F = TypeVar("F", bound=Callable[..., Any])


class PlainFormatter(logging.Formatter):
    """One line per record for logs that are not a terminal (CI, ``docker logs``, pipes).

    ``[HH:MM:SS] message`` for information, ``[HH:MM:SS] warning: message`` (or error,
    debug...) otherwise; the logger's name is added to debug lines and to other libraries'
    records. No colour codes, no wrapping.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one plain line (plus its traceback, if any).

        Args:
            record: the log record.

        Returns:
            The text to write.
        """
        head = f"[{time.strftime('%H:%M:%S', time.localtime(record.created))}] "
        if record.levelno != logging.INFO:
            head += f"{record.levelname.lower()}: "
        if record.levelno < logging.INFO or record.name.split(".")[0] not in FEDIMG_LOGGERS:
            head += f"{record.name}: "
        text = head + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StderrHandler(logging.Handler):
    """Writes formatted records to the current ``sys.stderr`` (looked up per record, so a
    redirected or captured stderr receives them)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record.

        Args:
            record: the log record.
        """
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _OtherLibrariesQuiet(logging.Filter):
    """Lets other libraries' records (pydicom, nibabel, matplotlib...) through only from
    ``minimum`` up: they report what fedimg already reports in its own words (a refused
    case), so at the default level they would only repeat it, often with a traceback."""

    def __init__(self, minimum: int) -> None:
        super().__init__()
        self.minimum = minimum

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".")[0]
        return top in FEDIMG_LOGGERS or top == FEDBIOMED_LOGGER or record.levelno >= self.minimum


class _NotMirrored(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(MIRRORED_PREFIX))


def stderr_console() -> Console:
    """The rich console on stderr that log records and progress bars share (a live progress
    bar then keeps log lines above it instead of tearing).

    Returns:
        The shared console.
    """
    return _console


def _make_handler(verbosity: int, terminal: bool) -> logging.Handler:
    if terminal:
        return RichHandler(console=_console, show_path=verbosity >= VERBOSE, markup=False, log_time_format="[%X]")
    handler = StderrHandler()
    handler.setFormatter(PlainFormatter())
    return handler


def setup_logging(verbosity: int = NORMAL, terminal: bool | None = None) -> None:
    """Send fedimg's log records to stderr at the level ``verbosity`` asks for.

    Safe to call again (the previous handler is replaced). Other libraries' records show
    only with ``--verbose`` (from WARNING; CRITICAL always); Fed-BioMed's records take the
    same route where `route_fedbiomed` is called.

    Args:
        verbosity: ``QUIET`` (warnings and errors), ``NORMAL`` (also information lines and
            progress) or ``VERBOSE`` (also debug lines, fedimg's and Fed-BioMed's).
        terminal: whether stderr is a terminal (rich output); None: ask ``sys.stderr``.

    Raises:
        ValueError: an unknown verbosity.
    """
    if verbosity not in _LEVELS:
        raise ValueError(f"verbosity must be one of {sorted(_LEVELS)} (got {verbosity!r})")
    if terminal is None:
        terminal = sys.stderr.isatty()
    root = logging.getLogger()
    old = _state["handler"]
    if old is not None:
        root.removeHandler(old)
    handler = _make_handler(verbosity, terminal)
    handler.setLevel(_LEVELS[verbosity])  # a test or a library may lower one logger's level
    handler.addFilter(_OtherLibrariesQuiet(_OTHER_LIBRARIES_LEVELS[verbosity]))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in FEDIMG_LOGGERS:
        logging.getLogger(name).setLevel(_LEVELS[verbosity])
    fbm_handler = _make_handler(verbosity, terminal)
    fbm_handler.setLevel(_FEDBIOMED_LEVELS[verbosity])
    fbm_handler.addFilter(_NotMirrored())
    previous_fbm = _state["fedbiomed_handler"]
    _state.update(verbosity=verbosity, handler=handler, fedbiomed_handler=fbm_handler)
    if previous_fbm is not None and previous_fbm in logging.getLogger(FEDBIOMED_LOGGER).handlers:
        logging.getLogger(FEDBIOMED_LOGGER).removeHandler(previous_fbm)
        route_fedbiomed()


def route_fedbiomed() -> None:
    """Show Fed-BioMed's own records on the route `setup_logging` set up.

    At WARNING (DEBUG with ``--verbose``); nothing when `setup_logging` was not called
    (library use, tests): then Fed-BioMed's records reach only its own file handlers.
    Call it after removing Fed-BioMed's console handler (`fedimg_core.fedbiomed_console`).
    """
    handler = _state["fedbiomed_handler"]
    if handler is None:
        return
    fbm = logging.getLogger(FEDBIOMED_LOGGER)
    if handler not in fbm.handlers:
        fbm.addHandler(handler)
    if fbm.getEffectiveLevel() > handler.level:  # Fed-BioMed sets its logger's level at import
        if _state["fedbiomed_level"] is None:
            _state["fedbiomed_level"] = fbm.level
        fbm.setLevel(handler.level)


def teardown_logging() -> None:
    """Undo `setup_logging` (and `route_fedbiomed`): remove their handlers, reset the levels.

    The CLIs call it when their command ends, so a command run inside another program (a
    test, a notebook) leaves that program's logging as it was.
    """
    root, fbm = logging.getLogger(), logging.getLogger(FEDBIOMED_LOGGER)
    if _state["handler"] is not None:
        root.removeHandler(_state["handler"])
    if _state["fedbiomed_handler"] is not None:
        fbm.removeHandler(_state["fedbiomed_handler"])
    if _state["fedbiomed_level"] is not None:
        fbm.setLevel(_state["fedbiomed_level"])
    for name in FEDIMG_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _state.update(verbosity=None, handler=None, fedbiomed_handler=None, fedbiomed_level=None)


def verbosity() -> int:
    """The verbosity `setup_logging` was given (``NORMAL`` when it was not called).

    Returns:
        ``QUIET``, ``NORMAL`` or ``VERBOSE``.
    """
    value = _state["verbosity"]
    return NORMAL if value is None else int(value)


def show_progress() -> bool:
    """Whether progress bars and progress lines are shown (not under ``--quiet``).

    Returns:
        True unless the CLI was given ``--quiet``.
    """
    return verbosity() > QUIET


def verbosity_args() -> list[str]:
    """The option that gives a child CLI process this process's verbosity.

    Returns:
        ``["-v"]``, ``["-q"]`` or ``[]``; put it before the child's command.
    """
    return {VERBOSE: ["-v"], QUIET: ["-q"]}.get(verbosity(), [])


def _verbosity_callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta[f"fedimg.{param.name}"] = value
    verbose, quiet = ctx.meta.get("fedimg.verbose", False), ctx.meta.get("fedimg.quiet", False)
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other", ctx=ctx)
    setup_logging(VERBOSE if verbose else QUIET if quiet else NORMAL)
    if not ctx.meta.get("fedimg.teardown"):
        ctx.meta["fedimg.teardown"] = True
        ctx.call_on_close(teardown_logging)  # the command's end (the process's, for a console script)


def verbosity_options(group: F) -> F:
    """Give a click group ``--verbose/-v`` and ``--quiet/-q`` and set logging up from them.

    The options come before the command (``site-agent -v status``); the group's function
    does not receive them.

    Args:
        group: the group's function (below ``@click.group``).

    Returns:
        The decorated function.
    """
    quiet = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity_callback,
                         help="Only warnings and errors on stderr (no progress).")  # fmt: skip
    verbose = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_verbosity_callback,
                           help="Also debug lines on stderr (fedimg's and Fed-BioMed's).")  # fmt: skip
    return verbose(quiet(group))
