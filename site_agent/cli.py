"""`site-agent`: the hospital-side command line. Its verbs live in `site_agent.commands`, one module per group."""

from __future__ import annotations

import click

from fedimg_core.logs import verbosity_options
from site_agent import config as site_config
from site_agent.commands import adapt, artifacts, atlas, datasets, lifecycle, models, plans, trust
from site_agent.errors import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar=site_config.CONFIG_ENV,
    default=site_config.DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help=f"Site config file (env {site_config.CONFIG_ENV}).",
)
@verbosity_options
@click.pass_context
def cli(ctx: click.Context, config_path: str) -> None:
    """Run a hospital site of a fedimg federation: config, datasets, plan approvals, node.

    Progress and log lines go to stderr (-v adds debug lines, -q keeps warnings and errors
    only); results (tables, JSON, paths) go to stdout."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


for _command in (
    lifecycle.init,
    trust.enroll,
    trust.trust,
    datasets.dataset,
    datasets.prepare,
    datasets.deidentify,
    plans.plans,
    lifecycle.start,
    lifecycle.stop,
    lifecycle.status,
    lifecycle.logs,
    lifecycle.doctor,
    adapt.adapt,
    adapt.infer,
    models.models,
    models.evaluate,
    artifacts.artifacts,
    atlas.atlas,
):
    cli.add_command(_command)
del _command


def main() -> None:
    """Run `site-agent` (the console script's entry point): an error a user can act on prints one line (`fedimg_core.cli.run_cli`)."""
    run_cli(cli, "site-agent")


if __name__ == "__main__":
    main()
