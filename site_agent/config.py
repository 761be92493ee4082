"""The site configuration file (YAML), validated at the boundary.

Example::

    site_name: hospital-a
    coordinator: {host: coordinator.example.org, port: 50051}
    data_dir: /srv/fedimg/data        # prepared datasets live below here
    work_dir: /srv/fedimg/work        # Fed-BioMed node component, pid file, logs
    runtime: auto                     # auto | process | docker
    docker: {image: fedimg-site:0.1.0}
    registry:                         # optional: the coordinator's artifact registry
      url: http://coordinator.example.org:8750
      token_file: /srv/fedimg/site-token   # optional; else $FEDIMG_SITE_TOKEN
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fedimg_core import atomic
from site_agent.errors import ConfigError

CONFIG_ENV = "FEDIMG_SITE_CONFIG"
DEFAULT_CONFIG = "site.yaml"
RUNTIMES = ("auto", "process", "docker")
DEFAULT_IMAGE = "fedimg-site:0.1.0"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_KEYS = {"site_name", "coordinator", "data_dir", "work_dir", "runtime", "docker", "registry", "config_version"}
_REGISTRY_KEYS = {"url", "token_file"}


@dataclass
class DockerSettings:
    image: str = DEFAULT_IMAGE
    restart: str = "unless-stopped"
    network: str | None = None


@dataclass
class RegistrySettings:
    """Where the coordinator's artifact registry is, and the file holding this site's token
    (None: the token comes from $FEDIMG_SITE_TOKEN)."""

    url: str
    token_file: Path | None = None


@dataclass
class SiteConfig:
    site_name: str
    coordinator_host: str
    coordinator_port: int
    data_dir: Path
    work_dir: Path
    runtime: str = "auto"
    docker: DockerSettings = field(default_factory=DockerSettings)
    path: Path | None = None  # where it was loaded from
    registry: RegistrySettings | None = None

    @property
    def node_dir(self) -> Path:
        """The Fed-BioMed node component folder."""
        return self.work_dir / "node"

    @property
    def pid_file(self) -> Path:
        return self.work_dir / "node.pid"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "node.log"

    def to_dict(self) -> dict:
        out = {
            "config_version": 1,
            "site_name": self.site_name,
            "coordinator": {"host": self.coordinator_host, "port": self.coordinator_port},
            "data_dir": str(self.data_dir),
            "work_dir": str(self.work_dir),
            "runtime": self.runtime,
            "docker": asdict(self.docker),
        }
        if self.registry is not None:
            reg = {"url": self.registry.url}
            if self.registry.token_file is not None:
                reg["token_file"] = str(self.registry.token_file)
            out["registry"] = reg
        return out

    def save(self, path: str | os.PathLike) -> None:
        atomic.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def validate(raw: object, where: str) -> SiteConfig:
    """Build a SiteConfig from parsed YAML; raise ConfigError naming `where` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    name = raw.get("site_name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: site_name must be 1-63 of a-z 0-9 _ - starting with a letter or digit (got {name!r})")
    coord = raw.get("coordinator")
    if not isinstance(coord, dict):
        raise ConfigError(f"{where}: coordinator must be a mapping with host and port")
    host, port = coord.get("host"), coord.get("port")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"{where}: coordinator.host must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: coordinator.port must be an integer in 1..65535 (got {port!r})")
    dirs = {}
    for key in ("data_dir", "work_dir"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a path")
        p = Path(value)
        if not p.is_absolute():
            raise ConfigError(f"{where}: {key} must be an absolute path (got {value!r})")
        dirs[key] = p
    runtime = raw.get("runtime", "auto")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{where}: runtime must be one of {', '.join(RUNTIMES)} (got {runtime!r})")
    docker_raw = raw.get("docker") or {}
    if not isinstance(docker_raw, dict) or set(docker_raw) - {"image", "restart", "network"}:
        raise ConfigError(f"{where}: docker must be a mapping with keys image, restart, network")
    docker = DockerSettings(**docker_raw)
    if docker.restart not in ("no", "always", "unless-stopped", "on-failure"):
        raise ConfigError(f"{where}: docker.restart must be no, always, unless-stopped or on-failure")
    registry = _validate_registry(raw.get("registry"), where) if raw.get("registry") is not None else None
    return SiteConfig(
        site_name=name,
        coordinator_host=host.strip(),
        coordinator_port=port,
        data_dir=dirs["data_dir"],
        work_dir=dirs["work_dir"],
        runtime=runtime,
        docker=docker,
        registry=registry,
    )


def _validate_registry(reg: object, where: str) -> RegistrySettings:
    if not isinstance(reg, dict) or set(reg) - _REGISTRY_KEYS or "url" not in reg:
        raise ConfigError(f"{where}: registry must be a mapping with url and optionally token_file")
    url = reg["url"]
    if not isinstance(url, str):
        raise ConfigError(f"{where}: registry.url must be an http:// or https:// URL (got {url!r})")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"{where}: registry.url {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: registry.url must be an http:// or https:// URL with a host (got {url!r})")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ConfigError(
            f"{where}: registry.url must be plain scheme://host[:port][/path], no credentials, query or fragment "
            "(the token goes in registry.token_file)"
        )
    token_file = reg.get("token_file")
    if token_file is not None:
        if not isinstance(token_file, str) or not token_file or not Path(token_file).is_absolute():
            raise ConfigError(f"{where}: registry.token_file must be an absolute path (got {token_file!r})")
        token_file = Path(token_file)
    return RegistrySettings(url=url.strip().rstrip("/"), token_file=token_file)


def _where_from(p: Path) -> str:
    """How the path was chosen, for the not-found message (staff often run from another folder)."""
    if os.environ.get(CONFIG_ENV) and Path(os.environ[CONFIG_ENV]) == p:
        how = f"from ${CONFIG_ENV}"
    elif str(p) == DEFAULT_CONFIG:
        how = "the default, in the current folder"
    else:
        how = "from --config"
    return f" (looked for {p.absolute()}, {how})"


def load(path: str | os.PathLike | None = None) -> SiteConfig:
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: site config not found{_where_from(p)}; pass the site's config with --config PATH "
                          f"(before the command) or ${CONFIG_ENV}, or create one with `site-agent init`")  # fmt: skip
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    cfg = validate(raw, str(p))
    cfg.path = p.resolve()
    return cfg
