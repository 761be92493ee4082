"""The published data factory, as an adaptation job uses it: frozen G_ema + what it was trained on.

A factory version in the registry (see coordinator/factory.py:publish) holds
``generator.pt`` (G_ema's parameters, tensors only), ``factory.pt`` (G, D, G_ema; not
needed here) and ``factory.json`` (its `FactoryConfig`, the client ids of the sites that
trained it, the slice settings and the label schema). Adaptation jobs sample and invert
G_ema only, always frozen, always without a domain key: a site's key and its key layers
never left it, and the published key layers are their untrained initial values (the
factory was trained with the key dropped on half of the updates, so key None is a
condition it knows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedimg_core.errors import FedimgError
from pipelines.factory.networks import FactoryConfig, Generator, requires_grad
from pipelines.factory.slices import SliceSettings
from preprocessing.schema import LabelSchema, parse_schema

GENERATOR_FILE = "generator.pt"
CONFIG_FILE = "factory.json"


class FactoryError(FedimgError, ValueError):
    """A factory folder is incomplete or inconsistent; the message names the file."""


@dataclass
class Factory:
    generator: Generator  # G_ema, eval mode, no gradients
    config: FactoryConfig
    clients: dict[str, int]  # site name -> client id
    slices: SliceSettings
    schema: LabelSchema
    identity: dict[str, str] = field(default_factory=dict)  # name, version, sha256 of generator.pt
    meta: dict[str, Any] = field(default_factory=dict)

    def client_id(self, site: str | None) -> int | None:
        """The client id a site trained the factory under; None for a site that was not a member."""
        return None if site is None else self.clients.get(site)

    def describe(self) -> dict:
        return {**self.identity, "resolution": self.config.resolution, "clients": dict(self.clients)}


def _read_json(path: Path) -> dict:
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
    """Load the factory published in ``folder`` (a registry version folder, already checksum
    verified by whoever fetched it). Raises `FactoryError` naming the file and the problem."""
    folder = Path(folder)
    meta = _read_json(folder / CONFIG_FILE)
    where = str(folder / CONFIG_FILE)
    if meta.get("format") != "fedimg-factory":
        raise FactoryError(f"{where}: not a fedimg factory description (format {meta.get('format')!r})")
    try:
        cfg = FactoryConfig.from_dict(meta.get("factory"), where=f"{where}: factory")
    except (TypeError, ValueError) as exc:
        raise FactoryError(str(exc)) from None
    clients_raw = meta.get("clients") or {}
    if not isinstance(clients_raw, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in clients_raw.items()):
        raise FactoryError(f"{where}: clients must map site names to client ids")
    clients = dict(clients_raw)
    bad = [s for s, i in clients.items() if not 0 <= i < cfg.n_clients]
    if bad:
        raise FactoryError(f"{where}: client ids of {', '.join(bad)} outside [0, {cfg.n_clients})")
    raw_schema = meta.get("schema_definition")
    if not isinstance(raw_schema, dict):
        raise FactoryError(f"{where}: no schema_definition (published before adaptation support; publish the factory again)")
    try:
        schema = parse_schema(raw_schema, f"{where}: schema_definition")
    except Exception as exc:  # SchemaError and friends: the message already names the field
        raise FactoryError(str(exc)) from None
    s = meta.get("slices") or {}
    spacing = s.get("spacing", "schema")
    slices = SliceSettings(
        size=cfg.resolution,
        n_bins=cfg.n_bins,
        spacing=tuple(spacing) if isinstance(spacing, list) else spacing,
        min_foreground=float(s.get("min_foreground", 0.0)),
    )
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
    identity = {"name": name or str(meta.get("name", "")), "version": version, "sha256": hashlib.sha256(blob).hexdigest()}
    return Factory(generator=generator, config=cfg, clients=clients, slices=slices, schema=schema, identity=identity, meta=meta)
