"""`run_cli`: run a click CLI, turning expected failures into one clear line and an exit code."""

from __future__ import annotations

import os
import sys

import click

from fedimg_core.errors import UserError


def run_cli(group: click.Group, prog_name: str) -> None:
    """Run a click group; turn expected failures into one clear line and a non-zero exit.

    Set FEDIMG_DEBUG=1 to see full tracebacks instead.
    """
    debug = os.environ.get("FEDIMG_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        group.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        if isinstance(exc, click.NoSuchOption) and exc.option_name == "--config" and any("--config" in p.opts for p in group.params):
            # the most common slip: the group's option given after the command
            click.echo(f"{prog_name}: --config belongs before the command: {prog_name} --config FILE COMMAND ...", err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"{prog_name}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            raise
        from_fedbiomed = type(exc).__module__.startswith("fedbiomed")
        origin = "Fed-BioMed" if from_fedbiomed else type(exc).__name__
        msg = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"{prog_name}: error ({origin}): {msg} (set FEDIMG_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
