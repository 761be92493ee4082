"""`run_cli`: run a click CLI, turning expected failures into one clear line and an exit code;
`LazyGroup`: a click group whose commands are imported when they run."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

__all__ = ["LazyGroup", "run_cli"]

from fedimg_core.errors import UserError


class LazyGroup(click.Group):
    """A click group whose commands are named by import path and imported only when used.

    A command line starts in the time its own command needs: ``site-agent prepare`` does not
    import the node, trust and config modules of the other verbs (pydantic models,
    cryptography), which took most of its start-up. ``--help`` and the CLI reference import
    them all.

    Args:
        lazy_commands: command name -> ``"module:attribute"`` of the click command.
        *args: click.Group's.
        **kwargs: click.Group's.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, the lazy ones included.

        Args:
            ctx: the click context.

        Returns:
            The names, sorted.
        """
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, imported on first use.

        Args:
            ctx: the click context.
            cmd_name: the command's name.

        Returns:
            The command, or None for an unknown name.

        Raises:
            TypeError: the import path names something that is not a click command.
        """
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


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
