"""The site configuration file (YAML): reading, validating and writing it.

Its keys, types and allowed values are the model `fedimg_core.site_config.SiteConfigFile`
(JSON Schema: ``coordinator schema site``, docs/schemas/site.schema.json; a commented
example: docs/guide/site.md); every problem of a file is reported at once, as
``<file>: <key.path>: <problem>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedimg_core import atomic
from fedimg_core.config import validate_config
from fedimg_core.errors import ConfigError
from fedimg_core.site_config import DEFAULT_IMAGE, RUNTIMES, SiteConfigFile
from fedimg_core.site_config import DockerSection as DockerSettings
from fedimg_core.site_config import RegistrySection as RegistrySettings
from site_agent.config_location import CONFIG_ENV, DEFAULT_CONFIG

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "DEFAULT_IMAGE",
    "RUNTIMES",
    "DockerSettings",
    "RegistrySettings",
    "SiteConfig",
    "load",
    "resolve_config_path",
    "validate",
]


@dataclass
class SiteConfig:
    """A validated site config, as the site agent uses it.

    Args:
        site_name: the site's name.
        coordinator_host: where the coordinator's Fed-BioMed server listens.
        coordinator_port: its gRPC port.
        data_dir: folder the prepared datasets live below.
        work_dir: folder of the node component, pid file and logs.
        runtime: auto, process or docker.
        docker: the docker runtime's settings.
        path: the file it was loaded from (None: not loaded from a file).
        registry: the coordinator's artifact registry, if configured.
        device: auto, cpu, cuda or cuda:N (`fedimg_core.devices`).
    """

    site_name: str
    coordinator_host: str
    coordinator_port: int
    data_dir: Path
    work_dir: Path
    runtime: str = "auto"
    docker: DockerSettings = field(default_factory=DockerSettings)
    path: Path | None = None  # where it was loaded from
    registry: RegistrySettings | None = None
    device: str = "auto"

    @property
    def node_dir(self) -> Path:
        """The Fed-BioMed node component folder."""
        return self.work_dir / "node"

    @property
    def pid_file(self) -> Path:
        """The pid file of a node the process runtime started."""
        return self.work_dir / "node.pid"

    @property
    def log_file(self) -> Path:
        """The node's log file."""
        return self.work_dir / "node.log"

    def to_dict(self) -> dict[str, Any]:
        """The config file's content (what `save` writes; `validate` reads it back unchanged).

        Returns:
            The file's keys and values, ready for YAML.
        """
        out: dict[str, Any] = {
            "config_version": 1,
            "site_name": self.site_name,
            "coordinator": {"host": self.coordinator_host, "port": self.coordinator_port},
            "data_dir": str(self.data_dir),
            "work_dir": str(self.work_dir),
            "runtime": self.runtime,
            "docker": self.docker.model_dump(),
            "device": self.device,
        }
        if self.registry is not None:
            out["registry"] = self.registry.model_dump(mode="json", exclude_none=True)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config file atomically (a reader never sees half a file).

        Args:
            path: where to write it.
        """
        atomic.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """The config file to use: ``path``, else $FEDIMG_SITE_CONFIG, else ./site.yaml.

    Args:
        path: the --config value, if given.

    Returns:
        The path (not checked to exist).
    """
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def validate(raw: object, where: str) -> SiteConfig:
    """Build a SiteConfig from parsed YAML (model: `fedimg_core.site_config.SiteConfigFile`).

    Args:
        raw: the parsed file.
        where: the file name (or what to call the config) used in messages.

    Returns:
        The validated SiteConfig.

    Raises:
        ConfigError: listing every problem as ``<where>: <key.path>: <problem>``.
    """
    model = validate_config(SiteConfigFile, raw, where=where)
    return SiteConfig(
        site_name=model.site_name,
        coordinator_host=model.coordinator.host,
        coordinator_port=model.coordinator.port,
        data_dir=model.data_dir,
        work_dir=model.work_dir,
        runtime=model.runtime,
        docker=model.docker or DockerSettings(),
        registry=model.registry,
        device=model.device,
    )


def _where_from(p: Path) -> str:
    """How the path was chosen, for the not-found message (staff often run from another folder)."""
    if os.environ.get(CONFIG_ENV) and Path(os.environ[CONFIG_ENV]) == p:
        how = f"from ${CONFIG_ENV}"
    elif str(p) == DEFAULT_CONFIG:
        how = "the default, in the current folder"
    else:
        how = "from --config"
    return f" (looked for {p.absolute()}, {how})"


def load(path: str | os.PathLike[str] | None = None) -> SiteConfig:
    """Read and validate the site config file.

    Args:
        path: the file (None: $FEDIMG_SITE_CONFIG, else ./site.yaml).

    Returns:
        The SiteConfig, with ``path`` set to the file's resolved path.

    Raises:
        ConfigError: the file is missing, not YAML, or has problems (every one listed).
    """
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: site config not found{_where_from(p)}; pass the site's config with --config PATH "
                          f"(before the command) or ${CONFIG_ENV}, or create one with `site-agent init`", file=p)  # fmt: skip
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})", file=p) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read ({exc})", file=p) from None
    cfg = validate(raw, str(p))
    cfg.path = p.resolve()
    return cfg
