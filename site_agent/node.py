"""The site's Fed-BioMed node component: creation, dataset registry, plan approvals."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedimg_core.fedbiomed_console import quiet_fedbiomed_console
from preprocessing.dataset import DatasetError, PreparedDataset, load_dataset
from preprocessing.qc_flags import SUSPECT_IMAGE_FLAGS
from site_agent.config import SiteConfig
from site_agent.errors import UserError

# deferred: start-up time: Fed-BioMed takes seconds to import; the functions that talk to the
# node import it, so commands that do not (and `site-agent --help`) stay fast.

# Security settings every site runs with; also forced through the environment at start so
# a stray FBM_SECURITY_* variable cannot switch approval off.
SECURITY_SETTINGS = {
    "training_plan_approval": "True",
    "allow_default_training_plans": "False",
    # Not used by fedimg: closed so that nothing runs on the site's data but approved plans.
    "allow_federated_analytics": "False",
    "allow_preproc": "False",
}
# Secure aggregation (a spec's ``secagg``): a new node takes part when a run asks for it and trains
# plain runs too. The site's own choice, kept in the node's etc/config.ini ``[security]`` (never
# forced: any FBM_* variable is dropped at start, so the file decides): ``secure_aggregation =
# False`` refuses securely aggregated runs, ``force_secure_aggregation = True`` refuses the others;
# a refused round fails naming the site ("Could not configure secure aggregation on node").
SECAGG_DEFAULTS = {"secure_aggregation": "True", "force_secure_aggregation": "False"}
DATA_TYPE = "custom"  # prepared datasets are read by pipelines.plans.datasets.PreparedSegmentationDataset


def _scrubbed_env() -> None:
    for key in [k for k in os.environ if k.startswith("FBM_")]:  # Fed-BioMed reads FBM_* over its config
        del os.environ[key]


def create_node(site: SiteConfig) -> str:
    """Create (or re-open) the node component with approval ON and default plans OFF (and, on a
    new node, secure aggregation accepted but not required: `SECAGG_DEFAULTS`).

    Args:
        site: the site (the node lives in its ``node_dir``).

    Returns:
        The node's id.
    """
    _scrubbed_env()
    quiet_fedbiomed_console()
    from fedbiomed.node.config import NodeComponent

    site.node_dir.parent.mkdir(parents=True, exist_ok=True)
    new = not (site.node_dir / "etc" / "config.ini").is_file()
    config = NodeComponent().initiate(root=str(site.node_dir), alias=site.site_name)
    quiet_fedbiomed_console()
    for key, value in SECURITY_SETTINGS.items():
        config.set("security", key, value)
    if new:  # an existing node keeps its operator's choice
        for key, value in SECAGG_DEFAULTS.items():
            config.set("security", key, value)
    config.set("default", "name", site.site_name)
    config.set("researcher", "ip", site.coordinator_host)
    config.set("researcher", "port", str(site.coordinator_port))
    config.write()
    return config.get("default", "id")


def _config(site: SiteConfig) -> Any:
    if not (site.node_dir / "etc" / "config.ini").is_file():
        raise UserError(f"{site.node_dir}: no Fed-BioMed node here; run `site-agent init` first")
    _scrubbed_env()
    quiet_fedbiomed_console()
    from fedbiomed.node.config import NodeConfig

    config = NodeConfig(root=str(site.node_dir))
    quiet_fedbiomed_console()
    return config


def node_settings(site: SiteConfig) -> dict[str, Any]:
    """Identity and security settings as the node will read them.

    Args:
        site: the site.

    Returns:
        ``node_id``, ``name``, ``training_plan_approval``, ``allow_default_training_plans``,
        ``secure_aggregation``, ``force_secure_aggregation`` and ``db`` (the node database's path).

    Raises:
        UserError: no node was created here (`site-agent init`).
    """
    config = _config(site)
    return {
        "node_id": config.get("default", "id"),
        "name": config.get("default", "name"),
        "training_plan_approval": config.getbool("security", "training_plan_approval"),
        "allow_default_training_plans": config.getbool("security", "allow_default_training_plans"),
        "secure_aggregation": config.getbool("security", "secure_aggregation"),
        "force_secure_aggregation": config.getbool("security", "force_secure_aggregation"),
        "db": str(Path(config.root) / "etc" / config.get("default", "db")),
    }


def _node_db(site: SiteConfig) -> str:
    """The path of the site's node database, with Fed-BioMed's connector pointed at it.

    Fed-BioMed 6.4.1's ``TinyDBConnector`` is a process-wide singleton that keeps the first
    database path it was given and ignores every later one, so a process that touches two
    sites' nodes (the testbed, tests) would read and write the first site's database.
    """
    from fedbiomed.common.db import TinyDBConnector

    path = node_settings(site)["db"]
    connector = TinyDBConnector._instance
    if connector is not None and getattr(connector, "_fedimg_db_path", None) != path:
        connector._db.close()
        TinyDBConnector._instance = None
    TinyDBConnector(path)._fedimg_db_path = path  # a marker on Fed-BioMed's (untyped) singleton
    return path


def _dataset_manager(site: SiteConfig) -> Any:
    from fedbiomed.node.dataset_manager import DatasetManager

    return DatasetManager(path=_node_db(site))


@dataclass
class DatasetEntry:
    """A dataset registered with the node, as `site-agent dataset list` shows it.

    Args:
        dataset_id: the node's id for it.
        name: the name shown to researchers.
        tags: the tags researchers select it by.
        description: the description shown to researchers (allowlisted fields only).
        path: the prepared dataset folder.
        data_type: Fed-BioMed's data type (``custom`` for prepared datasets).
    """

    dataset_id: str
    name: str
    tags: list[str]
    description: str
    path: str
    data_type: str


def list_datasets(site: SiteConfig) -> list[DatasetEntry]:
    """The datasets registered with the node.

    Args:
        site: the site.

    Returns:
        One entry per dataset, in the node's order.

    Raises:
        UserError: no node was created here.
    """
    rows = _dataset_manager(site).list_my_datasets(verbose=False)
    return [
        DatasetEntry(
            dataset_id=r["dataset_id"],
            name=r.get("name", ""),
            tags=list(r.get("tags") or []),
            description=r.get("description", ""),
            path=r.get("path", ""),
            data_type=r.get("data_type", ""),
        )
        for r in rows
    ]


def add_dataset(
    site: SiteConfig, path: str | os.PathLike[str], tags: list[str], name: str | None = None,
    allow_unlabelled: bool = False, allow_suspect_images: bool = False,
) -> DatasetEntry:  # fmt: skip
    """Register a prepared dataset; refuse folders that are not valid prepared datasets.

    The description stored with the node (and shown to researchers) is built from the
    dataset's allowlisted fields only (name, case count, modality, class names).

    Args:
        site: the site.
        path: the prepared dataset folder.
        tags: tags researchers select it by.
        name: name shown to researchers (default: the dataset's).
        allow_unlabelled: register cases without a label too (refused by default: a
            training federation would silently get fewer cases than the site meant).
        allow_suspect_images: register cases flagged as probably not images
            (`preprocessing.prepare.SUSPECT_IMAGE_FLAGS`; refused by default).

    Returns:
        The registered entry.

    Raises:
        UserError: the folder is not a valid prepared dataset, holds refused kinds of
            cases, or the path or a tag is already registered.
    """
    path = Path(path).resolve()
    try:
        prepared = load_dataset(path, verify_checksums=True)
    except DatasetError as exc:
        raise UserError(f"refusing dataset: {exc}") from None
    _check_cases(path, prepared, allow_unlabelled, allow_suspect_images)
    tags = [t.strip() for t in tags if t.strip()]
    if not tags:
        raise UserError("a dataset needs at least one tag (--tag), which researchers use to select it")
    for t in tags:
        if "," in t:
            raise UserError(f"tag {t!r} contains a comma")
    dm = _dataset_manager(site)
    for existing in list_datasets(site):
        if Path(existing.path).resolve() == path:
            raise UserError(f"{path}: already registered as {existing.dataset_id} ({existing.name})")
        if set(existing.tags) & set(tags):
            raise UserError(
                f"tag(s) {', '.join(sorted(set(existing.tags) & set(tags)))} already used by dataset {existing.name} "
                f"({existing.dataset_id}); a tag must select one dataset per site"
            )
    dataset_id = dm.add_database(
        name=name or prepared.name,
        data_type=DATA_TYPE,
        tags=tags,
        description=prepared.description(),
        path=str(path),
    )
    return next(d for d in list_datasets(site) if d.dataset_id == dataset_id)


def _check_cases(path: Path, prepared: PreparedDataset, allow_unlabelled: bool, allow_suspect_images: bool) -> None:
    """Refuse unlabelled cases and cases whose image is probably not an image, unless allowed."""

    def listed(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    report = f"; see the QC report {path / 'qc' / 'index.html'}" if (path / "qc" / "index.html").is_file() else ""
    problems = []  # every reason at once: a dataset both suspect and unlabelled names both
    if not allow_suspect_images:
        flags = {c.get("case_id"): c.get("qc_flags") or [] for c in json.loads((path / "manifest.json").read_text()).get("cases", [])}
        suspect = sorted((cid, f) for cid, fl in flags.items() for f in fl if f in SUSPECT_IMAGE_FLAGS)
        if suspect:
            problems.append(
                f"{len({c for c, _ in suspect})} case(s) are probably not images "
                f"({listed([f'{c} {f}' for c, f in suspect])}: a label map or a non-HU volume taken for an image?){report}; "
                "fix the inputs and prepare again, or register anyway with --allow-suspect-images"
            )
    unlabelled = [c.case_id for c in prepared.cases if c.label is None]
    if unlabelled and not allow_unlabelled:
        problems.append(
            f"{len(unlabelled)} of {len(prepared.cases)} case(s) have no label ({listed(unlabelled)}); "
            "give their labels to `site-agent prepare` (--labels; --require-labels refuses images without one), "
            "or register anyway with --allow-unlabelled (e.g. for the data factory, which trains on images only)"
        )
    if problems:
        raise UserError(f"refusing dataset {path}: " + "; and ".join(problems))


def remove_dataset(site: SiteConfig, dataset_id: str) -> None:
    """Unregister a dataset. The files on disk are left untouched.

    Args:
        site: the site.
        dataset_id: the node's id of the dataset.

    Raises:
        UserError: no dataset with this id.
    """
    if not any(d.dataset_id == dataset_id for d in list_datasets(site)):
        raise UserError(f"no dataset with id {dataset_id!r} on this node (see `site-agent dataset list`)")
    _dataset_manager(site).delete_dataset_by_id(dataset_id)


def _plan_manager(site: SiteConfig) -> Any:
    from fedbiomed.node.training_plan_security_manager import TrainingPlanSecurityManager

    config = _config(site)
    settings = node_settings(site)
    return TrainingPlanSecurityManager(
        db=_node_db(site),
        node_id=settings["node_id"],
        node_name=settings["name"],
        hashing=config.get("security", "hashing_algorithm"),
        tp_approval=True,
    )


def list_plans(site: SiteConfig, status: str | None = None) -> list[dict[str, Any]]:
    """Plans known to the node (sent by a researcher for approval, or registered).

    Args:
        site: the site.
        status: only plans with this status (``Pending``, ``Approved``, ``Rejected``).

    Returns:
        One dict per plan: id, name, status, type, hash, researcher_id, date_registered.
    """
    mgr = _plan_manager(site)
    out = []
    for row in mgr.list_training_plans(verbose=False):
        full = mgr.get_training_plan_by_id(row["training_plan_id"], secure=False) or {}
        entry = {
            "id": row["training_plan_id"],
            "name": row.get("name", ""),
            "status": row.get("training_plan_status", ""),
            "type": row.get("training_plan_type", ""),
            "hash": full.get("hash", ""),
            "researcher_id": row.get("researcher_id", ""),
            "date_registered": full.get("date_registered", ""),
        }
        if status is None or entry["status"] == status:
            out.append(entry)
    return out


def show_plan(site: SiteConfig, plan_id: str) -> dict[str, Any]:
    """One plan as the node stores it, its source included.

    Args:
        site: the site.
        plan_id: the plan's full id.

    Returns:
        The node's record of the plan.

    Raises:
        UserError: no plan with this id.
    """
    full = _plan_manager(site).get_training_plan_by_id(plan_id, secure=False)
    if not full:
        raise UserError(f"no training plan with id {plan_id!r} on this node (see `site-agent plans list`)")
    return full


def set_plan_status(site: SiteConfig, plan_id: str, approve: bool, note: str | None = None) -> None:
    """Approve or reject a plan: the node runs only approved plans.

    Args:
        site: the site.
        plan_id: the plan's full id.
        approve: True approves, False rejects.
        note: why (kept in the node's records).

    Raises:
        UserError: no plan with this id.
    """
    show_plan(site, plan_id)  # raises a clear error for an unknown id
    mgr = _plan_manager(site)
    if approve:
        mgr.approve_training_plan(plan_id, extra_notes=note)
    else:
        mgr.reject_training_plan(plan_id, extra_notes=note)
