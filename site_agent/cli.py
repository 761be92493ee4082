"""`site-agent`: the hospital-side command line. Its verbs live in `site_agent.commands`, one module per group."""

from __future__ import annotations

import click

from fedimg_core.cli import LazyGroup
from fedimg_core.logs import verbosity_options
from site_agent.config_location import CONFIG_ENV, DEFAULT_CONFIG
from site_agent.errors import run_cli

# command -> where it lives; imported when it runs (`fedimg_core.cli.LazyGroup`): `prepare` starts without
# the node, trust and config modules of the other verbs
COMMANDS = {
    "init": "site_agent.commands.lifecycle:init",
    "enroll": "site_agent.commands.trust:enroll",
    "trust": "site_agent.commands.trust:trust",
    "dataset": "site_agent.commands.datasets:dataset",
    "prepare": "site_agent.commands.datasets:prepare",
    "deidentify": "site_agent.commands.datasets:deidentify",
    "plans": "site_agent.commands.plans:plans",
    "start": "site_agent.commands.lifecycle:start",
    "stop": "site_agent.commands.lifecycle:stop",
    "status": "site_agent.commands.lifecycle:status",
    "logs": "site_agent.commands.lifecycle:logs",
    "doctor": "site_agent.commands.lifecycle:doctor",
    "adapt": "site_agent.commands.adapt:adapt",
    "infer": "site_agent.commands.adapt:infer",
    "models": "site_agent.commands.models:models",
    "evaluate": "site_agent.commands.models:evaluate",
    "artifacts": "site_agent.commands.artifacts:artifacts",
    "atlas": "site_agent.commands.atlas:atlas",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar=CONFIG_ENV,
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help=f"Site config file (env {CONFIG_ENV}).",
)
@verbosity_options
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """Run a hospital site of a fedimg federation: config, datasets, plan approvals, node.

    Progress and log lines go to stderr (-v adds debug lines, -q keeps warnings and errors
    only); results (tables, JSON, paths) go to stdout."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def main() -> None:
    """Run `site-agent` (the console script's entry point): an error a user can act on prints one line (`fedimg_core.cli.run_cli`)."""
    run_cli(cli, "site-agent")


if __name__ == "__main__":
    main()
