"""`coordinator`: the researcher side. Thin over coordinator's modules; the verbs live in `coordinator.commands`."""

from __future__ import annotations

import click

from coordinator.commands import evaluation, registry, runs, service, specs, testbed, tokens, trust
from fedimg_core.cli import run_cli
from fedimg_core.logs import verbosity_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbosity_options
def cli() -> None:
    """Coordinate a fedimg federation: run experiment specs on Fed-BioMed, keep their results.

    Progress and log lines go to stderr (-v adds debug lines, -q keeps warnings and errors
    only); results (tables, JSON, paths) go to stdout."""


for _command in (
    specs.validate,
    specs.schema,
    runs.run,
    runs.resume,
    service.serve,
    service.submit,
    runs.status,
    runs.results,
    registry.registry,
    registry.publish,
    registry.site_evaluations,
    registry.atlas,
    tokens.site_token,
    trust.fingerprint,
    trust.certificate,
    trust.sites,
    evaluation.evaluate,
    evaluation.report,
    testbed.testbed,
):
    cli.add_command(_command)


def main() -> None:
    """Run the `coordinator` CLI (the console-script entry point); a user error prints as one line, not a traceback."""
    run_cli(cli, "coordinator")


if __name__ == "__main__":
    main()
