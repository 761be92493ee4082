"""`site-agent models`: the federation's published model packages at this site: list, pull, resolve.

Pulled versions live in ``<work_dir>/models/registry/model/<name>/<vNNNN>/`` (a verified pull:
`site_agent.registry_pull`); a pull is staged and kept only when the package also loads
(`pipelines.model_package.load_package`: checksums, plan arguments, strict weights). Every
load checks every file again, so a package changed after the pull is refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pipelines.model_package import RECORD_FILE, ModelPackage, PackageError, load_package
from site_agent.adapt_common import parse_ref, site_registry, staged_pulls
from site_agent.config import SiteConfig
from site_agent.errors import UserError
from site_agent.registry_transport import RegistryClientError

log = logging.getLogger(__name__)

KIND = "model"
_VERSION = re.compile(r"^v(\d{4,})$")

__all__ = ["KIND", "PERSONAL_PREFIX", "cached_versions", "list_models", "list_personal_models", "open_model", "open_personal_model", "pull_model"]

PERSONAL_PREFIX = "personal:"  # --model personal:<run>: this site's personalised FedSR model of that run


def _cache(site: SiteConfig) -> Path:
    return site.work_dir / "models" / "registry" / KIND


def cached_versions(site: SiteConfig, name: str) -> list[str]:
    """The versions of `name` pulled to this site, oldest first.

    Args:
        site: the site.
        name: the package name.

    Returns:
        ``vNNNN`` names.
    """
    base = _cache(site) / name
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in base.iterdir() if (m := _VERSION.match(d.name)) and _record_matches(d, name)]
    return [v for _, v in sorted(found)]


def _record_matches(folder: Path, name: str) -> bool:
    """Whether `folder` holds a pulled version: the registry's record, of this kind, name and version."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == KIND and record.get("name") == name and record.get("version") == folder.name


def _load_cached(site: SiteConfig, name: str, version: str) -> ModelPackage:
    folder = _cache(site) / name / version
    if not _record_matches(folder, name):
        raise UserError(f"{folder}: not a pulled version of model {name} (no registry record of it); pull it again: site-agent models pull {name}@{version}")
    try:
        return load_package(folder)
    except PackageError as exc:
        raise UserError(str(exc)) from None


