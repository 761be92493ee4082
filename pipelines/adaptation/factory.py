"""The published data factory, as an adaptation job uses it: frozen G_ema + what it was trained on.

A factory version in the registry (see coordinator/factory.py:publish) holds
``generator.pt`` (G_ema's parameters, tensors only), ``factory.pt`` (G, D, G_ema; not
needed here) and ``factory.json`` (its `FactoryConfig`, the client ids of the sites that
trained it, the slice settings and the label schema). Adaptation jobs sample and invert
G_ema only, always frozen, always without a domain key: a site's key and its key layers
never left it, and the published key layers are their untrained initial values (the
factory was trained with the key dropped on half of the updates, so key None is a
condition it knows). What a job reads of ``factory.json`` is the `FactoryDescription` model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from fedimg_core.config import ConfigModel, format_problems, problems_of, short
from pipelines.config_fields import ConfigValueError, is_int, worded_number
from pipelines.factory.networks import FactoryConfig, Generator, requires_grad
from pipelines.factory.slices import SliceSettings
from pipelines.plan_args_common import parse_spacing
from preprocessing.schema import LabelSchema, parse_schema

GENERATOR_FILE = "generator.pt"
CONFIG_FILE = "factory.json"


class FactoryError(ConfigValueError):
    """A factory folder is incomplete or inconsistent; the message names the file."""


def _format(value: Any) -> str:
    if value != "fedimg-factory":
        raise ValueError(f"not a fedimg factory description (format {short(value)})")
    return "fedimg-factory"


def _clients(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_int(v) for k, v in value.items()):
        raise ValueError("must map site names to client ids")
    return {k: int(v) for k, v in value.items()}


def _schema_definition(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("missing (published before adaptation support; publish the factory again)")
    return value


class SliceDescription(ConfigModel):
    """``factory.json``'s ``slices``: how the factory's training slices were cut."""

    model_config = ConfigDict(extra="ignore")  # size and n_bins repeat the factory config
    spacing: Annotated[str | tuple[float, ...] | None, BeforeValidator(lambda v: None if v is None else parse_spacing(v))] = "schema"  # None: native
    min_foreground: Annotated[float, worded_number(0.0, 1.0)] = 0.0


class FactoryDescription(ConfigModel):
    """What an adaptation job reads of a published ``factory.json`` (its other keys are provenance)."""

    model_config = ConfigDict(extra="ignore")
    format: Annotated[str, BeforeValidator(_format)] = Field(default=None, validate_default=True)
    factory: dict[str, Any] | None = None  # a FactoryConfig (checked with its own messages)
    clients: Annotated[dict[str, int], BeforeValidator(_clients)] = {}  # site name -> client id
    schema_definition: Annotated[dict[str, Any], BeforeValidator(_schema_definition)] = Field(default=None, validate_default=True)
    slices: Annotated[SliceDescription, BeforeValidator(lambda v: {} if v is None else v)] = Field(default_factory=SliceDescription)
    name: str = ""


@dataclass
class Factory:
    """A published factory loaded for adaptation: frozen G_ema, its config, client ids, slice settings and label schema.

    Args:
        generator: G_ema, eval mode, no gradients.
        config: its sizes.
        clients: site name -> client id.
        slices: the slice settings it was trained on.
        schema: the label schema.
        identity: name, version, sha256 of generator.pt.
        meta: the whole ``factory.json``.
    """

    generator: Generator  # G_ema, eval mode, no gradients
    config: FactoryConfig
    clients: dict[str, int]  # site name -> client id
    slices: SliceSettings
    schema: LabelSchema
    identity: dict[str, str] = field(default_factory=dict)  # name, version, sha256 of generator.pt
    meta: dict[str, Any] = field(default_factory=dict)

    def client_id(self, site: str | None) -> int | None:
        """The client id a site trained the factory under.

        Args:
            site: the site name (None: none).

        Returns:
            The client id, or None for a site that was not a member.
        """
        return None if site is None else self.clients.get(site)

    def describe(self) -> dict[str, Any]:
        """Identity, resolution and client ids, for reports and job records.

        Returns:
            ``{name, version, sha256, resolution, clients}``.
        """
        return {**self.identity, "resolution": self.config.resolution, "clients": dict(self.clients)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FactoryError(f"{path}: missing (not a published factory folder)") from None
    except (OSError, ValueError) as exc:
        raise FactoryError(f"{path}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise FactoryError(f"{path}: expected a JSON object")
    return raw


def load_factory(folder: str | Path, name: str = "", version: str = "") -> Factory:
    """Load the factory published in a registry version folder (already checksum verified by whoever fetched it).

    Args:
        folder: the version folder (``factory.json``, ``generator.pt``).
        name: the factory's name (default: the one ``factory.json`` records).
        version: its version.

    Returns:
        The factory, its generator frozen.

    Raises:
        FactoryError: (a ValueError) naming the file and the problem.
    """
    folder = Path(folder)
    meta = _read_json(folder / CONFIG_FILE)
    where = str(folder / CONFIG_FILE)
    if meta.get("format") != "fedimg-factory":  # before anything else: then nothing else is worth reporting
        raise FactoryError(f"{where}: not a fedimg factory description (format {short(meta.get('format'))})")
    try:
        desc = FactoryDescription.model_validate(meta)
    except ValidationError as exc:
        problems = problems_of(exc, FactoryDescription)
        raise FactoryError(format_problems(where, problems), file=where, key=problems[0][0]).with_problems(problems) from None
    try:
        cfg = FactoryConfig.from_dict(desc.factory, where=f"{where}: factory")
    except ConfigValueError as exc:  # callers catch FactoryError (site-agent adapt: one clear line)
        raise FactoryError(str(exc), file=where, key=exc.key).with_problems(exc.problems) from None
    bad = [s for s, i in desc.clients.items() if not 0 <= i < cfg.n_clients]
    if bad:
        raise FactoryError(f"{where}: client ids of {', '.join(bad)} outside [0, {cfg.n_clients})")
    try:
        schema = parse_schema(desc.schema_definition, f"{where}: schema_definition")
    except Exception as exc:  # SchemaError and friends: the message already names the field
        raise FactoryError(str(exc)) from None
    spacing: Any = desc.slices.spacing  # "schema", None or three numbers (checked)
    slices = SliceSettings(size=cfg.resolution, n_bins=cfg.n_bins, spacing=spacing, min_foreground=desc.slices.min_foreground)
    gen_path = folder / GENERATOR_FILE
    try:
        blob = gen_path.read_bytes()
    except OSError as exc:
        raise FactoryError(f"{gen_path}: unreadable ({exc})") from None
    try:
        state = torch.load(gen_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FactoryError(f"{gen_path}: not a tensor file ({exc})") from None
    generator = Generator(cfg)
    try:
        generator.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise FactoryError(f"{gen_path}: does not match the configuration in {CONFIG_FILE} ({str(exc).splitlines()[0]})") from None
    generator.eval()
    requires_grad(generator, False)
    identity = {"name": name or desc.name, "version": version, "sha256": hashlib.sha256(blob).hexdigest()}
    return Factory(generator=generator, config=cfg, clients=desc.clients, slices=slices, schema=schema, identity=identity, meta=meta)
