"""The site config file's model (``site.yaml``): its keys, types, defaults and allowed values.

`site_agent.config` reads and writes the file and turns this model into the `SiteConfig` the
site agent works with; the model lives in the ground floor so that ``coordinator schema site``
can publish its JSON Schema without importing the site agent.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from fedimg_core.config import ConfigModel
from fedimg_core.config_types import AbsolutePath, Text, integer, json_schema, matches, one_of
from fedimg_core.devices import DEVICE_PATTERN

__all__ = [
    "DEFAULT_IMAGE",
    "RESTART_POLICIES",
    "RUNTIMES",
    "SITE_NAME_PATTERN",
    "CoordinatorAddress",
    "DockerSection",
    "RegistrySection",
    "SiteConfigFile",
    "site_json_schema",
]

RUNTIMES = ("auto", "process", "docker")
RESTART_POLICIES = ("no", "always", "unless-stopped", "on-failure")
DEFAULT_IMAGE = "fedimg-site:0.1.0"
SITE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # also the site's name in registry tokens
SCHEMA_ID = "urn:fedimg:schema:site-config"


class CoordinatorAddress(ConfigModel):
    """Where the coordinator's Fed-BioMed server listens (gRPC)."""

    host: Text = Field(description="Host name or address of the coordinator, as in its TLS certificate.")
    port: Annotated[int, integer(1, 65535)] = Field(description="gRPC port of the coordinator (`coordinator run|serve --grpc-port`).")


class DockerSection(ConfigModel):
    """How the docker runtime runs the site's node container."""

    image: Text = Field(default=DEFAULT_IMAGE, description="Site image the node container runs.")
    restart: Annotated[str, one_of(*RESTART_POLICIES)] = Field(default="unless-stopped", description="Docker restart policy of the node container.")
    network: Text | None = Field(default=None, description="Docker network to attach the container to (null: the default bridge).")


def _registry_url(url: str) -> str:
    """A registry URL: plain http(s)://host[:port][/path]; returned without a trailing slash."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host (got {url!r})")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError("must be plain scheme://host[:port][/path], no credentials, query or fragment (the token goes in registry.token_file)")
    return url.rstrip("/")


class RegistrySection(ConfigModel):
    """Where the coordinator's artifact registry is, and the file holding this site's token."""

    url: Annotated[Text, AfterValidator(_registry_url)] = Field(
        description="Registry base URL, http:// or https://, without credentials (e.g. http://coordinator.example.org:8750)."
    )
    token_file: AbsolutePath | None = Field(
        default=None, description="Absolute path of the file holding this site's registry token (null: $FEDIMG_SITE_TOKEN)."
    )


class SiteConfigFile(ConfigModel):
    """A site's configuration file, as ``site-agent init`` writes it."""

    config_version: Annotated[int, integer(1)] = Field(default=1, description="Format version of this file (1).")
    site_name: Annotated[str, matches(SITE_NAME_PATTERN, "1-63 of a-z 0-9 _ - starting with a letter or digit")] = Field(
        description="This site's name, shown to the coordinator and used for its registry token."
    )
    coordinator: CoordinatorAddress = Field(description="Where the coordinator listens.")
    data_dir: AbsolutePath = Field(description="Absolute folder the prepared datasets live below.")
    work_dir: AbsolutePath = Field(description="Absolute folder of the Fed-BioMed node component, pid file and logs.")
    runtime: Annotated[str, one_of(*RUNTIMES)] = Field(
        default="auto", description="How the node runs: process (this machine), docker (a container), auto (docker if available)."
    )
    docker: DockerSection | None = Field(default=None, description="Settings of the docker runtime (null: the defaults).")
    device: Annotated[str, matches(DEVICE_PATTERN, "auto, cpu, cuda or cuda:N")] = Field(
        default="auto",
        description="Where training and local jobs run: auto (a GPU when torch sees one and the experiment allows it), cpu, "
        "cuda or cuda:N (that GPU; the node refuses to start without it).",
    )
    registry: RegistrySection | None = Field(default=None, description="The coordinator's artifact registry (optional).")


def site_json_schema() -> dict[str, Any]:
    """The JSON Schema of the site config file (``coordinator schema site``).

    Returns:
        The Draft 2020-12 schema as a dict.
    """
    return json_schema(
        SiteConfigFile,
        schema_id=SCHEMA_ID,
        title="fedimg site config",
        description="A fedimg site's configuration file (site.yaml), written by `site-agent init` and read by every `site-agent` command.",
    )
