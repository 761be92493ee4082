"""`coordinator serve|submit`: the long-running coordinator service and submitting specs to it."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from coordinator.client import call, client_token
from coordinator.commands.common import DEFAULT_URL, grpc_options, home_option, load_spec, token_option, url_option, with_options


@click.command()
@home_option
@with_options(grpc_options)
@click.option("--api-host", default="127.0.0.1", show_default=True, help="Address of the researcher API.")
@click.option("--api-port", default=8750, show_default=True, type=int, help="Port of the researcher API.")
@click.option("--max-auto-resumes", default=3, show_default=True, type=click.IntRange(min=0),
              help="Automatic resumes per run (interrupted, or failed for lack of sites); 0 turns automatic recovery off.")  # fmt: skip
@click.option("--auto-resume-wait", default=60.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Least time between two automatic resumes of a run.")  # fmt: skip
def serve(home, grpc_host, grpc_port, public_host, api_host, api_port, max_auto_resumes, auto_resume_wait) -> None:
    """Long-running coordinator: hosts the Fed-BioMed server, runs submitted specs in order,
    and resumes its interrupted runs, and those that failed for lack of sites once they are back, by itself."""
    from coordinator.service import Recovery
    from coordinator.service import serve as _serve  # deferred: start-up time (Fed-BioMed, torch)

    recovery = Recovery(max_auto_resumes=max_auto_resumes, retry_wait_s=auto_resume_wait)
    _serve(Path(home), grpc_host, grpc_port, api_host, api_port, public_host=public_host, recovery=recovery)


@click.command()
@click.argument("spec_file", type=click.Path())
@home_option
@url_option
@token_option
def submit(spec_file, home, url, token) -> None:
    """Submit SPEC_FILE to a running `coordinator serve`."""
    s = load_spec(spec_file)  # fail here, with the file name, before anything is sent
    body = Path(spec_file).read_bytes()
    if s.resolved_raw() != s.raw:  # a schema file on this machine: send its content along
        body = yaml.safe_dump(s.resolved_raw(), sort_keys=False).encode()
    reply = call(url or DEFAULT_URL, "POST", "/runs", client_token(Path(home), token), body=body)
    click.echo(f"submitted {s.name}: run {reply['run_id']}")
