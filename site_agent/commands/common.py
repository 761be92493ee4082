"""What the `site-agent` verbs share: the invocation's site config, the stdout console, the logger."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import click
from rich.console import Console

if TYPE_CHECKING:  # imported where a verb loads its config: `prepare` and `--help` start without the config models
    from site_agent import config as site_config

# Results (tables) go to stdout; a pipe or a file gets a fixed width so rows are not cut at 80.
console = Console(width=None if sys.stdout.isatty() else 160)
# The CLI's own records: -v output names them "site_agent.cli", whichever module of the CLI logs.
log = logging.getLogger("site_agent.cli")


def load_site(ctx: click.Context) -> site_config.SiteConfig:
    """Read the site config the invocation names (``--config`` or $FEDIMG_SITE_CONFIG).

    Args:
        ctx: the click context of a `site-agent` verb (its root holds ``config_path``).

    Returns:
        The validated site config.

    Raises:
        ConfigError: the file is missing, not YAML, or has problems (every one listed).
    """
    from site_agent import config as site_config

    site = site_config.load(ctx.obj["config_path"])
    log.debug("site config %s: site %s, work dir %s, runtime %s", ctx.obj["config_path"], site.site_name, site.work_dir, site.runtime)
    return site


def load_site_if_present(ctx: click.Context) -> site_config.SiteConfig | None:
    """The site config when its file exists (a job that can run without one, e.g. `infer` with a model file).

    Args:
        ctx: the click context of a `site-agent` verb.

    Returns:
        The validated site config, or None when the file does not exist.

    Raises:
        ConfigError: the file exists but is not valid.
    """
    from site_agent import config as site_config

    path = site_config.resolve_config_path(ctx.obj["config_path"])
    return load_site(ctx) if path.is_file() else None


def device_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback of a ``--device`` option: auto, cpu, cuda or cuda:N (None: the config's).

    Args:
        ctx: the click context.
        param: the option.
        value: what was given.

    Returns:
        The checked setting, or None when the option was not given.

    Raises:
        click.BadParameter: another value.
    """
    from fedimg_core.devices import parse_device

    if value is None:
        return None
    try:
        return parse_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
