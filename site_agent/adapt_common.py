"""What the adapt and infer commands share: registry references and pulls, the site's dataset, job folders, settings.

A command's pulls are staged (`site_agent.registry_staging.StagedPulls`): they reach
``<work_dir>/models/registry`` only when the command succeeds, and what it loads is checked
against the site's artifact approvals (`pipelines.artifact_approval`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.adaptation.factory import FactoryError, load_factory
from pipelines.adaptation.jobs import JobDir, JobError
from pipelines.adaptation.networks import validate_branch_files
from pipelines.adaptation.training import AdaptSettings
from pipelines.artifact_approval import STORE_ENV, store_dir
from pipelines.device import DeviceError, resolve_device
from preprocessing.dataset import DatasetSchemaError, check_schema
from site_agent.config import SiteConfig
from site_agent.errors import UserError
from site_agent.registry_client import RegistryClient, StagedPulls

if TYPE_CHECKING:
    import torch

# One logger for the adapt and infer commands, under the name their log lines have always had.
log = logging.getLogger("site_agent.adapt")
_REF = re.compile(r"^([A-Za-z0-9_.-]{1,64})(?:@(v\d{4,}|latest))?$")
BRANCH_KIND = "segmentation-branch"


def parse_ref(ref: str, what: str) -> tuple[str, str]:
    """``name`` or ``name@v0003`` / ``name@latest`` -> (name, version).

    Args:
        ref: the reference the user gave.
        what: what it names (``factory``, ``branch``), for the message.

    Returns:
        (name, version), version ``latest`` when none is given.

    Raises:
        UserError: not a valid reference.
    """
    m = _REF.match(ref or "")
    if not m:
        raise UserError(f"{what} {ref!r}: expected NAME or NAME@vNNNN (letters, digits, _ . -)")
    return m.group(1), m.group(2) or "latest"


def site_registry(site: SiteConfig):
    """The site's registry client.

    Args:
        site: the site (its config names the registry).

    Returns:
        A `RegistryClient`.

    Raises:
        UserError: the site config has no registry section.
    """
    if site.registry is None:
        raise UserError(
            f"{site.path or 'site config'}: no registry section; add `registry: {{url: http://COORDINATOR:8750, token_file: /path/to/site-token}}` "
            "(the coordinator's operator issues the token with `coordinator site-token issue SITE`)"
        )
    return RegistryClient.from_site_config(site)


def checked_dataset(site, dataset: str, schema) -> Path:
    """The site's prepared dataset, refused unless it was prepared with the factory's schema.

    Args:
        site: the site.
        dataset: the dataset's path (absolute, or relative to ``data_dir``).
        schema: the factory's label schema.

    Returns:
        The dataset's folder.

    Raises:
        UserError: not a prepared dataset, or prepared with another label schema.
    """
    path = _dataset_path(site, dataset)
    try:
        check_schema(json.loads((path / "manifest.json").read_text()), schema, str(path))
    except DatasetSchemaError as exc:
        raise UserError(str(exc)) from None
    return path


def _dataset_path(site: SiteConfig, dataset: str) -> Path:
    p = Path(dataset)
    if not p.is_absolute():
        p = site.data_dir / p
    if not (p / "manifest.json").is_file():
        raise UserError(f"{p}: not a prepared dataset (no manifest.json); prepare it with `site-agent prepare`")
    return p


def job_dir(site: SiteConfig, job: str) -> Path:
    """The folder of an adaptation job: ``<work_dir>/adapt/<job>``.

    Args:
        site: the site.
        job: the job's name.

    Returns:
        The folder (not created).
    """
    return site.work_dir / "adapt" / job


def staged_pulls(site: SiteConfig):
    """This command's registry pulls: staged under ``<work_dir>/staging`` (outside the models
    folder), moved into ``<work_dir>/models/registry`` only if the command succeeds.

    Args:
        site: the site (its config names the registry).

    Returns:
        A `StagedPulls` (a context manager: it commits on success).

    Raises:
        UserError: the site config has no registry section.
    """
    return StagedPulls(site_registry(site), site.work_dir / "models" / "registry", site.work_dir / "staging")


@contextlib.contextmanager
def adapt_command(site: SiteConfig):
    """A job command: its pulls are staged, and what it loads is checked against the site's
    artifact approvals (the same store the node uses).

    Args:
        site: the site.

    Yields:
        The command's `StagedPulls` (committed when the block succeeds).
    """
    previous = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = str(store_dir(site.work_dir))
    try:
        with staged_pulls(site) as pulls:
            yield pulls
    finally:
        if previous is None:
            os.environ.pop(STORE_ENV, None)
        else:
            os.environ[STORE_ENV] = previous


def job_device(site: SiteConfig | None, option: str | None) -> torch.device:
    """The torch device a local job (adapt source/target, infer) runs on: ``--device``, else
    the site's ``device``, else auto (the GPU when torch sees one), as `site_agent.models.place_model`.

    Called before the job pulls, reads or writes anything, so a device this machine lacks
    costs nothing.

    Args:
        site: the site (None: no site config, e.g. ``infer`` with a model file).
        option: the job's ``--device`` (None: not given).

    Returns:
        The `torch.device` (``cpu``, ``cuda:0``).

    Raises:
        UserError: a device this machine does not have, in one line naming where it was set
            (``--device`` or the site config) and what to set instead.
    """
    setting = option or (site.device if site is not None else None) or "auto"
    try:
        device = resolve_device(setting)
    except DeviceError as exc:
        where = "--device" if option else (str(site.path) if site is not None and site.path else "the site config")
        raise UserError(f"{where}: {exc}") from None
    log.debug("the job runs on %s", device)
    return device


def pull_factory(site: SiteConfig, ref: str, pulls=None):
    """Pull (or reuse the verified cached copy of) a factory.

    Args:
        site: the site.
        ref: ``NAME`` or ``NAME@vNNNN``.
        pulls: a `StagedPulls`: a download stays staged until the command succeeds
            (None: pull straight into the registry folder).

    Returns:
        (the loaded factory, its folder).

    Raises:
        UserError: a bad reference, a registry refusal, or a factory that does not load.
    """
    name, version = parse_ref(ref, "factory")
    folder = pulls.pull("factory", name, version) if pulls else site_registry(site).pull("factory", name, version)
    try:
        return load_factory(folder, name, folder.name), folder
    except FactoryError as exc:
        raise UserError(str(exc)) from None


def adapt_settings(raw: dict):
    """The adaptation settings, validated.

    Args:
        raw: the settings (keys of `AdaptSettings`).

    Returns:
        The `AdaptSettings`.

    Raises:
        UserError: naming each bad setting.
    """
    try:
        return AdaptSettings.from_dict(raw, "adaptation settings")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def open_job(root: Path, kind: str, config: dict, restart: bool):
    """Open (or resume) an adaptation job folder.

    Args:
        root: the job's folder.
        kind: ``source`` or ``target``.
        config: what the job is (dataset, factory, branch, settings): a resumed job must match.
        restart: start the job again (its old folder is kept aside).

    Returns:
        (the `JobDir`, whether it resumes from a checkpoint).

    Raises:
        UserError: a job folder that cannot be opened or resumed with this config.
    """
    try:
        job = JobDir(root, kind, config)
        return job, job.open(restart=restart)
    except JobError as exc:
        raise UserError(str(exc)) from None


def finite_values(d: dict) -> dict:
    """Numbers for a JSON summary: floats rounded to 4 places, NaN and infinities as None.

    Args:
        d: name -> value.

    Returns:
        The same keys (as strings) with the values cleaned.
    """
    return {str(k): (round(v, 4) if isinstance(v, float) and math.isfinite(v) else None) for k, v in d.items()}


def pull_branch(site: SiteConfig, ref: str, pulls=None):
    """Pull a published source branch and check its files (the security boundary).

    Args:
        site: the site.
        ref: ``NAME`` or ``NAME@vNNNN``.
        pulls: a `StagedPulls`: a download stays staged until the command succeeds
            (None: pull straight into the registry folder).

    Returns:
        (the branch, its record's ``meta``, its folder).

    Raises:
        UserError: a bad reference, a registry refusal, or branch files that do not validate.
    """
    name, version = parse_ref(ref, "branch")
    folder = pulls.pull(BRANCH_KIND, name, version) if pulls else site_registry(site).pull(BRANCH_KIND, name, version)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name in ("branch.pt", "branch.json")}
    try:
        branch = validate_branch_files(files)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}") from None
    record = json.loads((folder / "artifact.json").read_text())
    return branch, record.get("meta", {}), folder


def dice_rows(values: dict, names: list[str]) -> list[list]:
    """Rows of a report's Dice table: class name, Dice to 3 places (``-`` when undefined).

    Args:
        values: class id (as a string) -> mean Dice.
        names: the model's class names, by class id.

    Returns:
        One ``[name, value]`` row per class.
    """
    return [[names[int(k)], "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"] for k, v in values.items()]
