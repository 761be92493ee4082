"""Preflight checks a site runs before joining a federation."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from preprocessing.dataset import DatasetError, load_dataset
from site_agent import config as site_config
from site_agent.errors import UserError

MIN_FREE_GB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_coordinator(host: str, port: int, timeout: float = 3.0) -> Check:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Check("coordinator reachable", True, f"{host}:{port} accepts connections")
    except OSError as exc:
        return Check("coordinator reachable", False, f"{host}:{port}: {exc.strerror or exc}")


def run_checks(config_path: str | None, min_free_gb: float = MIN_FREE_GB) -> list[Check]:
    from site_agent import node

    checks: list[Check] = []
    try:
        site = site_config.load(config_path)
    except UserError as exc:
        return [Check("site config valid", False, str(exc))]
    checks.append(Check("site config valid", True, str(site.path)))

    try:
        settings = node.node_settings(site)
        checks.append(Check("node component", True, f"{settings['node_id']} in {site.node_dir}"))
        checks.append(
            Check(
                "training-plan approval on",
                settings["training_plan_approval"] and not settings["allow_default_training_plans"],
                f"approval={settings['training_plan_approval']}, default plans={settings['allow_default_training_plans']}",
            )
        )
    except UserError as exc:
        checks.append(Check("node component", False, str(exc)))
        settings = None

    checks.append(check_coordinator(site.coordinator_host, site.coordinator_port))

    probe = site.work_dir if site.work_dir.exists() else Path(site.work_dir.anchor)
    free_gb = shutil.disk_usage(probe).free / 1e9
    checks.append(Check("disk space", free_gb >= min_free_gb, f"{free_gb:.1f} GB free in {probe} (need {min_free_gb:g})"))

    if settings is not None:
        entries = node.list_datasets(site)
        if not entries:
            checks.append(Check("datasets", False, "no dataset registered (`site-agent dataset add`)"))
        for d in entries:
            try:
                ds = load_dataset(d.path, verify_checksums=True)
                checks.append(Check(f"dataset {d.name}", True, f"{len(ds.cases)} cases, checksums match"))
            except DatasetError as exc:
                checks.append(Check(f"dataset {d.name}", False, str(exc)))
    return checks