def list_models(site: SiteConfig, remote: bool = True) -> list[dict[str, Any]]:
    """Model packages: published in the registry (when `remote`) and pulled to this site.

    Args:
        site: the site.
        remote: also ask the registry (needs its section in the site config).

    Returns:
        One row per (name, version): ``name``, ``version``, ``pulled`` (bool), ``published``
        (bool, None when the registry was not asked), ``classes``, ``model``, ``run_id``.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if remote:
        for rec in site_registry(site).list(KIND):
            meta = rec.get("meta") or {}
            rows[(rec["name"], rec["version"])] = {
                "name": rec["name"], "version": rec["version"], "created": rec.get("created"), "pulled": False, "published": True,
                "classes": meta.get("classes") or [], "model": meta.get("model"), "run_id": meta.get("run_id"),
            }  # fmt: skip
    base = _cache(site)
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        for version in cached_versions(site, folder.name):
            row = rows.setdefault((folder.name, version), {"name": folder.name, "version": version, "published": None if not remote else False})
            row["pulled"] = True
            row.setdefault("classes", [])
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], int(k[1][1:])))]


def pull_model(site: SiteConfig, ref: str) -> ModelPackage:
    """Pull a model package (or reuse the verified copy already here) and load it.

    Args:
        site: the site.
        ref: ``NAME`` (the latest version) or ``NAME@vNNNN``.

    Returns:
        The loaded package.

    Raises:
        UserError: a bad reference, a registry refusal or a download that does not verify
            (nothing kept), or a package that does not load (nothing kept).
    """
    name, version = parse_ref(ref, "model")
    with staged_pulls(site) as pulls:
        folder = pulls.pull(KIND, name, version)
        try:
            package = load_package(folder)
        except PackageError as exc:
            raise UserError(f"model {ref}: {exc}") from None
    # committed: the package now lives in the registry folder
    final = _cache(site) / name / folder.name
    return load_package(final) if final.is_dir() else package


def open_model(site: SiteConfig | None, model: str) -> ModelPackage:
    """The model package `model` names: a package folder, or ``NAME[@vNNNN]`` of the registry.

    ``NAME@vNNNN`` already pulled loads from this site's copy; otherwise it is pulled. ``NAME``
    alone asks the registry for its latest version; when the registry cannot be reached, the
    newest version pulled here is used (and said so).

    Args:
        site: the site (None: only folders can be named).
        model: a folder with ``package.json``, or a registry reference.

    Returns:
        The loaded, verified package.

    Raises:
        UserError: no such folder or package, or a package that does not verify or load.
    """
    if model.startswith(PERSONAL_PREFIX):
        if site is None:
            raise UserError(f"--model {model!r}: a personalised model is a site's own: it needs the site config")
        return open_personal_model(site, model[len(PERSONAL_PREFIX) :])
    path = Path(model)
    if path.is_dir():
        try:
            return load_package(path)
        except PackageError as exc:
            raise UserError(str(exc)) from None
    if site is None:
        raise UserError(f"--model {model!r}: no such package folder (a registry name needs a site config)")
    name, version = parse_ref(model, "model")
    if version != "latest" and (_cache(site) / name / version).is_dir():
        return _load_cached(site, name, version)
    try:
        return pull_model(site, model)
    except RegistryClientError as exc:
        pulled = cached_versions(site, name)
        if version != "latest" or not pulled or "cannot reach the registry" not in str(exc):
            raise
        log.warning("the registry cannot be reached (%s); using %s@%s, the newest version pulled here", exc, name, pulled[-1])
        return _load_cached(site, name, pulled[-1])


def place_model(package: ModelPackage, site: SiteConfig | None, option: str | None) -> str:
    """Put a package's network on the device a local job runs on: ``--device``, else the site's, else auto.

    Args:
        package: the loaded package (its network moves).
        site: the site (None: a package folder named without a site config).
        option: the job's ``--device`` (None: not given).

    Returns:
        The device, as torch names it (``cpu``, ``cuda:0``).

    Raises:
        UserError: a device this machine does not have (one line saying what to set).
    """
    from site_agent.adapt_common import job_device  # torch: only when a job runs

    device = job_device(site, option)
    package.network.to(device)
    log.info("model %s runs on %s", package.ref, device)
    return str(device)


def _personal_dir(site: SiteConfig) -> Path:
    return site.work_dir / "cache" / "fedsr"


def list_personal_models(site: SiteConfig) -> list[dict[str, Any]]:
    """This site's personalised FedSR models (one per run; the last round that scored).

    Args:
        site: the site.

    Returns:
        One row per run: ``ref`` (what --model takes), ``run_id``, ``round`` (from 1), ``method``, ``atlas``,
        ``path``; or ``problem`` for a file that does not load.
    """
    from pipelines.fedsr.personal import load_personal_model

    rows: list[dict[str, Any]] = []
    folder = _personal_dir(site)
    for path in sorted(folder.glob("*-model.pt")) if folder.is_dir() else []:
        run = path.name[: -len("-model.pt")]
        try:
            meta = load_personal_model(path).meta
        except ValueError as exc:
            rows.append({"ref": f"{PERSONAL_PREFIX}{run}", "run_id": run, "path": str(path), "problem": str(exc)})
            continue
        atlas = meta["atlas"]
        rows.append({"ref": f"{PERSONAL_PREFIX}{run}", "run_id": run, "round": meta["round"] + 1, "method": meta["method"],
                     "atlas": f"{atlas['name']}@{atlas['version']}", "path": str(path)})  # fmt: skip
    return rows


def open_personal_model(site: SiteConfig, run_id: str) -> ModelPackage:
    """This site's personalised FedSR model of a run, in the form `site-agent infer` and `evaluate` run.

    Args:
        site: the site.
        run_id: the FedSR run.

    Returns:
        A package view of it: its segmentation path as the network, the schema's preprocessing, the
        training volume as the window; never published (``--send`` refuses it: it stays at the site).

    Raises:
        UserError: no such run here, or a file that does not load.
    """
    from fedimg_core.config_types import is_plain_name
    from pipelines.fedsr.personal import load_personal_model
    from pipelines.model_package import WEIGHTS_FILE

    if not is_plain_name(run_id):
        raise UserError(f"--model {PERSONAL_PREFIX}{run_id}: a run id is a plain name (letters, digits, '-', '_', '.')")
    path = _personal_dir(site) / f"{run_id}-model.pt"
    if not path.is_file():
        known = ", ".join(r["ref"] for r in list_personal_models(site)) or "none"
        raise UserError(f"{path}: no personalised model of run {run_id} at this site (this site has: {known})")
    try:
        personal = load_personal_model(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    config = {
        "name": f"fedsr-personal-{run_id}",
        "classes": dict(personal.schema.classes),
        "files": {WEIGHTS_FILE: {"sha256": personal.meta["sha256"]}},
        "personal": {k: personal.meta[k] for k in ("run_id", "round", "method", "atlas")},
    }
    return ModelPackage(folder=path.parent, config=config, settings=personal.settings, network=personal.segmenter)
