"""`site-agent atlas`: the FedSR atlases this site pulled from the coordinator's registry.

A pulled version lives in ``<work_dir>/models/registry/atlas/<name>/<vNNNN>/``, where a FedSR
plan reads it (``plan_args.atlas`` names the version and its sha256, checked at every load).
An atlas is tensors only (safetensors: nothing runs when it is read) and a record of where it
comes from and why it may be shared; a pull is kept only when it verifies and reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.fedsr.atlas import KIND, AtlasError, atlas_folder, load_atlas
from site_agent.adapt_common import parse_ref, staged_pulls
from site_agent.config import SiteConfig
from site_agent.errors import UserError

__all__ = ["list_atlases", "pull_atlas"]


def pull_atlas(site: SiteConfig, ref: str) -> dict[str, Any]:
    """Pull an atlas version (every file checked against the registry's sha256, then read).

    Args:
        site: the site.
        ref: ``NAME`` (the latest version) or ``NAME@vNNNN``.

    Returns:
        ``{"name", "version", "sha256", "folder", "classes", "source", "sharing"}``.

    Raises:
        UserError: a bad reference, a registry refusal, or files that do not verify or read (nothing kept).
    """
    name, version = parse_ref(ref, "atlas")
    with staged_pulls(site) as pulls:
        folder = pulls.pull(KIND, name, version)
        try:
            atlas = load_atlas(folder)
        except AtlasError as exc:
            raise UserError(f"atlas {ref}: {exc}") from None
    final = atlas_folder(site.work_dir / "models", name, folder.name)
    return _row(name, folder.name, final, atlas.meta)


def _row(name: str, version: str, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "sha256": meta["sha256"],
        "folder": str(folder),
        "classes": sorted(meta["classes"]),
        "source": meta["source"],
        "sharing": meta["sharing"],
    }


def list_atlases(site: SiteConfig) -> list[dict[str, Any]]:
    """The atlas versions pulled to this site (each read and verified).

    Args:
        site: the site.

    Returns:
        One row per version (as `pull_atlas`), plus ``problem`` for a version that no longer verifies.
    """
    base = site.work_dir / "models" / "registry" / KIND
    rows: list[dict[str, Any]] = []
    if not base.is_dir():
        return rows
    for name_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            try:
                atlas = load_atlas(version_dir)
            except AtlasError as exc:
                rows.append({"name": name_dir.name, "version": version_dir.name, "folder": str(version_dir), "problem": str(exc)})
                continue
            rows.append(_row(name_dir.name, version_dir.name, version_dir, atlas.meta))
    return rows


def describe(rows: list[dict[str, Any]]) -> str:
    """Rows as JSON (what ``--json`` prints).

    Args:
        rows: from `list_atlases`.

    Returns:
        Indented JSON.
    """
    return json.dumps(rows, indent=2)
