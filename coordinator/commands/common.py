"""`coordinator` CLI plumbing shared by the command modules: options, the console, run and spec look-ups."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click
import yaml
from rich.console import Console

from coordinator import runs
from coordinator import spec as spec_mod
from fedimg_core.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("coordinator.cli")  # the CLI's own lines keep one logger name, whichever module logs them

console = Console(width=None if sys.stdout.isatty() else 160)
HOME_ENV, URL_ENV, TOKEN_ENV = "FEDIMG_COORDINATOR_HOME", "FEDIMG_COORDINATOR_URL", "FEDIMG_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8750"


home_option = click.option(
    "--home", envvar=HOME_ENV, default="coordinator-home", show_default=True, type=click.Path(file_okay=False),
    help=f"Coordinator home: researcher component, runs/ (env {HOME_ENV}).",
)  # fmt: skip
grpc_options = [
    click.option("--grpc-host", default="0.0.0.0", show_default=True, help="Address the Fed-BioMed server binds."),
    click.option("--grpc-port", default=50051, show_default=True, type=int, help="Port sites connect to."),
    click.option(
        "--public-host",
        envvar="FEDIMG_PUBLIC_HOST",
        default=None,
        help="Name sites dial (put in the TLS certificate; default: --grpc-host, or localhost).",
    ),
]
url_option = click.option("--url", envvar=URL_ENV, default=None, help=f"Coordinator API URL (env {URL_ENV}); default: read --home.")
token_option = click.option("--token", envvar=TOKEN_ENV, default=None, help=f"API token (env {TOKEN_ENV}; default: <home>/api-token).")


def with_options(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    """Apply a list of click options as one decorator (in the list's order in ``--help``).

    Args:
        options: click option decorators.

    Returns:
        A decorator applying them all.
    """

    def deco(f: F) -> F:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def load_spec(spec_file: str | Path, scale: str = "full") -> spec_mod.Spec:
    """Load and validate a spec file (every problem at once); print its warnings.

    Args:
        spec_file: the spec's path.
        scale: ``full``, or ``tiny``: the same spec shrunk to run anywhere (`coordinator.spec.scale_raw`).

    Returns:
        The validated spec.

    Raises:
        UserError: the file cannot be read or does not validate (file, key path, problem for each).
    """
    s = spec_mod.load(spec_file, scale=scale)
    for warning in s.warnings:
        click.echo(f"warning: {warning}")
    return s


def require_home(home: str | Path) -> Path:
    """The coordinator home, which must exist.

    Args:
        home: the ``--home`` value.

    Returns:
        Its path.

    Raises:
        UserError: saying where it was looked for and how to get one.
    """
    path = Path(home)
    if not path.is_dir():
        raise UserError(
            f"coordinator home {home} does not exist (looked in {path.resolve()}): pass --home DIR or set {HOME_ENV}; "
            "`coordinator run` and `coordinator serve` create one, `coordinator testbed` uses <workdir>/coordinator "
            "(e.g. --home .testbed/<time>/coordinator)"
        )
    log.debug("coordinator home: %s", path.resolve())
    return path


def find_run(home: str | Path, run_id: str) -> Path:
    """A run by directory, id or id prefix; the home must exist unless a directory is given.

    Args:
        home: the ``--home`` value.
        run_id: a run directory, a run id or an unambiguous prefix of one.

    Returns:
        The run directory.

    Raises:
        UserError: no such home or run, or an ambiguous prefix.
    """
    return runs.find_run(Path(home) if Path(run_id).is_dir() else require_home(home), run_id)


scale_option = click.option(
    "--scale",
    type=click.Choice(["full", "tiny"]),
    default="full",
    show_default=True,
    help="tiny: the same spec shrunk to run on any CPU (2 rounds x 2 steps, tiny network, 32-voxel patches, GPU optional).",
)


def spec_text(spec_file: str | Path, s: spec_mod.Spec, scale: str) -> str:
    """The spec text a run records: the file as written, or the scaled spec it really runs.

    Args:
        spec_file: the spec's path.
        s: the validated spec.
        scale: the ``--scale`` given.

    Returns:
        YAML text.
    """
    if scale == "full":
        return Path(spec_file).read_text(encoding="utf-8")
    return f"# {spec_file} with --scale {scale}\n" + yaml.safe_dump(s.raw, sort_keys=False)
